"""Token models: int32 ids keep their type through calibration, conversion, evaluation and QAT;
integer outputs are compared as integers; ``engine: auto`` breaks ties towards the full-integer,
then the smaller file. Every number is checked against a direct LiteRT run of the artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qpipe.conversion import float_ops
from qpipe.errors import DataError
from qpipe.testing import TinyProject, run_pipeline_file
from qpipe.tfenv import keras3, tensorflow, tf_keras

VOCAB, LENGTH, CLASSES = 50, 12, 3
EVALUATORS = ["accuracy", "fidelity", "size"]


def token_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids 3..49 as noise; two copies of the class id (0, 1 or 2) mark the class; 10% labels flipped."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    x = rng.integers(CLASSES, VOCAB, size=(n, LENGTH))
    for i in range(n):
        x[i, rng.choice(LENGTH, 2, replace=False)] = y[i]
    y = np.where(rng.random(n) < 0.1, rng.integers(0, CLASSES, size=n), y)
    return x.astype(np.int32), y.astype(np.int64)


def token_model(flavor: str, attention: bool = False, argmax: bool = False):
    """Embedding(50, 8), [MultiHeadAttention], pooling, Dense softmax (or its argmax ids), trained."""
    keras = tf_keras() if flavor == "tf_keras" else keras3()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    tokens = layers.Input((LENGTH,), dtype="int32", name="tokens")
    h = layers.Embedding(VOCAB, 8)(tokens)
    if attention:
        h = layers.MultiHeadAttention(num_heads=2, key_dim=4)(h, h)
    h = layers.Dense(16, activation="relu")(layers.GlobalAveragePooling1D()(h))
    model = keras.Model(tokens, layers.Dense(CLASSES, activation="softmax")(h))
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy")
    model.fit(*token_data(600, 0), epochs=6, batch_size=32, verbose=0)
    if argmax:  # tf_keras: a TFOpLambda the converter turns into ARG_MAX (int32 ids out)
        tf = tensorflow()
        model = keras.Model(tokens, tf.math.argmax(model.output, axis=-1, output_type=tf.int32))
    return model


def token_project(root: Path, model) -> TinyProject:
    root.mkdir(parents=True, exist_ok=True)
    model.save(root / "model.keras")
    (x_train, y_train), (x_test, y_test) = token_data(600, 0), token_data(200, 1)
    np.savez(root / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return TinyProject(root, root / "model.keras", root / "data.npz")


def run(project: TinyProject, variants: list[dict], out: str, **sections):
    data = project.pipeline_dict([])["data"]
    data["training"] = {"path": "data.npz", "inputs": "x_train", "labels": "y_train"}
    sections.setdefault("data", data)
    path = project.write_pipeline(variants, name=f"{out}.yaml", cache=False, evaluators=EVALUATORS, **sections)
    results = run_pipeline_file(path, output=project.root / out)
    return results, {r.name: r for r in results.variants}, project.root / out


def litert_outputs(path: Path, ids: np.ndarray) -> np.ndarray:
    """The .tflite run directly on int32 ids, the whole batch at once, its output dequantized."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    (tokens,), (output,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert np.dtype(tokens["dtype"]) == np.int32  # the ids stay ids in every variant
    interpreter.resize_tensor_input(tokens["index"], list(ids.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(tokens["index"], ids.astype(np.int32))
    interpreter.invoke()
    raw = interpreter.get_tensor(output["index"])
    scale, zero = output["quantization"]
    if np.dtype(output["dtype"]).kind == "f" or not scale:
        return raw
    return (raw.astype(np.float32) - zero) * scale


VARIANTS = [
    {"name": "dynamic", "quantizer": "tflite.dynamic"},
    {"name": "float16", "quantizer": "tflite.float16"},
    {"name": "int8", "quantizer": "tflite.int8"},
    {"name": "int8-converter", "quantizer": "tflite.int8", "options": {"engine": "converter"}},
    {"name": "int8-aeq", "quantizer": "tflite.int8", "options": {"engine": "ai-edge-quantizer"}},
    {"name": "int16x8", "quantizer": "tflite.int16x8", "options": {"io": "int16"}},
    {"name": "qat", "quantizer": "tfmot.qat", "options": {"epochs": 1}},
]


@pytest.fixture(scope="module", params=["tf_keras", "keras3"])
def token_run(request, tmp_path_factory):
    project = token_project(tmp_path_factory.mktemp(f"tokens-{request.param}"), token_model(request.param))
    return request.param, project, *run(project, VARIANTS + [
        {"name": "int16x8-float-io", "quantizer": "tflite.int16x8"}], "all")


@pytest.mark.slow
def test_every_variant_of_a_token_classifier_is_ok_and_matches_litert(token_run):
    flavor, project, _, v, out = token_run
    x_test, y_test = token_data(200, 1)
    reference = litert_outputs(out / v["float32"].artifact, x_test)
    for variant in VARIANTS:
        r = v[variant["name"]]
        assert r.status == "ok", (flavor, r.name, r.error)
        outputs = litert_outputs(out / r.artifact, x_test)
        assert r.metrics["accuracy"] == pytest.approx(float(np.mean(outputs.argmax(1) == y_test)), abs=1e-9)
        assert r.metrics["mean_abs_error"] == pytest.approx(float(np.mean(np.abs(outputs - reference))), abs=1e-6)
        assert r.metrics["accuracy_delta"] >= -0.05, (r.name, r.metrics)
    # int8, int16x8 and QAT are full-integer: the ids go straight into an integer GATHER
    for name in ("int8", "int8-converter", "int8-aeq", "int16x8", "qat"):
        assert float_ops((out / v[name].artifact).read_bytes()) == [], name
    assert v["qat"].metadata["rebuilt_from_keras3"] is (flavor == "keras3")
    # float I/O int16x8 is the converter's only: on Keras 3 (its Embedding adds integer ops on
    # the ids) the converter cannot, and the line says what to do instead
    float_io = v["int16x8-float-io"]
    if flavor == "tf_keras":
        assert float_io.status == "ok", float_io.error
    else:
        assert float_io.status == "failed"
        assert "integer input 'tokens'" in float_io.error and "io: int16" in float_io.error
        # with io: int16 auto tries both engines: the converter's failure leaves ai-edge-quantizer's file
        int16 = v["int16x8"]
        assert int16.metadata["engine"] == "ai-edge-quantizer"
        assert "integer input 'tokens'" in int16.metadata["engine_failed"]["converter"]
        assert [w["code"] for w in int16.warnings] == ["engine-failed"]


@pytest.mark.slow
def test_auto_on_a_tie_keeps_the_smaller_of_two_full_integer_files(token_run):
    from qpipe_tflite.choice import pick

    _, _, _, v, out = token_run
    files = {"converter": (out / v["int8-converter"].artifact).read_bytes(),
             "ai-edge-quantizer": (out / v["int8-aeq"].artifact).read_bytes()}
    assert len(files["converter"]) != len(files["ai-edge-quantizer"])
    smaller = min(files, key=lambda k: len(files[k]))
    keep, reason, facts = pick({"converter": 0.0013, "ai-edge-quantizer": 0.0013 * (1 + 1e-4)}, files, 50)
    assert keep == smaller and "the smaller file" in reason
    assert facts["engine_tie"]["float_ops"] == {"converter": 0, "ai-edge-quantizer": 0}
    # outside the tie the closer file wins, whatever its size
    larger = next(k for k in files if k != smaller)
    keep, reason, _ = pick({smaller: 0.002, larger: 0.001}, files, 50)
    assert keep == larger and "closer to the float model's" in reason
    # what auto did in the run: the same rule over the errors it measured
    auto = v["int8"]
    errors = auto.metadata["engine_errors"]
    expected = pick(errors, files, 50)[0]
    assert auto.metadata["engine"] == ("tflite-converter" if expected == "converter" else "ai-edge-quantizer")
    assert (out / auto.artifact).read_bytes() == files[expected]


@pytest.fixture(scope="module")
def argmax_run(tmp_path_factory):
    project = token_project(tmp_path_factory.mktemp("argmax"), token_model("tf_keras", argmax=True))
    variants = [{"name": "int8", "quantizer": "tflite.int8"},
                {"name": "int8-converter", "quantizer": "tflite.int8", "options": {"engine": "converter"}},
                {"name": "int8-aeq", "quantizer": "tflite.int8", "options": {"engine": "ai-edge-quantizer"}}]
    return run(project, variants, "argmax", task="classification")


@pytest.mark.slow
def test_integer_outputs_are_compared_as_integers(argmax_run):
    _, v, out = argmax_run
    x_test, y_test = token_data(200, 1)
    reference = litert_outputs(out / v["float32"].artifact, x_test)
    assert reference.dtype == np.int32
    for name in ("float32", "int8", "int8-converter", "int8-aeq"):
        r = v[name]
        assert r.status == "ok", (name, r.error)
        ids = litert_outputs(out / r.artifact, x_test)
        assert ids.dtype == np.int32
        assert r.metrics["accuracy"] == pytest.approx(float(np.mean(ids == y_test)), abs=1e-9)
        assert r.metrics["exact_match"] == pytest.approx(float(np.mean(ids == reference)), abs=1e-9)
        # ids are not scores: no float error, cosine or R² over them
        assert not {"mean_abs_error", "r2", "cosine_similarity"} & set(r.metrics), r.metrics


@pytest.mark.slow
def test_auto_on_a_tie_keeps_the_full_integer_file(argmax_run):
    """Both engines give the same ids (error 0): ai-edge-quantizer leaves ARG_MAX in float, the
    converter's file is full-integer, so auto keeps the converter's (it used to keep the other)."""
    _, v, out = argmax_run
    auto = v["int8"]
    assert auto.metadata["engine_errors"]["converter"] == auto.metadata["engine_errors"]["ai-edge-quantizer"]
    assert float_ops((out / v["int8-aeq"].artifact).read_bytes()) == ["ARG_MAX"]
    assert float_ops((out / v["int8-converter"].artifact).read_bytes()) == []
    assert auto.metadata["engine"] == "tflite-converter"
    assert "the full-integer file" in auto.metadata["engine_reason"] and "ARG_MAX" in auto.metadata["engine_reason"]
    assert auto.metadata["engine_tie"]["float_ops"] == {"converter": 0, "ai-edge-quantizer": 1}
    assert (out / auto.artifact).read_bytes() == (out / v["int8-converter"].artifact).read_bytes()
    assert not any(w["code"] == "float-ops" for w in auto.warnings)


def test_float_ids_with_a_fraction_are_one_data_error(tmp_path):
    project = token_project(tmp_path / "p", token_model("tf_keras"))
    x_test, y_test = token_data(200, 1)
    whole = x_test.astype(np.float64)  # whole numbers stored as floats: cast, and int8 works
    broken = whole.copy()
    broken[3, 5] = 7.5
    np.savez(project.data_path, x_train=token_data(600, 0)[0].astype(np.float64), y_train=token_data(600, 0)[1],
             x_test=whole, y_test=y_test, x_broken=broken)
    _, v, _ = run(project, [{"name": "int8", "quantizer": "tflite.int8"}], "whole")
    assert v["int8"].status == "ok", v["int8"].error
    data = project.pipeline_dict([])["data"]
    data["evaluation"]["inputs"] = "x_broken"
    with pytest.raises(DataError, match=r"7\.5 at index \(?3, 5\)?.*not a whole number.*int32"):
        run(project, [], "broken", data=data)


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["tf_keras", "keras3"])
def test_an_attention_token_classifier_quantizes_to_integers(flavor, tmp_path):
    """Embedding + MultiHeadAttention: int8 on both engines and int16x8 work on the ids; QAT keeps
    the attention in float (TF-MOT has no config for it) on tf_keras, and says why not on Keras 3."""
    project = token_project(tmp_path / "p", token_model(flavor, attention=True))
    _, v, out = run(project, [
        {"name": "int8-converter", "quantizer": "tflite.int8", "options": {"engine": "converter"}},
        {"name": "int8-aeq", "quantizer": "tflite.int8", "options": {"engine": "ai-edge-quantizer"}},
        {"name": "int16x8", "quantizer": "tflite.int16x8", "options": {"io": "int16"}},
        {"name": "qat", "quantizer": "tfmot.qat", "options": {"epochs": 1, "unsupported": "float"}}], "attention")
    x_test, y_test = token_data(200, 1)
    for name in ("int8-converter", "int8-aeq", "int16x8"):
        r = v[name]
        assert r.status == "ok", (name, r.error)
        outputs = litert_outputs(out / r.artifact, x_test)
        assert r.metrics["accuracy"] == pytest.approx(float(np.mean(outputs.argmax(1) == y_test)), abs=1e-9)
        assert float_ops((out / r.artifact).read_bytes()) == [], name
    qat = v["qat"]
    if flavor == "tf_keras":
        assert qat.status == "ok", qat.error
        assert "multi_head_attention" in qat.metadata["kept_float"]
        outputs = litert_outputs(out / qat.artifact, x_test)
        assert qat.metrics["accuracy"] == pytest.approx(float(np.mean(outputs.argmax(1) == y_test)), abs=1e-9)
    else:
        assert qat.status == "failed" and "multi_head_attention" in qat.error and "MultiHeadAttention" in qat.error
