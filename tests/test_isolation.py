"""Variants cannot corrupt each other: a quantizer that changes the shared model in place is
failed, the model is restored, and the variants after it measure the model as loaded."""

from __future__ import annotations

import numpy as np
import pytest

import qpipe
from qpipe.isolation import fingerprint, weight_arrays
from qpipe.testing import plugin_manager, run_pipeline_file


class Mutating(qpipe.Quantizer):
    """Prunes the shared model in place (the mistake), then returns the float .tflite."""

    name = "mutating.prune"
    default_backend = "keras"
    output_format = "keras"

    def quantize(self, ctx: qpipe.QuantizeContext) -> qpipe.Artifact:
        model = ctx.model.model
        model.set_weights([np.where(np.abs(w) < np.median(np.abs(w)), 0.0, w * 0.3).astype(w.dtype)
                           for w in model.get_weights()])
        clone = ctx.model.copy()  # the right way works next to it
        clone.set_weights([np.zeros_like(w) for w in clone.get_weights()])
        path = ctx.artifact_path(".keras")
        clone.save(path)
        return qpipe.Artifact(path=path, format="keras")


class Plugin:
    @qpipe.hookimpl
    def qpipe_register_quantizers(self, register):
        register(Mutating)


VARIANTS = [{"name": "original", "quantizer": "keras.original"}, {"name": "int8", "quantizer": "tflite.int8"}]
EVALUATORS = ["accuracy", "fidelity"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, _tiny_session):
    project = _tiny_session.copy_to(tmp_path_factory.mktemp("isolation"))
    pm = plugin_manager(Plugin())
    clean = project.write_pipeline(list(VARIANTS), name="clean.yaml", evaluators=EVALUATORS, cache=False)
    mutated = project.write_pipeline([{"name": "mutant", "quantizer": "mutating.prune"}, *VARIANTS],
                                     name="mutated.yaml", evaluators=EVALUATORS, cache=False)
    return run_pipeline_file(clean, pm), run_pipeline_file(mutated, pm)


def test_a_mutating_quantizer_fails_naming_its_plugin_and_the_fix(runs):
    _, mutated = runs
    result = mutated.variant("mutant")
    assert result.status == "failed"
    assert "mutating.prune" in result.error and "ctx.model.copy()" in result.error
    assert "restored" in result.error


def test_a_mutating_quantizer_cannot_change_the_other_variants_results(runs):
    clean, mutated = runs
    for name in ("float32", "original", "int8"):
        assert mutated.variant(name).status == "ok", mutated.variant(name).error
        assert mutated.variant(name).metrics["accuracy"] == clean.variant(name).metrics["accuracy"], name
        assert mutated.variant(name).metrics["accuracy"] > 0.7
        same = {k: v for k, v in clean.variant(name).metrics.items() if "seconds" not in k}
        assert {k: mutated.variant(name).metrics[k] for k in same} == same, name


@pytest.mark.parametrize("fixture", ["project", "keras3_project"])
def test_copy_is_a_clone_with_the_same_outputs_and_its_own_weights(request, fixture):
    from qpipe.schema import ModelSource
    from qpipe_keras import qpipe_load_model

    project = request.getfixturevalue(fixture)
    loaded = qpipe_load_model(ModelSource(path=project.model_path.name), project.root)
    before = fingerprint(weight_arrays(loaded.model))
    clone = loaded.copy()
    assert [layer.name for layer in clone.layers] == [layer.name for layer in loaded.model.layers]
    x = np.load(project.data_path)["x_test"][:16]
    np.testing.assert_allclose(np.asarray(clone(x)), np.asarray(loaded.model(x)), atol=1e-6)
    clone.set_weights([w + 1.0 for w in clone.get_weights()])
    assert fingerprint(weight_arrays(loaded.model)) == before
