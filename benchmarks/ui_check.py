"""Look at a qpipe run in the real MLflow UI, in headless Chromium, as a new user would.

    .venv/bin/python benchmarks/ui_check.py                       # runs pipeline.yaml, then checks
    .venv/bin/python benchmarks/ui_check.py --pipeline P.yaml --work DIR
    .venv/bin/python benchmarks/ui_check.py --output runs/X --tracking-uri sqlite:///mlflow.db

It runs the pipeline with tracking into ``WORK/mlflow.db`` (or takes an output folder already
logged), starts ``mlflow ui`` on 127.0.0.1, opens the link ``qpipe run`` prints and clicks
through like a user, checking that:

1. the experiment's landing page is the runs table and lists the pipeline run and, expanded,
   every variant;
2. one click on **Models** lists every variant with its metrics (accuracy, size, latency);
3. a variant's run shows its ``.tflite`` among its artifacts.

Screenshots go to ``<output folder>/ui/``. Needs Playwright and a Chromium (Debian's
``chromium`` package: ``apt-get install -y chromium``); Playwright's own browser download is
not used. Exit 0 when every check passes, 1 when one fails (it says which), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
METRICS = ("accuracy", "size_bytes", "latency_ms_p50")
TIMEOUT_MS = 60_000


class Failed(Exception):
    """A check that did not hold: the message says which."""


def chromium() -> str:
    found = next((c for c in CHROMIUM if Path(c).is_file()), None) or shutil.which("chromium")
    if not found:
        raise SystemExit("error: no Chromium found; install Debian's: apt-get install -y chromium")
    return found


def run_pipeline(pipeline: Path, work: Path) -> tuple[Path, str]:
    """``qpipe run`` with tracking into WORK/mlflow.db; (output folder, tracking URI)."""
    uri = f"sqlite:///{(work / 'mlflow.db').resolve()}"
    output = work / "run"
    done = subprocess.run([sys.executable, "-m", "qpipe.cli", "run", str(pipeline), "-o", str(output),
                           "--tracking-uri", uri], cwd=pipeline.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise Failed(f"qpipe run {pipeline} failed ({done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}")
    return output, uri


def logged_run(output: Path) -> dict:
    """What results.json says about the run's MLflow parent and its variants."""
    results = json.loads((output / "results.json").read_text())
    info = results.get("extra", {}).get("mlflow")
    if not info:
        raise SystemExit(f"error: {output}/results.json records no MLflow run: run it with tracking on")
    info["variants"] = [v["name"] for v in results["variants"]]
    info["ok"] = [v["name"] for v in results["variants"] if v["status"] == "ok"]
    info["artifacts"] = {v["name"]: Path(v["artifact"]).name for v in results["variants"] if v.get("artifact")}
    return info


