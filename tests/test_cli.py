"""`distillery ui` serves Prefect and MLflow on loopback and stops both; `distillery compare` reads MLflow."""

import socket
import sys
import urllib.request
from pathlib import Path

from pipeline.servers import start_servers, stop_servers

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


def test_ui_serves_prefect_and_mlflow_on_loopback_and_stops_both(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    prefect_port, mlflow_port = free_port(), free_port()
    started = start_servers(prefect_port, mlflow_port)
    try:
        assert [name for name, _, _ in started] == ["Prefect", "MLflow"]
        assert answers(f"http://127.0.0.1:{prefect_port}/api/health")
        assert answers(f"http://127.0.0.1:{mlflow_port}/health")
    finally:
        stop_servers(started)
    assert all(proc.poll() is not None for _, _, proc in started)
    assert not answers(f"http://127.0.0.1:{prefect_port}/api/health")
    assert not answers(f"http://127.0.0.1:{mlflow_port}/health")


def test_compare_lists_each_run_with_method_lr_and_fid(built_micro):
    repo, _ = built_micro
    out = sh([DISTILLERY, "compare"], repo).stdout
    rows = [line for line in out.splitlines() if "evaluate@" in line]
    assert {r.split("|")[1].strip() for r in rows} == {"evaluate@sid-1e-4", "evaluate@sid-3e-5"}
    assert all("| sid " in r for r in rows) and "fid" in out.splitlines()[0]
