"""The real `dvc repro` on the micro profile in a temporary git repository: the table, the no-op rerun,
and an edited learning rate rerunning only its own stages."""

import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT = ["dvc.yaml", ".dvcignore", ".gitignore", "stages", "distillery", "pipeline"]


def sh(args, cwd, check=True):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def stages_run(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for name in PROJECT:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, repo / name)
    shutil.copy(ROOT / "profiles" / "micro.yaml", repo / "params.yaml")
    sh(["git", "init", "-q"], repo)
    sh(["git", "config", "user.email", "test@example.com"], repo)
    sh(["git", "config", "user.name", "test"], repo)
    sh(["dvc", "init", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "project"], repo)
    first = sh(["dvc", "repro"], repo)
    return repo, first.stdout


def test_repro_builds_the_results_table(repo):
    repo, output = repo
    assert stages_run(output) == {"data", "teacher", "features", "reference_stats", "teacher_samples",
                                  "distill@sid-1e-4", "distill@sid-3e-5", "evaluate@sid-1e-4",
                                  "evaluate@sid-3e-5", "report"}
    table = pd.read_csv(repo / "reports" / "results.csv")
    assert len(table) == 3
    assert table["method"][0].startswith("teacher") and table["NFE"][0] == 7
    students = table.iloc[1:]
    assert list(students["method"]) == ["sid", "sid"] and sorted(students["lr"]) == [3e-5, 1e-4]
    assert (students["NFE"] == 1).all()
    for col in ["FID", "IS", "KID", "rel-FID", "images/s"]:
        assert table[col].notna().all() and (table[col].iloc[1:] > 0).all(), col
    md = (repo / "reports" / "results.md").read_text()
    assert "| sid" in md and "teacher" in md and "FID protocol" in md
    for name in ["teacher", "sid-1e-4", "sid-3e-5"]:
        assert (repo / "reports" / "grids" / f"{name}.png").stat().st_size > 0
    # nothing partial is left next to the outputs
    assert not list(repo.rglob("*.tmp"))


def test_second_repro_is_a_noop(repo):
    repo, _ = repo
    start = time.perf_counter()
    result = sh(["dvc", "repro"], repo)
    elapsed = time.perf_counter() - start
    assert stages_run(result.stdout) == set()
    assert elapsed < 10, elapsed
    assert sh(["dvc", "status"], repo).stdout.strip().endswith("Data and pipelines are up to date.")


def test_every_stage_is_an_mlflow_run_with_tags(repo):
    repo, _ = repo
    code = ("import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
            "df = mlflow.search_runs(search_all_experiments=True);"
            "print(df[['tags.dvc_stage','tags.method','tags.lr','tags.git_commit','params.method','params.lr',"
            "'params.batch','params.seed']].to_csv(index=False))")
    out = sh([sys.executable, "-c", code], repo).stdout
    runs = pd.read_csv(io.StringIO(out), dtype=str)
    assert {"teacher", "distill@sid-1e-4", "evaluate@sid-3e-5", "reference_stats"} <= set(runs["tags.dvc_stage"])
    distill = runs[runs["tags.dvc_stage"] == "distill@sid-1e-4"].iloc[0]
    assert distill["tags.method"] == distill["params.method"] == "sid"
    assert distill["tags.lr"] == distill["params.lr"] == "1e-4"
    assert distill["params.batch"] == "32" and distill["params.seed"] == "0"
    assert len(str(distill["tags.git_commit"])) == 40


def test_changing_one_lr_reruns_only_its_stages(repo):
    repo, _ = repo
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace('lrs: ["1e-4", "3e-5"]', 'lrs: ["2e-4", "3e-5"]'))
    result = sh(["dvc", "repro"], repo)
    assert stages_run(result.stdout) == {"distill@sid-2e-4", "evaluate@sid-2e-4", "report"}
    table = pd.read_csv(repo / "reports" / "results.csv")
    assert sorted(table["lr"].dropna()) == [3e-5, 2e-4]
