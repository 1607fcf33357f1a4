"""Untrusted inputs: model files that hold code, tampered cache entries, forged output folders."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import pytest

from qpipe.errors import QpipeError
from qpipe.testing import run_pipeline_file

QPIPE = [sys.executable, "-m", "qpipe.cli"]


def qpipe_cli(*args, cwd=None):
    return subprocess.run([*QPIPE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def one_error_line(proc, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def writes_marker(marker) -> str:
    """Source of a lambda that writes ``marker`` (a constant in its bytecode) and passes its input on."""
    return f"lambda t: (open({str(marker)!r}, 'w').write('pwned'), t)[1]"


# --------------------------------------------------------------------------- safe loading


def test_h5_lambda_refused_in_safe_mode_and_its_code_never_runs(project, tmp_path):
    from qpipe.tfenv import tf_keras

    keras = tf_keras()
    marker = tmp_path / "pwned.txt"
    base = keras.models.load_model(project.model_path)
    inputs = keras.Input((8, 8, 1), name="image")
    evil = keras.layers.Lambda(eval(writes_marker(marker)), name="evil")(inputs)  # noqa: S307 - the test's payload
    keras.Model(inputs, base(evil)).save(project.root / "evil.h5")
    marker.unlink()  # building the model called the lambda once
    pipeline = project.write_pipeline(model={"path": "evil.h5"})

    line = one_error_line(qpipe_cli("run", pipeline, "--no-tracking", "-o", project.root / "run"), 2)
    assert "evil.h5: refused in safe mode: layer 'evil' is a Lambda layer" in line
    assert "model.safe_mode: false" in line
    assert not marker.exists()  # the file's code never ran
    assert not (project.root / "run" / "results.json").exists()

    trusted = project.write_pipeline(model={"path": "evil.h5", "safe_mode": False})
    results = run_pipeline_file(trusted, output=project.root / "trusted")
    assert results.variant("float32").status == "ok"
    assert marker.read_text() == "pwned"  # opting out really runs the file's code: the refusal was needed


@pytest.mark.parametrize("claimed", ["2.21.0", "3.10.0", None])
def test_h5_keras_version_cannot_pick_an_unchecked_loader(project, pm, tmp_path, claimed):
    """Whatever Keras the file claims to come from, the scan runs before the loader it picks."""
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 8, 8, 1], "name": "image"}},
        {"class_name": "Lambda", "config": {"name": "payload", "function": ["AAAA", None, None],
                                            "function_type": "lambda", "module": "__main__"}}]}}
    with h5py.File(project.root / "forged.h5", "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        if claimed:
            f.attrs["keras_version"] = claimed
    with pytest.raises(QpipeError, match="forged.h5: refused in safe mode: layer 'payload' is a Lambda layer"):
        run_pipeline_file(project.write_pipeline(model={"path": "forged.h5"}), pm)


def _legacy_layer(cls, name, config=None, **extra):
    return {"class_name": cls, "config": {"name": name, **(config or {})}, **extra}


@pytest.mark.parametrize("layer, reason", [
    (_legacy_layer("TimeDistributed", "td", {"layer": _legacy_layer("Sequential", "inner", {"layers": [
        _legacy_layer("Bidirectional", "bi", {
            "layer": _legacy_layer("Lambda", "deep", {"function_type": "lambda"})})]})}),
     r"layer 'deep' is a Lambda layer \(.*\) \(in Sequential 's' > TimeDistributed 'td' > Sequential 'inner' > "
     r"Bidirectional 'bi'\)"),
    (_legacy_layer("TFOpLambda", "tf.io.gfile.rmtree", {"function": "io.gfile.rmtree"}),
     r"layer 'tf.io.gfile.rmtree' calls tf.io.gfile.rmtree, which is not a tensor-math function"),
    (_legacy_layer("MyLayer", "mine"), r"class 'MyLayer' is not a Keras built-in nor registered"),
    ({"module": "os", "class_name": "system", "config": {"name": "x"}},
     r"class 'system' from module 'os' is not part of Keras"),
    ({"module": "keras.src.utils.file_utils", "class_name": "get_file", "config": {"name": "x"}},
     r"'get_file' from module 'keras.src.utils.file_utils' is not a Keras class"),
    (_legacy_layer("Dense", "d", {"units": 2, "activation": {
        "module": "keras.src.utils.file_utils", "class_name": "function", "config": "get_file"}}),
     r"function 'get_file' from module 'keras.src.utils.file_utils' is not a Keras activation"),
])
def test_code_anywhere_in_a_stored_config_is_refused(tmp_path, layer, reason):
    from qpipe_keras.safety import check_keras_file

    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.21.0"
        f.attrs["model_config"] = json.dumps(_legacy_layer("Sequential", "s", {"layers": [layer]}))
    with pytest.raises(QpipeError, match=reason):
        check_keras_file(path)


def test_ordinary_models_pass_the_scan(tmp_path):
    """Built-in layers, wrappers, nested models, TF math ops and a compiled model are not code."""
    from qpipe_keras.safety import check_keras_file
    from qpipe.tfenv import keras3, tensorflow, tf_keras

    tf, k2, k3 = tensorflow(), tf_keras(), keras3()
    inputs = k2.Input((5, 4))
    inner = k2.Sequential([k2.Input((4,)), k2.layers.Dense(3, activation="relu", kernel_regularizer="l2"),
                           k2.layers.BatchNormalization()])
    x = k2.layers.Bidirectional(k2.layers.LSTM(3, return_sequences=True))(k2.layers.TimeDistributed(inner)(inputs))
    x = tf.nn.softmax(tf.reshape(x, (-1, 30)) * 2.0)[:, :3]
    model = k2.Model(inputs, tf.clip_by_value(tf.math.exp(x), 0.0, 1.0))
    model.compile(k2.optimizers.Adam(), "sparse_categorical_crossentropy", metrics=["accuracy"])
    inputs3 = k3.Input((8, 8, 1))
    x3 = k3.layers.SeparableConv2D(4, 3, activation="relu")(inputs3)
    x3 = k3.ops.add(k3.layers.GlobalAveragePooling2D()(k3.layers.BatchNormalization()(x3)), 1.0)
    model3 = k3.Model(inputs3, k3.layers.Dense(3, activation="softmax")(x3))
    model3.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    for m, name in ((model, "tk.h5"), (model, "tk.keras"), (model3, "k3.keras"), (model3, "k3.h5")):
        m.save(tmp_path / name)
        check_keras_file(tmp_path / name)


def _file_writing_saved_model(folder, marker, how: str):
    """A SavedModel with serving_default (image -> 4 scores) that writes ``marker`` on load
    (a resource initializer) or reads a file into a lookup table on load."""
    from qpipe.tfenv import tensorflow

    tf = tensorflow()

    class Payload(tf.saved_model.experimental.TrackableResource):
        def _create_resource(self):
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name=f"payload{id(self)}")

        def _initialize(self):
            tf.io.write_file(str(marker), "pwned")
            tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=1.0)

    class Model(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal((64, 4), seed=(1, 2)))
            if how == "initializer":
                self.payload = Payload()
            else:
                marker.write_text("a\nb\n")
                self.table = tf.lookup.StaticHashTable(tf.lookup.TextFileInitializer(
                    str(marker), tf.string, tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64,
                    tf.lookup.TextFileIndex.LINE_NUMBER), -1)

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="image")])
        def serve(self, image):
            return {"scores": tf.nn.softmax(tf.matmul(tf.reshape(image, (-1, 64)), self.w))}

    model = Model()
    tf.saved_model.save(model, str(folder), signatures={"serving_default": model.serve})


@pytest.mark.parametrize("how, op", [("initializer", "WriteFile"), ("lookup", "InitializeTableFromTextFileV2")])
def test_saved_model_touching_files_refused(project, pm, tmp_path, how, op):
    marker = tmp_path / "marker.txt"
    _file_writing_saved_model(project.root / "sm", marker, how)
    marker.unlink(missing_ok=True)
    with pytest.raises(QpipeError, match=rf"sm: refused in safe mode: function '.*' uses op {op} .*safe_mode: false"):
        run_pipeline_file(project.write_pipeline(model={"path": "sm"}), pm)
    assert not marker.exists()
    if how == "initializer":  # opting out runs the graph's file write: the refusal was needed
        results = run_pipeline_file(project.write_pipeline(model={"path": "sm", "safe_mode": False}), pm)
        assert results.model["flavor"] == "saved_model"  # loaded (its resource does not convert)
        assert marker.read_text() == "pwned"


def test_tf1_saved_model_refused(project, pm):
    """Its init and saver ops run on load and live in the main graph, where they cannot be told apart."""
    from qpipe.tfenv import tensorflow

    tf = tensorflow()
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        image = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 1], name="image")
        weights = tf.compat.v1.get_variable("w", initializer=tf.zeros((64, 4)))
        scores = tf.nn.softmax(tf.matmul(tf.reshape(image, (-1, 64)), weights))
        session.run(tf.compat.v1.global_variables_initializer())
        tf.compat.v1.saved_model.simple_save(session, str(project.root / "tf1"), {"image": image}, {"scores": scores})
    with pytest.raises(QpipeError, match="tf1: refused in safe mode: a TF1-format SavedModel"):
        run_pipeline_file(project.write_pipeline(model={"path": "tf1"}), pm)


def test_plain_saved_model_still_loads(project, pm):
    from qpipe.tfenv import tf_keras

    tf_keras().models.load_model(project.model_path).export(str(project.root / "exported"))
    results = run_pipeline_file(project.write_pipeline(model={"path": "exported"}), pm)
    assert results.model["flavor"] == "saved_model"
    assert results.variant("float32").status == "ok"


# --------------------------------------------------------------------------- the cache


def run_with_warnings(pipeline, output):
    from qpipe.config import load_config, resolve
    from qpipe.pipeline import run_pipeline
    from qpipe.registry import Registry
    from qpipe.testing import plugin_manager

    pm = plugin_manager()
    return run_pipeline(pm, resolve(load_config(pipeline), Registry.from_plugins(pm)), output, {"no_tracking": True})


def cached_entry(project, result):
    return next((project.root / ".qpipe-cache" / "v1").glob(f"??/{result.metadata['cache_key']}"))


def damage_truncate(entry, artifact):
    data = artifact.read_bytes()
    artifact.write_bytes(data[: len(data) // 2])


def damage_bitflip(entry, artifact):
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))


def damage_symlink(entry, artifact):
    artifact.unlink()
    artifact.symlink_to("/etc/hostname")


@pytest.mark.parametrize("damage", [damage_truncate, damage_bitflip, damage_symlink])
def test_a_damaged_cache_entry_is_recomputed_with_a_warning(project, damage):
    from ai_edge_litert.interpreter import Interpreter

    pipeline = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}])
    first, _ = run_with_warnings(pipeline, project.root / "one")
    entry = cached_entry(project, first.variant("int8"))
    damage(entry, entry / "artifact" / first.variant("int8").artifact)

    second, warnings = run_with_warnings(pipeline, project.root / "two")
    int8 = second.variant("int8")
    assert int8.status == "ok" and int8.metadata["cache"] == "miss", int8.metadata
    assert [w for w in warnings if f"cache entry {entry.name[:12]}" in w and "damaged" in w and "recomputing" in w]
    fresh = project.root / "two" / int8.artifact
    assert fresh.read_bytes() == (project.root / "one" / first.variant("int8").artifact).read_bytes()
    Interpreter(model_path=str(fresh)).allocate_tensors()
    assert int8.metrics["accuracy"] == first.variant("int8").metrics["accuracy"]

    third, warnings = run_with_warnings(pipeline, project.root / "three")  # the bad entry was replaced
    assert third.variant("int8").metadata["cache"] == "hit" and not [w for w in warnings if "damaged" in w]


@pytest.mark.parametrize("field, value", [("artifact", "../../../ESC/evil.tflite"),
                                          ("files", ["../../../ESC/passwd"])])
def test_a_cache_entry_naming_paths_outside_itself_is_refused(project, field, value):
    pipeline = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}])
    first, _ = run_with_warnings(pipeline, project.root / "runs" / "one")
    entry = cached_entry(project, first.variant("int8"))
    info = json.loads((entry / "entry.json").read_text())
    if field == "artifact":  # a consistent forgery: the file is there and its checksum matches
        evil = entry / "artifact" / value
        evil.parent.mkdir(parents=True, exist_ok=True)
        evil.write_bytes(b"forged")
        info["artifact"] = value
        info["raw_metrics"]["accuracy"] = 1.0
    else:
        info["result"]["metadata"]["files"] = value
    (entry / "entry.json").write_text(json.dumps(info))

    second, warnings = run_with_warnings(pipeline, project.root / "runs" / "two")
    int8 = second.variant("int8")
    assert int8.status == "ok" and int8.metadata["cache"] == "miss"
    assert int8.metrics["accuracy"] == first.variant("int8").metrics["accuracy"]  # not the forged 1.0
    assert [w for w in warnings if "names a path outside the entry" in w]
    assert not list(project.root.parent.rglob("ESC/evil.tflite"))[1:]  # only the forger's own file, in the cache
    assert not (project.root.parent / "ESC").exists()  # where runs/two/../../../ESC would have been written
    assert "files" not in int8.metadata or not int8.metadata["files"]


# --------------------------------------------------------------------------- qpipe log


@pytest.fixture(scope="module")
def finished_folder(tmp_path_factory):
    """A real, untracked run's output folder (copied by each test before it forges it)."""
    from qpipe.testing import tiny_project

    project = tiny_project(tmp_path_factory.mktemp("logged"))
    pipeline = project.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}],
                                      tracking={"experiment": "forged"})
    run_pipeline_file(pipeline, output=project.root / "out", settings={"no_tracking": True})
    return project.root / "out"


