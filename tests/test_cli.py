"""`distillery ui` serves Prefect and MLflow on loopback and stops both; `distillery compare` reads MLflow."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import sh

DISTILLERY = str(Path(sys.executable).parent / "distillery")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url):
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.ui  # starts both servers twice: with the UI tests (make test-ui)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_serves_prefect_and_mlflow_on_loopback_and_a_signal_stops_both(tmp_path, stop):
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    prefect_port, mlflow_port = free_port(), free_port()
    health = [f"http://127.0.0.1:{prefect_port}/api/health", f"http://127.0.0.1:{mlflow_port}/health"]
    cmd = [DISTILLERY, "ui", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)]
    log = tmp_path / "ui.log"
    with open(log, "w") as out:  # a file, not a pipe: nobody reads a pipe while the servers write to it
        ui = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while "Ctrl-C stops both" not in log.read_text():  # both answered, and the command says so
            assert ui.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(1)
        assert all(answers(url) for url in health)
        ui.send_signal(stop)
        ui.wait(timeout=60)
    finally:
        if ui.poll() is None:
            ui.kill()
    assert ui.returncode == (128 + signal.SIGTERM if stop == signal.SIGTERM else 0), log.read_text()
    assert not any(answers(url) for url in health)  # neither server outlives the command


def test_compare_lists_each_run_with_method_lr_and_fid(built_micro):
    repo, _ = built_micro
    out = sh([DISTILLERY, "compare"], repo).stdout
    rows = [line for line in out.splitlines() if "evaluate@" in line]
    assert {r.split("|")[1].strip() for r in rows} == {"evaluate@sid-1e-4", "evaluate@sid-3e-5"}
    assert all("| sid " in r for r in rows) and "fid" in out.splitlines()[0]
