"""A micro-profile project built once per test session by the real `dvc repro`, in a temporary git repo."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline.params import load_params
from pipeline.runs_file import write as write_runs_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT = ["dvc.yaml", "runs.yaml", ".dvcignore", ".gitignore", "stages", "distillery", "pipeline", "votes"]


def dump_params(path, params):
    """Write `params` as DVC reads them (YAML 1.2): the string "1e-4" stays quoted (PyYAML would write it bare, a
    number, which the schema refuses as a learning rate)."""
    with open(path, "w") as f:
        YAML(typ="safe", pure=True).dump(params, f)


def tool_env(extra_env=None):
    """The environment the tests run the project's commands in: the venv's tools first, offline and quiet."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        **(extra_env or {}),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def sh(args, cwd, check=True, extra_env=None):
    result = subprocess.run(args, cwd=cwd, env=tool_env(extra_env), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def new_project(path):
    """The project's pipeline with the micro profile as params.yaml, committed in a fresh git + DVC repo."""
    path.mkdir(parents=True, exist_ok=True)
    for name in PROJECT:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, path / name)
    shutil.copy(ROOT / "profiles" / "micro.yaml", path / "params.yaml")
    write_runs_file(path, load_params(path / "params.yaml"))  # the runs of the micro profile
    sh(["git", "init", "-q"], path)
    sh(["git", "config", "user.email", "test@example.com"], path)
    sh(["git", "config", "user.name", "test"], path)
    sh(["dvc", "init", "-q"], path)
    sh(["git", "add", "-A"], path)
    sh(["git", "commit", "-qm", "project"], path)
    return path


@pytest.fixture(scope="session")
def built_micro(tmp_path_factory):
    """(path, stdout of the first `dvc repro`) of a fully built micro project; copy it before changing it."""
    repo = new_project(tmp_path_factory.mktemp("built") / "repo")
    first = sh(["dvc", "repro"], repo)
    return repo, first.stdout


def copy_project(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory):
    """A micro project whose `data` stage `dvc repro` has run (what the teacher and features stages read); copy it
    before changing it."""
    repo = new_project(tmp_path_factory.mktemp("data") / "repo")
    sh(["dvc", "repro", "data"], repo)
    return repo


# The fault-injection suite (tests/faults, `make test-faults`): its undisturbed reference build and its count.
@pytest.fixture(scope="session")
def fault_reference(tmp_path_factory):
    from faults.faultkit import build_reference

    return build_reference(tmp_path_factory.mktemp("faults") / "reference")


@pytest.fixture(scope="session")
def ledger():
    from faults.faultkit import LEDGER

    return LEDGER


def pytest_unconfigure(config):
    faultkit = sys.modules.get("faults.faultkit")
    if faultkit is not None and faultkit.LEDGER.injected:
        print(f"\n{faultkit.LEDGER.line()}", flush=True)