def run_names(uri: str, parent_id: str) -> dict[str, tuple[str, str]]:
    """variant -> (child run name, child run id), read back from the store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {c.data.tags["qpipe.variant"]: (c.info.run_name, c.info.run_id) for c in children}


class MlflowUI:
    """``mlflow ui`` on 127.0.0.1 and a free port, in its own process group."""

    def __init__(self, uri: str, log: Path):
        from qpipe_mlflow.testing import free_port

        self.uri, self.log_path, self.port = uri, log, free_port()
        self.address = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "MlflowUI":
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [str(mlflow)] if mlflow.exists() else [sys.executable, "-m", "mlflow"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen([*command, "ui", "--backend-store-uri", self.uri, "--host", "127.0.0.1",
                                         "--port", str(self.port), "--workers", "1"], stdout=self.log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.address}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise Failed(f"mlflow ui did not start: {self.log_path.read_text()[-1500:]}")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


def close_assistant(page) -> None:
    """The MLflow Assistant side panel (open by default) hides half the table."""
    button = page.locator("[aria-label='Close']").first
    if button.count():
        button.click()
        page.wait_for_timeout(300)


def check_runs(page, address: str, info: dict, names: dict, shots: Path) -> None:
    """1: the link qpipe prints opens the runs table; the parent run, expanded, lists every variant."""
    page.goto(f"{address}/#/experiments/{info['experiment_id']}?workflowType=machine_learning")
    parent = page.get_by_text(info["run_name"], exact=True)
    try:
        parent.first.wait_for(timeout=TIMEOUT_MS)
    except Exception:
        page.screenshot(path=str(shots / "1-landing.png"))
        raise Failed(f"the experiment's landing page does not list run {info['run_name']} "
                     f"(see {shots / '1-landing.png'})") from None
    close_assistant(page)
    if "/runs" not in page.url:
        raise Failed(f"the experiment opened on {page.url}, not its runs table")
    cell = parent.first.locator("xpath=ancestor::div[contains(@class,'ag-cell')][1]")
    cell.locator("button[data-component-id*='runnamecellrenderer']").first.click()
    missing = []
    for variant, (name, _) in names.items():
        try:
            page.get_by_text(name, exact=True).first.wait_for(timeout=10_000)
        except Exception:
            missing.append(variant)
    page.screenshot(path=str(shots / "1-runs.png"))
    if missing:
        raise Failed(f"the runs table does not list variants {missing} under {info['run_name']}")


def check_models(page, info: dict, names: dict, shots: Path) -> None:
    """2: one click on Models: a row per ok variant and the metric columns, with values."""
    page.get_by_role("link", name="Models", exact=True).first.click()
    page.get_by_text("Model name").first.wait_for(timeout=TIMEOUT_MS)
    close_assistant(page)
    missing = []
    for variant in info["ok"]:
        try:
            page.get_by_text(names[variant][0], exact=True).first.wait_for(timeout=10_000)
        except Exception:
            missing.append(variant)
    page.screenshot(path=str(shots / "2-models.png"))
    if missing:
        raise Failed(f"the Models tab does not list variants {missing}")
    columns = grid_columns(page)
    absent = [m for m in METRICS if m not in columns]
    if absent:
        raise Failed(f"the Models tab has no {absent} columns (columns: {sorted(columns)})")
    empty = {m: v for m, v in columns.items()
             if m in METRICS and len([x for x in v if x not in ("", "-")]) < len(info["ok"])}
    if empty:
        raise Failed(f"the Models tab's metric columns are not filled for every variant: {empty}")
    page.locator("label:has(input[name='view-mode'][value='CHART'])").first.click()  # the chart view
    page.wait_for_timeout(3000)
    page.screenshot(path=str(shots / "3-models-chart.png"))


#: header names and cell texts by column id (cells escape the id's quotes, headers do not)
GRID = """() => {
    const names = {}, cells = {}, id = e => e.getAttribute('col-id').replaceAll('&quot;', '"');
    document.querySelectorAll('.ag-header-cell[col-id]').forEach(h => { names[id(h)] = h.innerText.trim(); });
    document.querySelectorAll('.ag-row .ag-cell[col-id]').forEach(c => {
        const key = id(c); (cells[key] = cells[key] || []).push(c.innerText.trim()); });
    return [names, cells];
}"""


def grid_columns(page) -> dict[str, list[str]]:
    """Every column of the table on screen (header -> cell texts), scrolling it sideways: the
    grid draws only the columns in view."""
    viewport = page.locator(".ag-body-horizontal-scroll-viewport").first
    columns: dict[str, list[str]] = {}
    for _ in range(50):
        names, cells = page.evaluate(GRID)
        for col_id, name in names.items():
            if name and col_id in cells:
                columns.setdefault(name, cells[col_id])
        moved = viewport.evaluate("e => { const before = e.scrollLeft; e.scrollLeft += e.clientWidth * 0.8;"
                                  " return e.scrollLeft !== before; }")
        page.wait_for_timeout(300)
        if not moved:
            break
    viewport.evaluate("e => { e.scrollLeft = 0; }")
    page.wait_for_timeout(300)
    return columns


def check_artifacts(page, address: str, info: dict, names: dict, shots: Path) -> None:
    """3: a variant's run page lists its .tflite among its artifacts."""
    variant = next((v for v in info["ok"] if info["artifacts"].get(v, "").endswith(".tflite")), None)
    if variant is None:
        raise Failed("no variant produced a .tflite")
    run_page = f"{address}/#/experiments/{info['experiment_id']}/runs/{names[variant][1]}"
    page.goto(f"{run_page}/artifacts?workflowType=machine_learning")
    try:
        page.get_by_text(info["artifacts"][variant], exact=True).first.wait_for(timeout=TIMEOUT_MS)
    except Exception:
        page.screenshot(path=str(shots / "4-artifacts.png"))
        raise Failed(f"run {names[variant][0]} does not show {info['artifacts'][variant]}") from None
    close_assistant(page)
    page.screenshot(path=str(shots / "4-artifacts.png"))


def check(output: Path, uri: str, width: int = 1800) -> Path:
    """Every check on a logged output folder; the screenshots' folder. Raises Failed."""
    from playwright.sync_api import sync_playwright

    info = logged_run(output)
    names = run_names(uri, info["run_id"])
    shots = output / "ui"
    shots.mkdir(exist_ok=True)
    with MlflowUI(uri, shots / "mlflow-ui.log") as ui, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            check_runs(page, ui.address, info, names, shots)
            check_models(page, info, names, shots)
            check_artifacts(page, ui.address, info, names, shots)
        finally:
            browser.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", type=Path, default=ROOT / "pipeline.yaml", help="pipeline to run")
    parser.add_argument("--work", type=Path, help="folder for the store and the run (default: a new temp folder)")
    parser.add_argument("--output", type=Path, help="check this logged output folder instead of running")
    parser.add_argument("--tracking-uri", help="the store --output was logged to")
    args = parser.parse_args(argv)
    try:
        if args.output is not None:
            if not args.tracking_uri:
                parser.error("--output needs --tracking-uri")
            output, uri = args.output, args.tracking_uri
        else:
            work = args.work or Path(tempfile.mkdtemp(prefix="qpipe-ui-"))
            work.mkdir(parents=True, exist_ok=True)
            output, uri = run_pipeline(args.pipeline.resolve(), work.resolve())
        shots = check(output, uri)
    except Failed as exc:
        print(f"ui check FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"ui check passed: runs table on arrival, every variant on the Models tab with {', '.join(METRICS)}, "
          f"the .tflite among a variant's artifacts; screenshots in {shots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
