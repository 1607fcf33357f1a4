"""Range estimators: their maths on known distributions, and their ranges inside real .tflite files."""

from __future__ import annotations


import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from qpipe.testing import plugin_manager, run_pipeline_file
from qpipe_calibration.estimators import (
    EntropyOptions, MinMaxOptions, MseOptions, PercentileOptions, TensorStats, estimate, fake_quantize,
    quant_params,
)


def stats_of(values: np.ndarray) -> TensorStats:
    values = np.asarray(values, dtype=np.float32)
    return TensorStats("t", float(values.min()), float(values.max()), values, values.size)


def error(values, lo, hi, bits=8):
    return float(np.mean((values - fake_quantize(values, lo, hi, bits)) ** 2))


# --------------------------------------------------------------------------- the maths


def test_minmax_is_the_observed_range():
    values = np.random.default_rng(0).normal(size=5000)
    assert estimate(stats_of(values), MinMaxOptions(), 8) == pytest.approx((values.min(), values.max()), rel=1e-6)


def test_percentile_matches_numpy_and_100_is_minmax():
    values = np.random.default_rng(1).standard_t(3, size=20000).astype(np.float32)
    lo, hi = estimate(stats_of(values), PercentileOptions(percentile=99.9), 8)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(values.astype(np.float64), [0.1, 99.9])))
    assert estimate(stats_of(values), PercentileOptions(percentile=100), 8) == pytest.approx(
        (values.min(), values.max()))


def test_mse_clips_a_laplace_tail_where_theory_says_and_lowers_the_error():
    values = np.random.default_rng(2).laplace(size=200000).astype(np.float32)
    stats = stats_of(values)
    lo, hi = estimate(stats, MseOptions(), 8)
    # the MSE-optimal 8-bit clipping of Laplace(b=1) is about 9.9 b (Banner et al., ACIQ)
    assert 9.0 < -lo < 10.5 and 9.0 < hi < 11.0
    assert hi < 0.9 * stats.max and lo > 0.9 * stats.min
    assert error(values, lo, hi) < 0.9 * error(values, stats.min, stats.max)
    # 16-bit activations have 256x finer steps, so clipping does not pay: the range stays whole
    assert estimate(stats, MseOptions(), 16) == pytest.approx((stats.min, stats.max))


def test_entropy_keeps_uniform_data_whole_and_clips_a_long_tail():
    rng = np.random.default_rng(3)
    uniform = rng.uniform(0, 4, size=50000).astype(np.float32)
    assert estimate(stats_of(uniform), EntropyOptions(), 8)[1] > 0.9 * 4
    tail = np.abs(rng.standard_t(2, size=50000)).astype(np.float32)  # ReLU-like, long tail
    lo, hi = estimate(stats_of(tail), EntropyOptions(), 8)
    assert lo == pytest.approx(tail.min()) and hi < 0.5 * tail.max()
    # 16-bit grids have more levels than the histogram has bins: nothing to clip
    assert estimate(stats_of(tail), EntropyOptions(), 16) == pytest.approx((tail.min(), tail.max()))


def test_quant_params_follow_tflite_conventions():
    scale, zp, qmin, qmax = quant_params(0.0, 2.55, 8)
    assert (scale, zp, qmin, qmax) == (pytest.approx(0.01), -128, -128, 127)
    scale, zp, _, _ = quant_params(0.5, 2.55, 8)  # the range always holds 0
    assert scale == pytest.approx(0.01) and zp == -128
    scale, zp, qmin, qmax = quant_params(-1.0, 3.0, 16)
    assert scale == pytest.approx(3.0 / 32767) and zp == 0 and (qmin, qmax) == (-32767, 32767)


@pytest.mark.parametrize("estimator, message", [
    ({"name": "percentile", "percentile": 150}, "percentile must be in (50, 100], e.g. 99.99; got 150"),
    ("kl", "unknown estimator 'kl'; valid: minmax, percentile, mse, entropy"),
    ("percentil", "unknown estimator 'percentil' (did you mean 'percentile'?)"),
    ({"name": "mse", "percentile": 99}, "estimator 'mse' has no option 'percentile'; valid: candidates"),
    ({"name": "percentile", "options": {"pct": 99}}, "estimator 'percentile' has no option 'pct'; valid: percentile"),
    ({"name": "percentile", "options": {"percentile": 150}}, "percentile must be in (50, 100]"),
])
def test_bad_estimator_options_fail_validation(project, estimator, message):
    from qpipe import ConfigError
    from qpipe.config import load_config, resolve
    from qpipe.registry import Registry

    path = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}],
                                  calibrator={"name": "sample", "options": {"count": 10, "estimator": estimator}})
    with pytest.raises(ConfigError) as info:
        resolve(load_config(path), Registry.from_plugins(plugin_manager()))
    assert "calibrator.options.estimator" in str(info.value)
    assert message in str(info.value)


