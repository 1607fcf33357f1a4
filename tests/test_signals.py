"""Signals always win: SIGINT/SIGTERM landing anywhere in a tracked run, including inside the
MLflow tracker's sqlite writes, end the run with 130/143, results.json says interrupted and
no MLflow run is left RUNNING or FINISHED without its metrics.

The CLI runs in this process (``qpipe.cli.main``) with a warm variant cache, so one run is
mostly tracker writes and takes a fraction of a second; a timer thread sends a real signal
to this process at a different moment of each run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from qpipe import signals
from qpipe.cli import main
from qpipe.errors import Terminated

pytestmark = pytest.mark.slow

RUNS = 24
EXPECTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _signalled_run(args: list[str], delay: float, signum: int) -> tuple[int, bool]:
    """Run the CLI while a timer sends ``signum`` after ``delay`` s; (exit code, whether the
    signal came only after the CLI had returned)."""
    state = {"in_cli": True, "late": False}
    lock = threading.Lock()

    def handler(sig, frame):  # what the process would do, but never outside the CLI call
        if not state["in_cli"]:
            state["late"] = True
            return
        raise Terminated() if sig == signal.SIGTERM else KeyboardInterrupt()

    def fire():
        with lock:
            if state["in_cli"]:
                os.kill(os.getpid(), signum)
            else:
                state["late"] = True

    saved = {s: signal.signal(s, handler) for s in EXPECTED}
    timer = threading.Timer(delay, fire)
    try:
        timer.start()
        try:
            code = _cli(args)
        except KeyboardInterrupt:  # escaped the CLI: the worst outcome
            code = -1
        with lock:
            state["in_cli"] = False
        timer.join()
        time.sleep(0.01)  # a signal sent just before in_cli turned False is handled by now
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    return code, state["late"]


def _store_problems(uri: str, folder: Path) -> list[str]:
    """Runs of this output folder that are RUNNING, or FINISHED children without metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sig")
    if exp is None:
        return []
    parents = client.search_runs([exp.experiment_id], f"tags.`qpipe.output_dir` = '{folder.resolve()}'")
    problems = []
    for parent in parents:
        if parent.info.status == "RUNNING":
            problems.append(f"parent {parent.info.run_name} RUNNING")
        for kid in client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"):
            if kid.info.status == "RUNNING":
                problems.append(f"child {kid.info.run_name} RUNNING")
            if kid.info.status == "FINISHED" and "accuracy" not in kid.data.metrics:
                problems.append(f"child {kid.info.run_name} FINISHED without metrics")
    return problems


def test_signals_during_tracking_always_stop_the_run(_tiny_session, tmp_path, capsys):
    from qpipe_mlflow.testing import sqlite_store

    project = _tiny_session.copy_to(tmp_path / "project")
    store = sqlite_store(tmp_path / "mlflow.db", tmp_path)
    pipeline = project.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}],
                                      evaluators=["accuracy", "size"],
                                      tracking={"uri": store, "experiment": "sig"})
    assert _cli(["run", str(pipeline), "-o", str(tmp_path / "warm")]) == 0  # fills the cache
    started = time.perf_counter()
    assert _cli(["run", str(pipeline), "-o", str(tmp_path / "timed")]) == 0
    duration = time.perf_counter() - started
    held_before = signals.stats["held"]
    outcomes = []
    for i in range(RUNS):
        signum = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
        delay = duration * (0.02 + 0.9 * i / RUNS)  # from config loading to the last tracker writes
        folder = tmp_path / f"run-{i}"
        code, late = _signalled_run(["run", str(pipeline), "-o", str(folder)], delay, signum)
        results = folder / "results.json"
        status = json.loads(results.read_text())["status"] if results.exists() else None
        outcomes.append((i, signum.name, round(delay, 2), code, status, late))
        out = capsys.readouterr()
        assert "Traceback" not in out.err and "database is locked" not in out.err, out.err[-3000:]
        assert _store_problems(store, folder) == [], outcomes
        if late:  # the run had ended when the signal came: nothing to stop
            assert code == 0 and status == "finished", outcomes
            continue
        assert code == EXPECTED[signum], (outcomes, out.err[-3000:])
        # None: stopped before anything was written; finished: the signal came during the
        # finished hooks, after the run was complete and recorded as such
        assert status in ("interrupted", None, "finished"), outcomes
    interrupted = sum(o[4] == "interrupted" for o in outcomes)
    assert interrupted >= RUNS // 2, outcomes  # most signals landed inside the run proper
    assert signals.stats["held"] > held_before, "no signal landed inside a tracker call"


#: the console script with a command that, once done, gets a real signal while the
#: interpreter shuts down (from an exit handler that runs before qpipe's last one)
LATE = """
import atexit, os, signal, sys
from qpipe import cli

def command(argv=None, pm=None):
    atexit.register(lambda: os.kill(os.getpid(), getattr(signal, sys.argv[1])))
    raise SystemExit(0)

cli.main = command
cli.entry()
"""


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_interpreter_shuts_down_still_exits_non_zero(signum):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LATE, signum], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + getattr(signal, signum), (proc.returncode, proc.stderr[-500:])


@pytest.mark.parametrize("delay", [1.0, 2.0, 3.0, 4.5])
def test_a_signal_while_the_model_loads_stops_the_run(project, tmp_path, delay):
    """The real script in a child, signalled 1-4.5 s in (start-up, plugins, model and data
    loading, the first conversion on a loaded machine): never exit 0, never ``running``."""
    import subprocess
    import sys

    signum = signal.SIGINT if delay in (1.0, 3.0) else signal.SIGTERM
    pipeline = project.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}], cache=False)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "qpipe", "run", str(pipeline), "--no-tracking", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # xdist ignores it
    time.sleep(delay)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    status = json.loads((out / "results.json").read_text())["status"] if (out / "results.json").exists() else None
    if status == "finished":  # the whole run was over before the signal: still not exit 0 (see above)
        assert proc.returncode in (EXPECTED[signum], -signum), (proc.returncode, err[-500:])
        return
    if proc.returncode == -signum:  # it landed while the interpreter started, before qpipe's code ran:
        assert status is None and not out.exists(), status  # killed like any program, nothing written
        return
    assert proc.returncode == EXPECTED[signum], (proc.returncode, err[-800:])
    assert status in (None, "interrupted"), status
    assert "Traceback" not in err
