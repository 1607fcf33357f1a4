from qpipe.testing import run_pipeline_file


def test_tiny_pipeline_runs_all_builtins(project, pm):
    path = project.write_pipeline([
        {"name": "dynamic", "quantizer": "tflite.dynamic"},
        {"name": "int8", "quantizer": "tflite.int8"},
    ])
    results = run_pipeline_file(path, pm)
    assert [v.status for v in results.variants] == ["ok", "ok", "ok"], [v.error for v in results.variants]
    assert results.variant("int8").metrics["accuracy"] > 0.8
