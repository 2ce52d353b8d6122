"""The MLflow tracking server (real, on 127.0.0.1) killed in the middle of a distill stage: the stage finishes with
the bits of the undisturbed run, says that its run was kept locally, and `distillery sync` delivers the run — its
params, its losses and FID over training — to the server once it is back."""

import sqlite3
import time

import pytest
from faults.faultkit import snapshot, stage_command, stage_outputs, start
from test_tracking_outage import Server

from conftest import copy_project

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

STAGE = "distill@sid-1e-4"


def metric_steps(server, run_id, key):
    with sqlite3.connect(server.db) as db:
        return [s for (s,) in db.execute("select step from metrics where run_uuid = ? and key = ?", (run_id, key))]


def test_tracking_server_killed_mid_distill(fault_reference, tmp_path, ledger):
    project = copy_project(fault_reference, tmp_path / "p")
    files = stage_outputs(project, STAGE)
    before = snapshot(project, files)
    (tmp_path / "mlflow").mkdir()
    server = Server(tmp_path / "mlflow")
    tracked = {"MLFLOW_TRACKING_URI": None}
    try:
        server.start()
        tracked["MLFLOW_TRACKING_URI"] = server.uri
        with ledger.fault(project, keep=before):
            proc = start(stage_command(project, STAGE), project, extra_env=tracked, shell=True)
            deadline = time.monotonic() + 120
            while not any(metric_steps(server, run, "loss_g") for run, _ in server.runs("distillery-micro")):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the stage never logged a loss"
                time.sleep(0.05)
            server.kill()
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"the stage did not survive the tracking server:\n{err}"
            assert snapshot(project, files) == before
            kept = sorted((project / "mlruns-unsynced").glob("*.json"))
            assert kept and "distillery sync" in err, err

            server.start()
            sync = start(["distillery", "sync"], project, extra_env=tracked)
            assert sync.wait(timeout=120) == 0, sync.communicate()
            assert list((project / "mlruns-unsynced").glob("*.json")) == []
            ((run_id, status),) = server.runs("distillery-micro")  # one run: the sync completed it
            assert status == "FINISHED"
            assert len(metric_steps(server, run_id, "fid")) == 2  # both monitoring steps of the 0.256-kimg run
            assert metric_steps(server, run_id, "loss_g")
    finally:
        server.kill()