def test_the_nested_options_form_is_the_flat_form(project):
    from qpipe.config import load_config, resolve
    from qpipe.registry import Registry

    estimators = {}
    for form in ({"name": "percentile", "options": {"percentile": 99}}, {"name": "percentile", "percentile": 99}):
        path = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}],
                                      calibrator={"name": "sample", "options": {"count": 10, "estimator": form}})
        resolved = resolve(load_config(path), Registry.from_plugins(plugin_manager()))
        estimators[str(form)] = resolved.variants[1].calibrator.component.options.estimator
    nested, flat = estimators.values()
    assert nested == flat and nested.percentile == 99


# --------------------------------------------------------------------------- inside the .tflite

COUNT = 60
ESTIMATORS = {
    "minmax": MinMaxOptions(), "percentile": PercentileOptions(percentile=99.9),
    "mse": MseOptions(), "entropy": EntropyOptions(),
}


@pytest.fixture(scope="module")
def estimated(tmp_path_factory, _tiny_session):
    """One run: int8 with each estimator, int16x8 and per-tensor int8 with percentile."""
    root = tmp_path_factory.mktemp("estimators")
    project = _tiny_session.copy_to(root)

    def cal(options):
        return {"name": "sample", "options": {"method": "first", "count": COUNT, "estimator": options.model_dump()}}

    variants = [{"name": f"int8_{name}", "quantizer": "tflite.int8", "calibrator": cal(opts)}
                for name, opts in ESTIMATORS.items()]
    variants += [
        {"name": "int8_converter", "quantizer": "tflite.int8", "options": {"engine": "converter"}},
        {"name": "int16x8_percentile", "quantizer": "tflite.int16x8", "options": {"io": "int16"},
         "calibrator": cal(ESTIMATORS["percentile"])},
        {"name": "int16x8_mse", "quantizer": "tflite.int16x8", "calibrator": cal(ESTIMATORS["mse"])},
        {"name": "int8_per_tensor_percentile", "quantizer": "tflite.int8",
         "options": {"per_channel": False, "io": "float32"}, "calibrator": cal(ESTIMATORS["percentile"])},
        {"name": "int8_uint8_io_mse", "quantizer": "tflite.int8", "options": {"io": "uint8"},
         "calibrator": cal(ESTIMATORS["mse"])},
    ]
    path = project.write_pipeline(variants, calibrator={"name": "sample", "options": {"method": "first", "count": COUNT}},
                                  evaluators=["accuracy", "fidelity"])
    results = run_pipeline_file(path, plugin_manager(), output=root / "out")
    x = np.load(root / "data.npz")["x_train"][:COUNT]
    return root / "out", {v.name: v for v in results.variants}, activations(root / "out" / "float32.tflite", x)


def activations(path, x) -> dict[str, np.ndarray]:
    """Every float tensor of the float model on ``x``, read with the test's own interpreter."""
    interpreter = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x.astype(np.float32))
    interpreter.invoke()
    out = {}
    for t in interpreter.get_tensor_details():
        if t["dtype"] == np.float32 and t["shape"].size and t["shape"][0] == len(x):
            out[t["name"]] = interpreter.get_tensor(t["index"]).copy()
    return out


