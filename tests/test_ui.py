"""The two UIs do the jobs they are opened for, seen in a real headless Chromium (Debian's) against the servers
`distillery ui` starts on 127.0.0.1: the Prefect flow-run page of a running micro flow shows a distill stage's
progress artifact, the finished flow its results table; the MLflow experiment opens in model-training mode and
charts the monitoring `fid` of the distill runs at more than one training step.

Slow (a Prefect server, an MLflow server, a micro flow): `make test-ui`. Screenshots go to $DISTILLERY_SCREENSHOTS
(default: the test's temporary directory)."""

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from browser import chromium, needs_chromium
from test_cli import free_port

from conftest import BIN, new_project, sh

pytestmark = [
    pytest.mark.ui,
    needs_chromium,
    pytest.mark.timeout(900),
]


def api(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def wait_for(what, condition, timeout, proc=None, log=None):
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({proc.returncode})\n{log.read_text()[-4000:]}")
        if time.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s" + (f"\n{log.read_text()[-4000:]}" if log else ""))
        time.sleep(0.5)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    path = Path(os.environ.get("DISTILLERY_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A micro project and `distillery ui` serving its Prefect server and MLflow store; stopped whatever happens."""
    root = tmp_path_factory.mktemp("ui")
    repo = new_project(root / "repo")
    prefect_port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DISTILLERY_MLFLOW_UI": f"http://127.0.0.1:{mlflow_port}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = root / "ui.log"
    with open(log, "w") as out:
        ui = subprocess.Popen(
            [BIN / "distillery", "ui", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for("distillery ui", lambda: "Ctrl-C stops both" in log.read_text(), 240, ui, log)
        yield repo, env, f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    finally:
        if ui.poll() is None:
            ui.send_signal(signal.SIGTERM)
            try:
                ui.wait(timeout=60)
            except subprocess.TimeoutExpired:
                ui.kill()


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def artifacts(prefect, flow_run_id):
    return api(f"{prefect}/api/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})


def flow_run(prefect):
    runs = api(f"{prefect}/api/flow_runs/filter", {})
    return runs[0] if runs else None


def open_artifacts(page, url):
    page.goto(url)
    page.get_by_text("Artifacts", exact=True).first.click()


@pytest.fixture(scope="module")
def flow(servers, browser, shots):
    """Runs the micro flow under `distillery run`; screenshots its page while a distill stage's progress artifact
    is there and the flow still runs, and again when it has finished. Returns what the tests check."""
    repo, env, prefect, _ = servers
    log = repo.parent / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([BIN / "distillery", "run"], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
    page = browser.new_page(viewport={"width": 1400, "height": 1450})  # the graph and the artifact cards
    try:
        run = wait_for("a flow run", lambda: flow_run(prefect), 300, proc, log)

        def progress():
            found = [a for a in artifacts(prefect, run["id"]) if (a["key"] or "").startswith("progress-distill")]
            return found[0] if found else None

        artifact = wait_for("a distill progress artifact", progress, 600, proc, log)
        open_artifacts(page, f"{prefect}/runs/flow-run/{run['id']}")
        card = page.get_by_text(artifact["key"]).last  # the card in the Artifacts tab (the graph labels it too)
        card.wait_for(timeout=60_000)
        card.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "prefect-running-flow-progress.png"))
        running = api(f"{prefect}/api/flow_runs/{run['id']}")["state"]["type"]
        running_text = page.inner_text("body")
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
        open_artifacts(page, f"{prefect}/runs/flow-run/{run['id']}")
        page.get_by_text("results").first.wait_for(timeout=60_000)
        page.get_by_text("results").first.click()
        page.get_by_text("FID").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "prefect-results-artifact.png"))
        finished_text = page.inner_text("body")
        final = api(f"{prefect}/api/flow_runs/{run['id']}")
        return {
            "run": final,
            "running_state": running,
            "running_text": running_text,
            "progress": artifact,
            "finished_text": finished_text,
            "artifacts": artifacts(prefect, run["id"]),
            "log": log.read_text(),
        }
    finally:
        page.close()
        if proc.poll() is None:
            proc.kill()


def test_a_running_flow_shows_the_progress_of_a_distill_stage(flow, shots):
    assert flow["running_state"] == "RUNNING"  # the page was taken while the flow ran
    assert flow["progress"]["type"] == "progress"
    assert re.search(r"distill@sid-[0-9e-]+.*kimg.*images/s.*ETA.*FID", flow["progress"]["description"])
    assert flow["progress"]["key"] in flow["running_text"]
    assert (shots / "prefect-running-flow-progress.png").stat().st_size > 10_000


def test_the_flow_is_named_tagged_and_ends_with_the_results_table(flow, servers):
    repo, *_ = servers
    commit = sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()[:8]
    run = flow["run"]
    assert run["name"] == f"micro @ {commit}"
    assert {"profile:micro", f"commit:{commit}", "gpus:none (CPU)"} <= set(run["tags"])
    assert run["state"]["type"] == "COMPLETED"
    results = [a for a in flow["artifacts"] if a["key"] == "results"]
    assert results and results[-1]["type"] == "markdown"
    table = [line for line in (repo / "reports" / "results.md").read_text().splitlines() if line.startswith("|")]
    assert table and all(line in results[-1]["data"] for line in table)
    assert "sid-1e-4" in flow["finished_text"] or "SiD" in flow["finished_text"]
    tables = {a["key"] for a in flow["artifacts"] if a["type"] == "table"}
    assert {"evaluate-sid-1e-4", "evaluate-sid-3e-5"} <= tables
    links = {
        a["key"]: a["data"] for a in flow["artifacts"] if a["type"] == "markdown" and a["key"].startswith("mlflow")
    }
    assert "mlflow-distill-sid-1e-4" in links and "/#/experiments/" in links["mlflow-distill-sid-1e-4"]
    assert re.search(r"MLflow run of distill@sid-1e-4: http://127\.0\.0\.1:\d+/#/experiments/\d+/runs/\w+", flow["log"])


def test_stages_dvc_skips_end_cached(servers, browser, shots):
    repo, env, prefect, _ = servers
    result = subprocess.run([BIN / "distillery", "run"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = api(f"{prefect}/api/flow_runs/filter", {"sort": "START_TIME_DESC"})
    tasks = api(f"{prefect}/api/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}})
    assert tasks and {t["state"]["name"] for t in tasks} == {"Cached"}
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{prefect}/runs/flow-run/{runs[0]['id']}")
        page.get_by_text("Task Runs", exact=True).first.click()
        page.get_by_text("Cached").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "prefect-cached.png"))
    finally:
        page.close()


def close_assistant(page):
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.last.click()


def test_mlflow_opens_in_model_training_mode_and_charts_fid_over_training(flow, servers, browser, shots):
    repo, env, _, mlflow = servers
    experiments = api(f"{mlflow}/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
    (experiment,) = [e for e in experiments if e["name"] == "distillery-micro"]
    tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    with_env = {**os.environ, "DISTILLERY_MLFLOW_UI": env["DISTILLERY_MLFLOW_UI"], "DISTILLERY_ROOT": str(repo)}
    links = subprocess.run(
        [
            BIN / "python",
            "-c",
            "from pipeline.tracking import experiment_links as e; print(e()[0][1]); print(e()[0][2])",
        ],
        cwd=repo,
        env=with_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    page = browser.new_page(viewport={"width": 1600, "height": 1100})
    try:
        page.goto(links[0])  # the experiment link `distillery ui` prints: the runs, grouped under their pipeline run
        page.get_by_text("distillery run").first.wait_for(timeout=60_000)
        nav = page.locator("nav, aside").first.inner_text() if page.locator("nav, aside").count() else ""
        body = page.inner_text("body")
        assert "Model registry" in body and "Token Usage" not in body and "Sessions" not in nav  # not the GenAI view
        close_assistant(page)
        page.screenshot(path=str(shots / "mlflow-runs.png"))

        page.goto(links[1])  # FID over training: the distill runs dvc.lock points to, one line per method and lr
        chart = page.locator("[data-testid='experiment-view-compare-runs-card']").filter(
            has=page.locator("h4", has_text=re.compile(r"^fid$"))
        )
        chart.first.wait_for(timeout=60_000)
        close_assistant(page)
        page.wait_for_timeout(2000)
        points = chart.first.evaluate(
            "card => [...card.querySelectorAll('.scatterlayer .trace')]"
            ".map(t => t.querySelectorAll('.points path').length)"
        )
        assert sum(n >= 2 for n in points) == 2, points  # both distill runs, each at more than one training step
        assert "distill@sid-1e-4" in page.inner_text("body") and "2 matching runs" in page.inner_text("body")
        page.screenshot(path=str(shots / "mlflow-fid-chart.png"))
    finally:
        page.close()
