"""Prefect runs the DVC DAG (real ephemeral Prefect server, real DVC): concurrency, skipping, failures,
and DVC staying the truth afterwards."""

import json
import re
import sys
from pathlib import Path

import pytest

from conftest import copy_project, sh

pytestmark = pytest.mark.slow

DISTILLERY = str(Path(sys.executable).parent / "distillery")


def run_flow(repo):
    timeline = repo / "timeline.json"
    timeline.unlink(missing_ok=True)
    result = sh(
        [DISTILLERY, "run", "--max-parallel", "2", "--timeline", str(timeline)],
        repo,
        check=False,
        extra_env={"PREFECT_HOME": str(repo.parent / "prefect-home")},
    )
    return result, json.loads(timeline.read_text())


def set_lrs(repo, old, new):
    params = (repo / "params.yaml").read_text()
    assert old in params
    (repo / "params.yaml").write_text(params.replace(old, new))


def dvc_clean(repo):
    assert sh(["dvc", "status"], repo).stdout.strip().endswith("Data and pipelines are up to date.")
    assert not re.findall(r"Running stage", sh(["dvc", "repro"], repo).stdout)


@pytest.fixture(scope="module")
def repo(built_micro, tmp_path_factory):
    src, _ = built_micro
    return copy_project(src, tmp_path_factory.mktemp("flow") / "repo")


def test_after_dvc_repro_the_flow_skips_every_stage(repo):
    result, timeline = run_flow(repo)
    assert result.returncode == 0, result.stderr
    assert len(timeline) == 12
    assert all(t["state"] == "Cached" and t["ran"] is False for t in timeline.values()), timeline  # not "Completed"


def test_independent_distill_stages_run_concurrently_and_dvc_stays_the_truth(repo):
    set_lrs(repo, 'lrs: ["1e-4", "3e-5"]', 'lrs: ["2e-4", "5e-5"]')
    result, timeline = run_flow(repo)
    assert result.returncode == 0, result.stdout + result.stderr
    ran = {name for name, t in timeline.items() if t.get("ran")}
    assert ran == {"distill@sid-2e-4", "distill@sid-5e-5", "evaluate@sid-2e-4", "evaluate@sid-5e-5", "report"}
    a, b = timeline["distill@sid-2e-4"], timeline["distill@sid-5e-5"]
    assert a["started"] < b["finished"] and b["started"] < a["finished"], (a, b)  # the two runs overlapped
    dvc_clean(repo)


def test_a_failing_stage_fails_its_task_stops_downstream_and_keeps_finished_stages_recorded(repo):
    set_lrs(repo, 'lrs: ["2e-4", "5e-5"]', 'lrs: ["3e-4", "5e-5"]')
    evaluate = repo / "stages" / "evaluate.py"
    original = evaluate.read_text()
    evaluate.write_text('raise SystemExit("injected failure")\n' + original)
    try:
        result, timeline = run_flow(repo)
    finally:
        evaluate.write_text(original)
    assert result.returncode == 1
    assert "injected failure" in result.stdout + result.stderr
    assert timeline["distill@sid-3e-4"]["state"] == "Completed" and timeline["distill@sid-3e-4"]["ran"]
    assert timeline["evaluate@sid-3e-4"]["state"] == "Failed"
    assert timeline["report"]["state"] != "Completed" and "ran" not in timeline["report"]
    status = sh(["dvc", "status"], repo).stdout
    assert "evaluate@sid-3e-4" in status and "distill@sid-3e-4:" not in status  # the finished stage is recorded
    # with the stage repaired, plain DVC finishes the job from what the flow recorded
    repro = sh(["dvc", "repro"], repo).stdout
    assert "Running stage 'distill@sid-3e-4'" not in repro and "Running stage 'report'" in repro
    dvc_clean(repo)