def qpipe_log(folder, store):
    from typer.testing import CliRunner

    from qpipe.cli import build_app
    from qpipe.testing import plugin_manager

    return CliRunner().invoke(build_app(plugin_manager(entry_points=["mlflow"])),
                              ["log", str(folder), "--tracking-uri", store])


def logged_runs(store):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.fixture
def store(tmp_path, tmp_path_factory):
    from qpipe_mlflow.testing import sqlite_store

    return sqlite_store(tmp_path / "mlflow.db", tmp_path_factory.getbasetemp())


def forge(finished_folder, tmp_path, change):
    import shutil

    folder = tmp_path / "theirs"
    shutil.copytree(finished_folder, folder)
    results = json.loads((folder / "results.json").read_text())
    change(folder, results)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def _artifact(value):
    return lambda folder, results: results["variants"][1].update(artifact=value)


def _component_file(value):
    return lambda folder, results: results["variants"][1]["metadata"].update(files=[value])


def _symlinked_artifact(folder, results):
    target = folder / results["variants"][1]["artifact"]
    target.unlink()
    target.symlink_to("/etc/hostname")


@pytest.mark.parametrize("change, named", [
    (_artifact("/etc/passwd"), "/etc/passwd"),
    (_artifact("../../../../../../etc/os-release"), "../../../../../../etc/os-release"),
    (_component_file("../secret.txt"), "../secret.txt"),
    (_symlinked_artifact, "dynamic.tflite"),
])
def test_qpipe_log_of_a_forged_folder_uploads_nothing(finished_folder, tmp_path, store, change, named):
    folder = forge(finished_folder, tmp_path, change)
    (tmp_path / "secret.txt").write_text("secret")
    out = qpipe_log(folder, store)
    assert out.exit_code == 2, out.output
    assert f"variant 'dynamic' names '{named}', which is not inside the output folder; nothing was logged" \
        in out.output
    assert "Traceback" not in out.output and not logged_runs(store)


