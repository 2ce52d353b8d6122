"""An MLflow outage never stops a stage, and no run stays RUNNING: real `mlflow server`s on 127.0.0.1 (SQLite
backend), killed with SIGKILL and restarted on the same port and store, real stage processes and real signals.

The stage-like process is a small stage on the project's skeleton (`run_stage`) that logs one metric per step
until the file `stop` appears (or raises at step 3), writing its step count to the file `steps`."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest
from test_cli import free_port

from conftest import BIN, ROOT, new_project

pytestmark = pytest.mark.faults  # real servers started and crashed: make test-faults

PROBE = '''"""A stage-like process: one metric per step until the file `stop` appears; --mode raise fails at step 3."""
import os
import time
from pathlib import Path

import pipeline.tracking
from stages.skeleton import run_stage

pipeline.tracking.RETRY_EVERY_S = float(os.environ.get("PROBE_RETRY_S", "30"))


def body(params, args, run):
    step = 0
    while not Path("stop").exists():
        run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        step += 1
        Path("steps").write_text(str(step))
        if args.mode == "raise" and step == 3:
            raise RuntimeError("the probe fails on purpose")
        time.sleep(0.1)
    Path("out.txt").write_text("the probe's artifact")
    run.log_artifact("out.txt")


if __name__ == "__main__":
    run_stage("probe", body, doc=__doc__, arguments={"--mode": "loop or raise"})
'''


def wait_for(what, condition, timeout=60, proc=None):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert proc is None or proc.poll() is None, f"{what}: the process exited ({proc.returncode})"
        assert time.time() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)
    return value


class Server:
    """`mlflow server` on 127.0.0.1 with its SQLite store and artifacts in `folder`; `kill` is a crash (SIGKILL to
    its process group), `start` again serves the same store on the same port."""

    def __init__(self, folder):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = folder / "mlflow.db"
        self.proc = None

    def start(self):
        cmd = [
            *(str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination", str(self.folder / "art")),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.folder / "server.log", "a") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("mlflow server", self.healthy, timeout=120, proc=self.proc)

    def healthy(self):
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
            self.proc = None

    def runs(self, experiment):
        """[(run_id, status)] of an experiment, oldest first, read from the server's store."""
        if not self.db.exists():
            return []
        with sqlite3.connect(self.db) as db:
            return db.execute(
                "select r.run_uuid, r.status from runs r join experiments e using (experiment_id) where e.name = ? "
                "order by r.start_time",
                (experiment,),
            ).fetchall()

    def steps(self, run_id):
        """The steps of the run's `loss`, in order, each as often as the store holds it."""
        with sqlite3.connect(self.db) as db:
            rows = db.execute("select step from metrics where run_uuid = ? and key = 'loss' order by step", (run_id,))
            return [step for (step,) in rows]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def server(mlflow_server):
    """The module's server, answering (a test may leave it killed); each test uses an experiment of its own."""
    if not mlflow_server.healthy():
        mlflow_server.kill()
        mlflow_server.start()
    return mlflow_server


