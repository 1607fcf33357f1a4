"""Each built-in evaluator on known outputs, and latency on a real LiteRT runner."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from qpipe import Artifact, EvalContext
from qpipe.data import Dataset
from qpipe_metrics import Accuracy, Fidelity, Latency, Regression, Size


def ctx(tmp_path, outputs, labels=None, baseline=None, **kw):
    data = Dataset(inputs={"x": np.zeros((len(outputs), 2), np.float32)}, labels=labels)
    return EvalContext(variant="v", work_dir=tmp_path, data=data, outputs=np.asarray(outputs, np.float32),
                       baseline_outputs=None if baseline is None else np.asarray(baseline, np.float32), **kw)


def test_accuracy_top1_and_topk(tmp_path):
    outputs = [[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.3, 0.4, 0.3]]
    labels = np.array([1, 1, 2, 0])
    metrics = Accuracy(Accuracy.Options(top_k=[2])).evaluate(ctx(tmp_path, outputs, labels))
    assert metrics["accuracy"] == pytest.approx(0.5)  # rows 0 and 2
    assert metrics["top2_accuracy"] == pytest.approx(1.0)


def test_accuracy_accepts_one_hot_labels_and_binary_sigmoid(tmp_path):
    one_hot = np.eye(3)[[1, 0]]
    assert Accuracy().evaluate(ctx(tmp_path, [[0, 1, 0], [0, 1, 0]], one_hot))["accuracy"] == 0.5
    assert Accuracy().evaluate(ctx(tmp_path, [[0.9], [0.2], [0.6]], np.array([1, 0, 0])))["accuracy"] == pytest.approx(2 / 3)


def test_accuracy_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k values must be >= 1"):
        Accuracy.Options(top_k=[0])


def test_regression(tmp_path):
    metrics = Regression().evaluate(ctx(tmp_path, [[1.0], [2.0], [4.0]], np.array([1.0, 3.0, 2.0])))
    assert metrics["mae"] == pytest.approx(1.0)
    assert metrics["rmse"] == pytest.approx(np.sqrt(5 / 3))


def test_fidelity_against_baseline(tmp_path):
    ours = [[0.9, 0.1], [0.4, 0.6], [1.0, 0.0]]
    base = [[0.8, 0.2], [0.6, 0.4], [1.0, 0.0]]
    metrics = Fidelity().evaluate(ctx(tmp_path, ours, baseline=base))
    assert metrics["top1_agreement"] == pytest.approx(2 / 3)
    assert metrics["max_abs_error"] == pytest.approx(0.2)
    assert metrics["mean_abs_error"] == pytest.approx((0.1 + 0.1 + 0.2 + 0.2) / 6)
    assert 0.9 < metrics["cosine_similarity"] < 1.0
    assert Fidelity().evaluate(ctx(tmp_path, ours)) == {}  # no baseline yet


def test_size_ratio_and_gzip(tmp_path):
    big = tmp_path / "big.bin"
    small = tmp_path / "small.bin"
    big.write_bytes(bytes(4000))
    small.write_bytes(np.random.default_rng(0).bytes(1000))
    metrics = Size().evaluate(ctx(tmp_path, [[0.0]], artifact=Artifact(small), baseline_artifact=Artifact(big)))
    assert metrics["size_bytes"] == 1000
    assert metrics["size_ratio"] == pytest.approx(4.0)
    assert metrics["size_gzip_bytes"] == len(gzip.compress(small.read_bytes(), 9, mtime=0))


def test_latency_on_a_real_interpreter(tmp_path, project, pm):
    from qpipe.testing import run_pipeline_file
    from qpipe_litert import LiteRTBackend

    results = run_pipeline_file(project.write_pipeline([]), pm)
    tflite = project.root / "out" / results.variant("float32").artifact
    runner = LiteRTBackend(LiteRTBackend.Options(threads=1)).load(Artifact(tflite), None)
    x = np.random.default_rng(0).random((20, 8, 8, 1), dtype=np.float32)
    data = Dataset(inputs={"image": x})
    c = EvalContext(variant="v", work_dir=tmp_path, data=data, runner=runner, outputs=np.zeros((20, 4)))
    metrics = Latency(Latency.Options(batch_size=4, runs=7, warmup=1)).evaluate(c)
    assert 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p95"]
    assert metrics["latency_ms_per_sample_p50"] == pytest.approx(metrics["latency_ms_p50"] / 4)
    threaded = Latency(Latency.Options(runs=3, threads=2)).evaluate(c)
    assert threaded["latency_ms_p50"] > 0