def test_qpipe_log_refuses_a_pipeline_copy_leading_out_of_the_folder(finished_folder, tmp_path, store):
    def change(folder, results):
        (tmp_path / "private.yaml").write_text((folder / "pipeline.yaml").read_text() + "# private\n")
        (folder / "pipeline.yaml").unlink()
        (folder / "pipeline.yaml").symlink_to(tmp_path / "private.yaml")

    out = qpipe_log(forge(finished_folder, tmp_path, change), store)
    assert out.exit_code == 2 and "pipeline.yaml) is missing or points outside the folder" in out.output
    assert not logged_runs(store)


@pytest.mark.parametrize("text, problem", [
    (lambda good: good[: len(good) // 2], "not valid JSON"),
    (lambda good: json.dumps({**json.loads(good), "variants": "all"}), "'variants' has the wrong type (str)"),
    (lambda good: json.dumps({**json.loads(good), "variants": [{"name": "x", "metrics": []}]}),
     "'variants[0].metrics' has the wrong type (list)"),
    (lambda good: "[1, 2]", "not a JSON object"),
    # a wrong type where qpipe log once warned, exited 0 and left the MLflow parent RUNNING
    (lambda good: json.dumps({**json.loads(good), "selected": 5}), "'selected' has the wrong type (int)"),
    # a metric stored as a string, once dropped without a word
    (lambda good: json.dumps({**json.loads(good), "variants": [{"name": "x", "metrics": {"accuracy": "0.99"}}]}),
     "'variants[0].metrics.accuracy' is not a number (str)"),
])
def test_qpipe_log_of_a_garbled_results_json_is_one_line(finished_folder, tmp_path, text, problem):
    def change(folder, results):
        pass

    folder = forge(finished_folder, tmp_path, change)
    (folder / "results.json").write_text(text((folder / "results.json").read_text()))
    proc = qpipe_cli("log", folder, "--tracking-uri", f"sqlite:///{tmp_path / 'never.db'}")
    line = one_error_line(proc, 2)
    assert f"{folder / 'results.json'}: {problem}" in line and "truncated or was not written by qpipe" in line
    assert not (tmp_path / "never.db").exists()


def test_qpipe_log_of_a_killed_run_is_not_finished(finished_folder, tmp_path, store):
    def killed(folder, results):  # what a SIGKILLed run leaves: written after each variant, no final state
        results.update(status="running", finished=None)

    out = qpipe_log(forge(finished_folder, tmp_path, killed), store)
    assert out.exit_code == 0, out.output
    assert "no final state (status 'running'" in out.output and "logging it as interrupted" in out.output
    parents = [r for r in logged_runs(store) if r.data.tags.get("qpipe.kind") == "pipeline"]
    assert [(p.info.status, p.data.tags["qpipe.status"]) for p in parents] == [("KILLED", "interrupted")]