def stage_env(uri, **extra):
    """The environment of a stage process sending to `uri`, with the project's own MLflow HTTP settings."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    for key in [k for k in env if k.startswith("MLFLOW_HTTP_REQUEST") or k.startswith("DISTILLERY_")]:
        del env[key]
    return {**env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


class Probe:
    """The probe stage in a directory of its own (the micro profile as params.yaml), as a running process."""

    def __init__(self, folder, uri, experiment, mode="loop", retry_s=30):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        (folder / "probe.py").write_text(PROBE)
        shutil.copy(ROOT / "profiles" / "micro.yaml", folder / "params.yaml")
        (folder / "stop").unlink(missing_ok=True)
        (folder / "steps").unlink(missing_ok=True)
        env = stage_env(uri, DISTILLERY_EXPERIMENT=experiment, PROBE_RETRY_S=str(retry_s))
        self.proc = subprocess.Popen(
            [sys.executable, "probe.py", "--mode", mode],
            cwd=folder,
            env=env,
            # a runner started in the background (`make … &`) passes SIGINT on ignored, which a stage keeps ignored
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def steps(self):
        text = (self.folder / "steps").read_text() if (self.folder / "steps").exists() else ""
        return int(text) if text else 0

    def wait_steps(self, n):
        return wait_for(f"probe step {n}", lambda: self.steps() >= n and self.steps(), proc=self.proc)

    def finish(self, timeout=60):
        """Let the loop end; (return code, stderr)."""
        (self.folder / "stop").touch()
        return self.wait(timeout)

    def wait(self, timeout=60):
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return self.proc.returncode, err

    def unsynced(self):
        return sorted((self.folder / "mlruns-unsynced").glob("*.json"))


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_server_that_dies_mid_run_costs_the_stage_nothing_and_its_metrics_arrive(server, tmp_path):
    experiment = "outage-mid-run"
    probe = Probe(tmp_path / "work", server.uri, experiment, retry_s=1)
    try:
        probe.wait_steps(5)
        ((run_id, _),) = wait_for("the run on the server", lambda: server.runs(experiment), proc=probe.proc)
        wait_for("metrics on the server", lambda: server.steps(run_id), proc=probe.proc)
        server.kill()
        down_at = probe.steps()
        probe.wait_steps(down_at + 6)  # it trains on while the server is down
        server.start()
        # the held metrics arrive while the stage still runs (its next logging call after the retry interval)
        wait_for("held metrics after the restart", lambda: down_at + 5 in server.steps(run_id), 30, probe.proc)
        server.kill()  # down again when the stage ends: what the server lacks goes to a file
        probe.wait_steps(probe.steps() + 5)
        code, err = probe.finish()
    finally:
        if probe.proc.poll() is None:
            probe.proc.kill()
    total = probe.steps()
    assert code == 0, err
    assert "MLflow unreachable" in err and "`distillery sync` sends them" in err
    (kept,) = probe.unsynced()
    record = strict_json(kept)
    assert (
        record["run_id"] == run_id
        and record["status"] == "FINISHED"
        and record["artifacts"] == [f"{kept.stem}/out.txt"]
    )
    assert {m["step"] for m in record["metrics"]} <= set(range(total)) and record["metrics"]
    assert len(server.steps(run_id)) < total and server.runs(experiment) == [(run_id, "RUNNING")]

    server.start()
    sync = subprocess.run(
        [BIN / "distillery", "sync"], cwd=probe.folder, env=stage_env(server.uri), capture_output=True, text=True
    )
    assert sync.returncode == 0, sync.stderr
    assert probe.unsynced() == [] and not kept.with_suffix("").exists()
    assert server.steps(run_id) == list(range(total))  # every step, once
    assert server.runs(experiment) == [(run_id, "FINISHED")]
    assert list((server.folder / "art").rglob("out.txt"))


def test_an_unreachable_server_at_the_start_costs_seconds_and_the_stage_succeeds(server, tmp_path):
    repo = new_project(tmp_path / "repo")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "stages.data"],
        cwd=repo,
        env=stage_env(uri),
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.time() - start
    assert result.returncode == 0, result.stderr
    assert took < 30, f"the data stage took {took:.0f} s with the tracking server unreachable"
    assert (repo / "data" / "dataset.npz").is_file()
    (kept,) = (repo / "mlruns-unsynced").glob("data-*.json")
    record = strict_json(kept)
    assert record["run_id"] is None and record["status"] == "FINISHED" and record["experiment"] == "distillery-micro"
    assert record["tags"]["dvc_stage"] == "data" and record["params"]["profile"] == "micro"
    assert {m["key"] for m in record["metrics"]} >= {"num_images", "resolution"}
    assert f"kept in {kept}" in result.stderr

    sync = subprocess.run(
        [BIN / "distillery", "sync"], cwd=repo, env=stage_env(server.uri), capture_output=True, text=True
    )
    assert sync.returncode == 0, sync.stderr
    assert not kept.exists() and [status for _, status in server.runs("distillery-micro")] == ["FINISHED"]
    ((run_id, _),) = server.runs("distillery-micro")
    with sqlite3.connect(server.db) as db:
        metrics = dict(db.execute("select key, value from metrics where run_uuid = ?", (run_id,)))
        params = dict(db.execute("select key, value from params where run_uuid = ?", (run_id,)))
        tags = dict(db.execute("select key, value from tags where run_uuid = ?", (run_id,)))
    assert metrics["num_images"] == next(m["value"] for m in record["metrics"] if m["key"] == "num_images")
    assert params == record["params"] and tags["dvc_stage"] == "data" and tags["mlflow.runName"] == "data"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_run_killed_and_the_stage_dies_of_it(server, tmp_path, stop):
    experiment = f"outage-{stop.name}"
    probe = Probe(tmp_path, server.uri, experiment)
    probe.wait_steps(3)
    probe.proc.send_signal(stop)
    code, err = probe.wait()
    assert code == -stop, err  # as without a handler: DVC and shells see the signal
    assert f"stopped by {stop.name}" in err and "Traceback" not in err
    assert server.runs(experiment)[0][1] == "KILLED"
    assert probe.unsynced() == []


def test_an_exception_ends_the_run_failed(server, tmp_path):
    probe = Probe(tmp_path, server.uri, "outage-raise", mode="raise")
    code, err = probe.wait()
    assert code == 1 and "the probe fails on purpose" in err
    assert [status for _, status in server.runs("outage-raise")] == ["FAILED"]


def test_a_run_left_running_by_sigkill_ends_killed_at_the_next_start(server, tmp_path):
    experiment = "outage-sigkill"
    probe = Probe(tmp_path / "first", server.uri, experiment)
    probe.wait_steps(3)
    probe.proc.kill()
    probe.wait()
    assert [status for _, status in server.runs(experiment)] == ["RUNNING"]  # nobody could end it
    again = Probe(tmp_path / "again", server.uri, experiment, mode="raise")
    code, err = again.wait()
    assert code == 1, err
    assert [status for _, status in server.runs(experiment)] == ["KILLED", "FAILED"]
    assert "its process is gone; ended KILLED" in err
