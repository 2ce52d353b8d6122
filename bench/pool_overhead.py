"""Overhead per stage of a Prefect work pool (`distillery run --pool`) next to `distillery run` on one machine.

Brings up the lab's servers on 127.0.0.1 (`distillery cluster up`: PostgreSQL, SeaweedFS's S3, Prefect, MLflow),
builds the micro profile twice from scratch in two clones of one origin, one stage at a time each:
  - local: `distillery run --max-parallel 1` in a clone;
  - pool: `distillery run --pool bench --max-parallel 1` in a clone, one `distillery worker` in another.
Per stage the overhead is the task's wall time minus the stage command's own time: on one machine the DVC checks
and `dvc commit`; on the pool also the flow run's scheduling, the worker's checkout, `dvc pull` of the inputs,
`dvc push` of the outputs and the coordinator's pull and commit, all through the S3 remote. Both share the servers
(the local run logs to the same MLflow), so the difference is the pool's own.
    .venv/bin/python bench/pool_overhead.py
Target: pool overhead per stage <= 15 s (mean), on the 2-core CPU machine.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from pipeline.cluster import running  # noqa: E402

from conftest import new_project, sh, tool_env  # noqa: E402

DISTILLERY = str(Path(sys.executable).parent / "distillery")


def overheads(timeline):
    ran = {n: t for n, t in json.loads(timeline.read_text()).items() if t.get("ran")}
    return {n: ((t["task_finished"] - t["task_started"]) - (t["finished"] - t["started"]), t) for n, t in ran.items()}


def main():
    work = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    for p in [work, *work.parents]:  # PostgreSQL runs as its own user under root: it must reach the cluster folder
        p.chmod(p.stat().st_mode | 0o001)
    try:
        with running(work / "cluster"):
            env = dict(
                line.removeprefix("export ").split("=", 1)
                for line in (work / "cluster" / "cluster.env").read_text().splitlines()
            )
            env = {k: v.strip("'") for k, v in env.items()}
            seed = new_project(work / "seed")
            sh(["dvc", "remote", "add", "-d", "lab", env["DISTILLERY_DVC_REMOTE"]], seed)
            sh(["dvc", "remote", "modify", "lab", "endpointurl", env["AWS_ENDPOINT_URL"]], seed)
            sh(["git", "commit", "-qam", "remote"], seed)
            sh(["git", "clone", "-q", "--bare", str(seed), str(work / "origin.git")], work)
            for name in ("local", "worker", "coordinator"):
                sh(["git", "clone", "-q", str(work / "origin.git"), str(work / name)], work)

            def machine(name):
                return {**env, "PREFECT_HOME": str(work / name / ".prefect-home"), "OMP_NUM_THREADS": "1"}

            started = time.perf_counter()
            sh(
                [DISTILLERY, "run", "--max-parallel", "1", "--timeline", str(work / "local.json")],
                work / "local",
                extra_env=machine("local"),
            )
            local_total = time.perf_counter() - started

            log = open(work / "worker.log", "w")
            worker = subprocess.Popen(
                [DISTILLERY, "worker", "--pool", "bench", "--name", "bench-worker"],
                cwd=work / "worker",
                env=tool_env(machine("worker")),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                started = time.perf_counter()
                sh(
                    [
                        DISTILLERY,
                        "run",
                        "--pool",
                        "bench",
                        "--max-parallel",
                        "1",
                        "--timeline",
                        str(work / "pool.json"),
                    ],
                    work / "coordinator",
                    extra_env=machine("coordinator"),
                )
                pool_total = time.perf_counter() - started
            finally:
                os.killpg(worker.pid, 15)
                worker.wait(timeout=60)

        local, pool = overheads(work / "local.json"), overheads(work / "pool.json")
        print(f"{'stage':<22}{'stage s':>9}{'local overhead s':>18}{'pool overhead s':>17}")
        for name in local:
            print(
                f"{name:<22}{local[name][1]['finished'] - local[name][1]['started']:9.1f}"
                f"{local[name][0]:18.2f}{pool[name][0]:17.2f}"
            )
        lm, pm = statistics.mean(v for v, _ in local.values()), statistics.mean(v for v, _ in pool.values())
        print(f"mean overhead per stage: local {lm:.2f} s, pool {pm:.2f} s (ratio {pm / lm:.1f}x; target <= 15 s)")
        print(f"whole DAG ({len(local)} stages, one at a time): local {local_total:.0f} s, pool {pool_total:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