def estimated_tensors(path) -> dict[str, tuple[float, int, type]]:
    """(scale, zero point, dtype) of the model input and every CONV_2D / FULLY_CONNECTED output.

    Those take their range from calibration; pooling and reshapes reuse their input's scale
    and softmax has a fixed one, so they are left out.
    """
    interpreter = Interpreter(model_path=str(path))
    details = interpreter.get_tensor_details()
    wanted = {op["outputs"][0] for op in interpreter._get_ops_details()
              if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")}
    first_op = interpreter._get_ops_details()[0]
    if first_op["op_name"] == "QUANTIZE":  # float input: the quantized copy carries the input's range
        wanted.add(first_op["outputs"][0])
    else:
        wanted.add(interpreter.get_input_details()[0]["index"])
    out = {}
    for i in wanted:
        params = details[i]["quantization_parameters"]
        out[details[i]["name"]] = (float(params["scales"][0]), int(params["zero_points"][0]), details[i]["dtype"])
    return out


def float_name(name: str, floats: dict) -> str:
    """The float model's tensor behind a quantized model's tensor name."""
    if name in floats:
        return name
    image = next(n for n in floats if n.startswith("serving_default"))
    return image  # the input's quantized copy ('tfl.quantize', 'serving_default_image:0_int16', ...)


@pytest.mark.slow
@pytest.mark.parametrize("variant, estimator, bits", [
    ("int8_minmax", "minmax", 8), ("int8_percentile", "percentile", 8), ("int8_mse", "mse", 8),
    ("int8_entropy", "entropy", 8), ("int16x8_percentile", "percentile", 16), ("int16x8_mse", "mse", 16),
    ("int8_per_tensor_percentile", "percentile", 8), ("int8_uint8_io_mse", "mse", 8),
])
def test_scale_and_zero_point_are_the_estimators(estimated, variant, estimator, bits):
    out, results, floats = estimated
    assert results[variant].status == "ok", results[variant].error
    checked = estimated_tensors(out / f"{variant}.tflite")
    assert len(checked) >= 4
    for name, (scale, zero_point, dtype) in checked.items():
        values = floats[float_name(name, floats)]
        if estimator == "percentile":  # computed here with numpy alone
            lo, hi = np.percentile(values.astype(np.float64), [0.1, 99.9])
        else:
            lo, hi = estimate(stats_of(values), ESTIMATORS[estimator], bits)
        want_scale, want_zp, _, _ = quant_params(lo, hi, bits)
        assert np.dtype(dtype) == (np.int16 if bits == 16 else np.int8), name
        assert scale == pytest.approx(want_scale, rel=1e-4), name
        assert abs(zero_point - want_zp) <= 1, name


@pytest.mark.slow
def test_estimated_variants_run_accurately_and_record_their_engine(estimated):
    out, results, _ = estimated
    base = results["float32"].metrics["accuracy"]
    for name, v in results.items():
        assert v.status == "ok", (name, v.error)
        assert v.metadata["engine"] == "tflite-converter"
        assert v.metrics["accuracy"] >= base - 0.05, name
    assert "activation_ranges" not in results["int8_converter"].metadata
    assert results["int8_mse"].metadata["activation_ranges"]["bits"] == 8
    assert results["int16x8_mse"].metadata["activation_ranges"]["bits"] == 16
    io = {name: Interpreter(model_path=str(out / f"{name}.tflite")).get_input_details()[0]["dtype"]
          for name in ("int8_mse", "int8_uint8_io_mse", "int8_per_tensor_percentile", "int16x8_percentile")}
    assert io == {"int8_mse": np.int8, "int8_uint8_io_mse": np.uint8, "int8_per_tensor_percentile": np.float32,
                  "int16x8_percentile": np.int16}


@pytest.mark.slow
def test_minmax_estimator_reproduces_the_converter(estimated):
    out, _, _ = estimated
    ours = estimated_tensors(out / "int8_minmax.tflite")
    converter = estimated_tensors(out / "int8_converter.tflite")
    assert ours.keys() == converter.keys()
    for name in ours:
        assert ours[name][0] == pytest.approx(converter[name][0], rel=1e-5)
        assert ours[name][1] == converter[name][1]


@pytest.mark.slow
def test_statistics_are_computed_once_for_every_estimator(estimated):
    _, results, _ = estimated
    stats = [v.metadata["calibration"]["statistics"] for name, v in results.items() if "calibration" in v.metadata]
    assert len(stats) == 8
    assert len({s["key"] for s in stats}) == 1
    assert sum(not s["reused"] for s in stats) == 1


@pytest.mark.slow
def test_granularity_applies_with_estimated_ranges(estimated):
    """per_channel: false still gives one weight scale per kernel when ranges are estimated."""
    out, _, _ = estimated

    def weight_scales(name):
        interpreter = Interpreter(model_path=str(out / f"{name}.tflite"))
        details = interpreter.get_tensor_details()
        ops = interpreter._get_ops_details()
        return {op["op_name"]: len(details[op["inputs"][1]]["quantization_parameters"]["scales"])
                for op in ops if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")}

    assert weight_scales("int8_percentile") == {"CONV_2D": 8, "FULLY_CONNECTED": 4}  # last Dense(4)
    assert weight_scales("int8_per_tensor_percentile") == {"CONV_2D": 1, "FULLY_CONNECTED": 1}
