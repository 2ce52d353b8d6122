"""The micro DAG on a Prefect work pool, as on a lab's machines: `distillery cluster up` starts PostgreSQL, SeaweedFS's
S3 gateway, the Prefect server and the MLflow server on 127.0.0.1; two `distillery worker`s serve the pool from two
clones of a git origin; a third clone coordinates with `distillery run --pool`. One worker is killed (its whole
process tree, as a machine dies) during a distill stage once a checkpoint of it is in the remote: the stage is
retried on the other worker, resumes from that checkpoint, and every output equals a plain `dvc repro` of the same
params. A fourth, fresh clone gets the table back with `dvc pull`, `dvc status` clean; the MLflow server holds a
finished run of every stage; nothing listens beyond loopback.

Slow (four servers, the DAG twice, a crash detected by missed heartbeats): `make test-cluster`."""

import csv
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from browser import CHROMIUM, chromium
from faults.faultkit import digest, fault_params, stage_outputs
from test_cluster_servers import cluster, cluster_listeners, listening, s3, socket_inodes  # noqa: F401 (a fixture)

from conftest import BIN, new_project, sh, tool_env

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

POOL = "lab"
# long enough that the kill lands in training with a checkpoint in the remote (seconds per distill stage)
PARAMS = {"distill": {"duration_kimg": 0.768, "checkpoint_kimg": 0.064, "monitor_kimg": 0.384}}


