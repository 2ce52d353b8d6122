"""One run at a time per repository: a stage, `distillery run`, `distillery repro` or `dvc repro` started while
another process holds the repository lock is refused at once (exit 2, one line naming the holder), before any
compute; the processes the holder starts share its lock. Real stage processes in a micro project."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.repo_lock import TOKEN_ENV, acquire, lock_file

from conftest import copy_project, dump_params, sh, tool_env

pytestmark = pytest.mark.faults  # real processes killed and signalled: make test-faults

DISTILLERY = str(Path(sys.executable).parent / "distillery")
PYTHON = Path(sys.executable).name  # how a lock holder's command line names the interpreter


def wait_for(predicate, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def holder(repo):
    try:
        return json.loads(lock_file(repo).read_text())
    except (OSError, ValueError):
        return {}


def slow_teacher(repo, kimg=500):
    """params.yaml with a teacher that trains for minutes (the tests stop it long before)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["teacher"]["duration_kimg"] = kimg
    dump_params(repo / "params.yaml", params)


def stage(repo, name, env=None):
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}"], cwd=repo, env=env or tool_env(), capture_output=True, text=True
    )


def mlflow_runs(repo):
    import sqlite3

    if not (repo / "mlflow.db").exists():
        return []
    with sqlite3.connect(repo / "mlflow.db") as db:
        return [name for (name,) in db.execute("select name from runs")]


@pytest.fixture
def repo(micro_data, tmp_path):
    return copy_project(micro_data, tmp_path / "repo")


@pytest.fixture
def held(repo):
    """The repository lock, held by this test process, with the token it hands out (kept out of os.environ, so
    that the commands the test starts do not share it unless given it)."""
    release = acquire(repo)
    token = os.environ.pop(TOKEN_ENV)
    try:
        yield token
    finally:
        os.environ[TOKEN_ENV] = token
        release()


def test_a_second_stage_is_refused_before_computing_while_the_first_runs(repo):
    slow_teacher(repo)
    first = subprocess.Popen(
        [sys.executable, "-m", "stages.teacher"],
        cwd=repo,
        env=tool_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: holder(repo).get("pid") == first.pid, what="the teacher stage to hold the lock")
        second = stage(repo, "features")
        assert first.poll() is None  # the first still runs
    finally:
        first.terminate()
        first.wait(30)
    assert second.returncode == 2, second.stderr
    line = second.stderr.strip()
    assert "\n" not in line, line
    assert line.startswith("features: the repository is in use by pid ")
    assert f"pid {first.pid} ({PYTHON} -m stages.teacher, since " in line and "then run again" in line
    assert not (repo / "models" / "features").exists()
    assert "features" not in mlflow_runs(repo)  # refused before its MLflow run, before any compute


def test_the_processes_a_holder_starts_share_its_lock(repo, held):
    shared = stage(repo, "features", env=tool_env({TOKEN_ENV: held}))
    assert shared.returncode == 0, shared.stderr
    assert (repo / "models" / "features" / "extractor.json").is_file()


def test_the_token_of_a_killed_holder_shares_nothing(repo):
    """A holder killed outright leaves its record (and token) in the lock file, but the kernel released its lock: a
    stage started with that token takes the lock itself."""
    killed = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time; from pipeline.repo_lock import TOKEN_ENV, acquire; "
            "acquire(sys.argv[1]); print(os.environ[TOKEN_ENV], flush=True); time.sleep(60)",
            str(repo),
        ],
        env=tool_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    token = killed.stdout.readline().strip()
    killed.kill()
    killed.wait()
    assert holder(repo)["pid"] == killed.pid and holder(repo)["token"] == token
    result = stage(repo, "features", env=tool_env({TOKEN_ENV: token}))
    assert result.returncode == 0, result.stderr
    assert holder(repo)["command"] == f"{PYTHON} -m stages.features"  # its own record: it held the lock itself


def test_distillery_run_repro_and_dvc_repro_are_refused_while_the_lock_is_held(repo, held):
    before = mlflow_runs(repo)
    for command in (["run"], ["repro"]):
        result = sh([DISTILLERY, *command], repo, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and line.startswith(f"distillery {command[0]}: the repository is in use by pid "), line
    dvc = sh(["dvc", "repro", "teacher"], repo, check=False)
    assert dvc.returncode != 0
    assert f"teacher: the repository is in use by pid {os.getpid()} (" in dvc.stderr, dvc.stdout + dvc.stderr
    assert not (repo / "models" / "teacher").exists()
    assert mlflow_runs(repo) == before  # each refused before any MLflow run (and any compute)
