"""The model zoo (tests/zoo.py) through the full variant list: a verdict you can trust per family.

Each family's pipeline runs in a child process (``qpipe.testing.run_pipeline_file``), so a
converter that kills its process fails that family's test instead of the test session. Then:

- the run finished (results.json not left ``running``) and recorded every variant;
- every ``ok`` variant's headline metrics equal a direct LiteRT evaluation of its ``.tflite``
  done here (int8/int16 I/O quantized with the tensor's scale and zero point, int32 token
  ids fed as they are, a fixed-batch model fed at its batch), and its deltas are against the
  baseline's; for the two-head model, per output (``species/accuracy``, ``quality/mae``);
- the variants the family must support (``ZooModel.must_work``: every post-training variant,
  the float ones for recurrent models) are ok;
- every other variant failed with a reason that names the cause: not empty, not a Python
  internal error, not an MLIR location.

Nothing is marked xfail: a family qpipe cannot handle yet fails here, naming what is missing.
The whole file took 4m15s on a loaded 2-core machine (about 15-40 s per family, mostly the
TF-MOT variants' rebuild and conversion); ``-k FAMILY`` runs one family.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import zoo
from zoo import direct_metrics, litert_outputs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = list(zoo.BUILDERS)

RUN = """
import sys
from qpipe.tfenv import prepare_environment
prepare_environment()
from qpipe.testing import run_pipeline_file
run_pipeline_file(sys.argv[1], output=sys.argv[2])
"""

INTERNAL = re.compile(r"^(TypeError|KeyError|AttributeError|IndexError|NameError|AssertionError|UnboundLocalError|"
                      r"ZeroDivisionError|RecursionError)\b|cannot reshape array|could not be broadcast")


@pytest.fixture(scope="module", params=FAMILIES)
def zoo_run(request, tmp_path_factory):
    """One family built, written and run through every variant (in a child process)."""
    zm = zoo.build(request.param, tmp_path_factory.mktemp(request.param))
    pipeline = zm.root / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(zoo.pipeline_dict(zm), sort_keys=False))
    out = zm.root / "out"
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'plugins'}", "PATH": "/usr/bin:/bin", "HOME": str(zm.root)}
    proc = subprocess.run([sys.executable, "-c", RUN, str(pipeline), str(out)], capture_output=True, text=True,
                          cwd=zm.root, env=env, timeout=900)
    return zm, proc, out


def _results(zoo_run) -> dict:
    zm, proc, out = zoo_run
    tail = proc.stderr.strip().splitlines()[-1:] or [""]
    if not (out / "results.json").is_file():
        pytest.fail(f"{zm.family}: the run wrote no results.json (exit {proc.returncode}): {tail[0][:400]}")
    return json.loads((out / "results.json").read_text())


def test_the_run_finishes_and_records_every_variant(zoo_run):
    zm, proc, _ = zoo_run
    results = _results(zoo_run)
    assert proc.returncode >= 0, f"{zm.family}: the run was killed by signal {-proc.returncode}"
    assert results["status"] == "finished", f"{zm.family}: results.json says {results['status']!r}"
    assert [v["name"] for v in results["variants"]] == [v["name"] for v in zoo.VARIANTS]


def test_ok_variants_match_a_direct_litert_evaluation(zoo_run):
    zm, _, out = zoo_run
    results = _results(zoo_run)
    data = zm.arrays()
    base = next((v for v in results["variants"] if v["name"] == "float32"), None)
    assert base is not None and base["status"] == "ok", f"{zm.family}: the float32 baseline failed: " \
        f"{base and base.get('error')}"
    wrong = {}
    for v in (v for v in results["variants"] if v["status"] == "ok"):
        outputs = litert_outputs(out / v["artifact"], data["x_test"])
        for key, expected in direct_metrics(zm, outputs, data).items():
            got = v["metrics"].get(key)
            if got is None or not np.isclose(got, expected, rtol=1e-4, atol=1e-5):
                wrong[f"{v['name']} {key}"] = (got, round(expected, 6))
            elif key in base["metrics"] and f"{key}_delta" in v["metrics"]:
                assert v["metrics"][f"{key}_delta"] == pytest.approx(got - base["metrics"][key], abs=1e-9)
    assert not wrong, f"{zm.family}: reported vs direct LiteRT evaluation (None: not measured): {wrong}"


def test_the_variants_this_family_must_support_are_ok(zoo_run):
    zm, _, _ = zoo_run
    results = _results(zoo_run)
    failed = {v["name"]: v.get("error") for v in results["variants"]
              if v["name"] in zm.must_work and v["status"] != "ok"}
    assert not failed, f"{zm.family}: variants that must work failed: {failed}"


def test_failed_variants_name_their_cause(zoo_run):
    zm, _, _ = zoo_run
    results = _results(zoo_run)
    bad = {v["name"]: v.get("error") for v in results["variants"]
           if v["status"] != "ok" and not names_a_cause(v.get("error"))}
    assert not bad, f"{zm.family}: failures without a reason that names the cause: {bad}"


def names_a_cause(error: str | None) -> bool:
    """A reason a user can act on: some words, no Python internal error, no MLIR location."""
    text = (error or "").strip()
    return len(text) >= 15 and "Traceback" not in text and "loc(" not in text and not INTERNAL.search(text)