def machine_env(cluster_env, home):
    """A machine of the lab: the servers from cluster.env, its own Prefect home, its clone's code, one OpenMP thread
    (bit identity with the reference, which runs with one)."""
    env = tool_env(
        {**cluster_env, "PREFECT_HOME": str(home / ".prefect-home"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(home)}
    )
    return {**env, "MLFLOW_TRACKING_URI": cluster_env["MLFLOW_TRACKING_URI"]}  # tool_env drops it: tests log locally


def tree(pid):
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stage_process(run):
    """The live process of `python -m stages.distill --run <run>`, or None."""
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        if "stages.distill" in args and run in args:
            return proc
    return None


def comparable(path):
    """An output's bits as compared with the reference: JSON without its timing fields, the results table without
    its images/s column (both measure this machine's speed at that moment)."""
    if path.name == "results.csv":
        rows = list(csv.reader(path.read_text().splitlines()))
        speed = rows[0].index("images/s")
        return [row[:speed] + row[speed + 1 :] for row in rows]
    if path.name == "results.md":
        lines = path.read_text().splitlines()
        header = next(i for i, line in enumerate(lines) if "images/s" in line)
        speed = [c.strip() for c in lines[header].split("|")].index("images/s")
        return [
            "|".join(c for k, c in enumerate(line.split("|")) if k != speed) if line.startswith("|") else line
            for line in lines
        ]
    return digest(path)


def until(what, condition, timeout, poll=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture(scope="module")
def lab(cluster, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """An origin with the micro project (S3 remote configured) and the reference built from it by `dvc repro`."""
    d, info, env = cluster
    root = tmp_path_factory.mktemp("lab")
    seed = new_project(root / "seed")
    fault_params(seed, **PARAMS)
    sh(["dvc", "remote", "add", "-d", "lab", env["DISTILLERY_DVC_REMOTE"]], seed)
    sh(["dvc", "remote", "modify", "lab", "endpointurl", env["AWS_ENDPOINT_URL"]], seed)
    sh(["git", "add", "-A"], seed)
    sh(["git", "commit", "-qm", "the lab's params and remote"], seed)
    sh(["git", "clone", "-q", "--bare", str(seed), str(root / "origin.git")], root)
    reference = root / "reference"
    sh(["git", "clone", "-q", str(root / "origin.git"), str(reference)], root)
    sh(["dvc", "repro"], reference, extra_env={"OMP_NUM_THREADS": "1"})  # the local store: not the lab's MLflow
    return root, env, reference


@pytest.fixture
def shots(tmp_path):
    path = Path(os.environ.get("DISTILLERY_SCREENSHOTS") or tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def api(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def test_the_dag_runs_on_two_workers_survives_a_dead_one_and_equals_dvc_repro(cluster, lab, shots):  # noqa: F811
    d, info, _ = cluster
    root, env, reference = lab
    clones = {name: root / name for name in ("w1", "w2", "coordinator", "fresh")}
    for name in ("w1", "w2", "coordinator"):
        sh(["git", "clone", "-q", str(root / "origin.git"), str(clones[name])], root)
    workers, logs = {}, {}
    coordinator = None
    try:
        for name in ("w1", "w2"):
            logs[name] = root / f"{name}.log"
            workers[name] = subprocess.Popen(
                [str(BIN / "distillery"), "worker", "--pool", POOL, "--name", name],
                cwd=clones[name],
                env=machine_env(env, clones[name]),
                stdout=open(logs[name], "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        timeline = root / "timeline.json"
        coordinator_log = root / "coordinator.log"
        coordinator = subprocess.Popen(
            [str(BIN / "distillery"), "run", "--pool", POOL, "--max-parallel", "4", "--retries", "1"]
            + ["--timeline", str(timeline)],
            cwd=clones["coordinator"],
            env=machine_env(env, clones["coordinator"]),
            stdout=open(coordinator_log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        # a distill stage with a checkpoint in the remote: its worker dies, whole
        bucket, client = "distillery", s3(env)

        def checkpointed_distill():
            for run in ("sid-1e-4", "sid-3e-5"):
                key = f"dvc/distillery/checkpoints/distill-{run}/manifest.json"
                if client.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount") and stage_process(run):
                    return run, stage_process(run)
            assert coordinator.poll() is None, coordinator_log.read_text()[-3000:]
            return None

        run, proc = until("a distill stage with a checkpoint in the remote", checkpointed_distill, 900)
        victim = next(name for name, w in workers.items() if proc in tree(w.pid))
        # mid-run, nothing listens beyond loopback: not the servers, the workers, their stages nor the coordinator
        tables = listening()
        ours = [p for w in [coordinator, *workers.values()] for p in tree(w.pid)]
        inodes = set().union(*(socket_inodes(p.pid) for p in ours))
        addresses = [tables[i] for i in inodes if i in tables]
        addresses += [a for server in cluster_listeners(info).values() for a in server]
        assert addresses and all(host == "127.0.0.1" for host, _ in addresses), addresses
        for p in tree(workers[victim].pid):
            p.send_signal(signal.SIGKILL)
        workers[victim].wait()

        assert coordinator.wait(timeout=1200) == 0, coordinator_log.read_text()[-5000:]
    finally:
        for proc in [coordinator, *workers.values()]:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)

    states = json.loads(timeline.read_text())
    stages = list(states)
    assert all(s["state"] == "Completed" and s["ran"] for s in states.values()), states
    survivor = "w2" if victim == "w1" else "w1"
    assert {s["worker"] for s in states.values()} <= {"w1", "w2"}  # every stage ran on a worker
    assert states[f"distill@{run}"]["attempts"] == 2 and states[f"distill@{run}"]["worker"] == survivor
    assert "it resumes from them" in logs[survivor].read_text()

    # the outputs are those of `dvc repro`, bit for bit (JSON without its timing fields)
    coordinator_repo = clones["coordinator"]
    for stage in stages:
        for path in stage_outputs(reference, stage):
            assert comparable(coordinator_repo / path) == comparable(reference / path), (stage, path)
    assert sh(["dvc", "status", "--json"], coordinator_repo).stdout.strip() == "{}"

    # the table back in a fresh clone: git carries dvc.lock and the metrics, the S3 remote the rest
    sh(["git", "add", "-A"], coordinator_repo)
    sh(["git", "commit", "-qm", "results of the pool run"], coordinator_repo)
    sh(["git", "push", "-q", "origin", "HEAD"], coordinator_repo)
    sh(["git", "clone", "-q", str(root / "origin.git"), str(clones["fresh"])], root)
    sh(["dvc", "pull"], clones["fresh"], extra_env=env)
    assert sh(["dvc", "status", "--json"], clones["fresh"]).stdout.strip() == "{}"
    for path in ("reports/results.md", "reports/results.csv", "metrics/eval/sid-1e-4.json"):
        assert (clones["fresh"] / path).read_bytes() == (coordinator_repo / path).read_bytes(), path

    # the MLflow server (PostgreSQL) holds a finished run of every stage
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    finished = {
        r.data.tags.get("dvc_stage")
        for e in mlflow.search_experiments()
        for r in mlflow.search_runs([e.experiment_id], "attributes.status = 'FINISHED'", max_results=1000)
    }
    assert set(stages) <= finished, set(stages) - finished

    # in the Prefect UI every stage is a subflow run of the coordinator's flow, taken by a worker
    prefect = env["PREFECT_API_URL"]
    (flow_run,) = api(f"{prefect}/flow_runs/filter", {"flows": {"name": {"any_": ["distillery"]}}})
    subflows = api(f"{prefect}/flow_runs/filter", {"flows": {"name": {"any_": ["distillery-stage"]}}})
    assert {r["name"] for r in subflows} == set(stages) | {f"distill@{run} (retry 1)"}
    assert all(r["parent_task_run_id"] and r["work_pool_name"] == POOL for r in subflows)
    if CHROMIUM.exists():
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"{prefect.removesuffix('/api')}/runs/flow-run/{flow_run['id']}")
            page.get_by_text("Subflow Runs", exact=True).first.click()
            page.get_by_text(f"distill@{run} (retry 1)").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "prefect-pool-subflows.png"))
