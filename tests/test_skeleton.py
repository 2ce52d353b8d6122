"""Every stage runs on one skeleton: exit 2 on invalid input before any compute, exit 1 on a failure while
running, and an MLflow run for every stage execution (its status FAILED when the stage failed)."""

import shutil
import sqlite3
import sys

import yaml

from conftest import ROOT, dump_params, sh


def stage(tmp_path, module, *args, params=None):
    """Run `python -m stages.<module>` in a fresh directory holding only params.yaml: the micro profile with the
    sections of `params` updated."""
    raw = yaml.safe_load((ROOT / "profiles" / "micro.yaml").read_text())
    for section, values in (params or {}).items():
        raw[section].update(values)
    dump_params(tmp_path / "params.yaml", raw)
    return sh(
        [sys.executable, "-m", f"stages.{module}", *args], tmp_path, check=False, extra_env={"PYTHONPATH": str(ROOT)}
    )


def runs(tmp_path):
    """(name, status) of the MLflow runs in the directory's store."""
    if not (tmp_path / "mlflow.db").exists():
        return []
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        return db.execute("select name, status from runs").fetchall()


def test_invalid_params_exit_2_before_any_run(tmp_path):
    result = stage(tmp_path, "teacher", params={"teacher": {"batch": 0}})
    assert result.returncode == 2 and "teacher.batch" in result.stderr
    assert runs(tmp_path) == []


def test_a_run_params_yaml_does_not_define_exits_2_naming_the_runs(tmp_path):
    pairs = [{"a": "teacher", "b": "sid-0.5"}]
    result = stage(
        tmp_path, "evaluate", "--run", "sid-9", params={"study": {"lrs": ["0.5"]}, "preference": {"pairs": pairs}}
    )
    assert result.returncode == 2
    assert "sid-9 is not a run" in result.stderr and "sid-0.5" in result.stderr
    assert runs(tmp_path) == []


def test_a_failure_while_running_exits_1_and_marks_its_mlflow_run_failed(tmp_path):
    data = tmp_path / "set.zip"
    shutil.copy(ROOT / "tests" / "data" / "edm_checkpoint_keys.txt", data)  # any file: its hash is not the pin
    result = stage(
        tmp_path,
        "data",
        params={
            "data": {"source": "edm-zip", "path": str(data), "resolution": 8, "sha256": "0" * 64},
            "evaluation": {"feature_extractor": "inception-v3-compat"},
        },
    )
    assert result.returncode == 1
    assert "data: " in result.stderr and "but data.sha256 pins" in result.stderr and "Traceback" not in result.stderr
    assert runs(tmp_path) == [("data", "FAILED")]
    assert not (tmp_path / "data" / "dataset.npz").exists()
