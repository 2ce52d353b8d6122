"""Prefect runs the DVC DAG: one task per DVC stage, independent stages concurrently, DVC stays the truth.

The stage graph comes from DVC itself (`Repo.index.graph`). A task skips its stage when DVC says it is
up to date, otherwise runs the stage's command with its own GPU group (`CUDA_VISIBLE_DEVICES`), streams
the output into the Prefect task log, and records the outputs with `dvc commit` under a lock (DVC
refuses concurrent writers). Afterwards `dvc status` is clean and `dvc repro` has nothing to do.
"""

import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

DVC_LOCK = threading.Lock()  # one DVC writer (and reader of the lock file) at a time in this process


def open_repo(root):
    from dvc.repo import Repo

    return Repo(str(root))


def stage_graph(root):
    """{stage name: [upstream stage names]} in DVC's own order, from DVC's stage graph."""
    with DVC_LOCK:
        repo = open_repo(root)
        try:
            graph = repo.index.graph  # edges point from a stage to the stages it depends on
            return {s.addressing: sorted(u.addressing for u in graph.successors(s)) for s in graph.nodes if s.cmd}
        finally:
            repo.close()


def stage_changed(root, name):
    with DVC_LOCK:
        repo = open_repo(root)
        try:
            with repo.lock:
                (stage,) = repo.stage.collect(name)
                return stage.changed(), stage.cmd
        finally:
            repo.close()


def commit_stage(root, name):
    """Record the stage's deps, params and outputs in dvc.lock and the cache; returns {out path: hash}."""
    with DVC_LOCK:
        repo = open_repo(root)
        try:
            repo.commit(name, force=True)
            (stage,) = repo.stage.collect(name)
            return {str(out.def_path): out.hash_info.value for out in stage.outs}
        finally:
            repo.close()


class GPUPool:
    """Hands out disjoint GPU groups; with no GPUs every stage gets the CPU (an empty group)."""

    def __init__(self, gpus, per_stage, cpu_threads=None):
        self.cpu_threads = cpu_threads  # CPU stages share the cores: oversubscribed OpenMP threads spin-wait
        self._free = queue.Queue()
        groups = [gpus[i : i + per_stage] for i in range(0, len(gpus) - per_stage + 1, per_stage)] if gpus else [[]]
        for group in groups:
            self._free.put(group)
        self.size = len(groups) if gpus else None  # None: unlimited CPU slots

    @contextmanager
    def acquire(self):
        if self.size is None:
            yield []
            return
        group = self._free.get()
        try:
            yield group
        finally:
            self._free.put(group)


DDP_STAGES = ("distill@",)  # stages whose code shards work over torch.distributed ranks


def stage_command(name, cmd, group):
    """The stage command, under torchrun when a DDP-capable stage gets more than one GPU."""
    args = shlex.split(cmd)
    if len(group) > 1 and name.startswith(DDP_STAGES) and args[:2] == ["python", "-m"]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={len(group)}",
            "-m",
            *args[2:],
        ]
    if args[:1] == ["python"]:
        args[0] = sys.executable
    return args


# The GPU pool of the running flow: tasks run in this process's threads and share it.
POOL = GPUPool([], 1)


@task(cache_policy=NO_CACHE)
def run_stage(root: str, name: str, parent_run_id: str | None):
    """Run one DVC stage if DVC says it changed; returns its outputs' paths and hashes."""
    logger = get_run_logger()
    task_started = time.time()
    changed, cmd = stage_changed(root, name)
    if not changed:
        logger.info("%s is up to date (DVC); skipped", name)
        return {"stage": name, "ran": False, "outs": {}, "task_started": task_started, "task_finished": time.time()}
    with POOL.acquire() as group:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, group))}
        if not group and POOL.cpu_threads:
            env.setdefault("OMP_NUM_THREADS", str(POOL.cpu_threads))
        if parent_run_id:
            env["DISTILLERY_PARENT_RUN_ID"] = parent_run_id
        args = stage_command(name, cmd, group)
        logger.info("running %s on %s: %s", name, f"GPUs {group}" if group else "CPU", " ".join(args))
        started = time.time()
        proc = subprocess.Popen(
            args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        for line in proc.stdout:
            logger.info(line.rstrip())
        if proc.wait() != 0:
            raise RuntimeError(f"stage {name} failed with exit code {proc.returncode}")
        finished = time.time()
    outs = commit_stage(root, name)
    logger.info("%s recorded in DVC: %s", name, outs)
    return {
        "stage": name,
        "ran": True,
        "outs": outs,
        "started": started,
        "finished": finished,
        "task_started": task_started,
        "task_finished": time.time(),
    }


def topological(graph):
    order, seen = [], set()

    def visit(name):
        if name not in seen:
            seen.add(name)
            for u in graph[name]:
                visit(u)
            order.append(name)

    for name in graph:
        visit(name)
    return order


class StagesFailed(RuntimeError):
    def __init__(self, states):
        self.states = states
        failed = [name for name, state in states.items() if not state.is_completed()]
        super().__init__(f"stages failed or not run: {', '.join(failed)}")


@flow(name="distillery")
def pipeline_flow(
    root: str, gpus: list[int], gpus_per_stage: int, retries: int, max_parallel: int, parent_run_id: str | None = None
):
    global POOL
    POOL = GPUPool(gpus, gpus_per_stage, cpu_threads=max(1, (os.cpu_count() or 1) // max_parallel))
    graph = stage_graph(root)
    futures = {}
    for name in topological(graph):
        upstream = [futures[u] for u in graph[name]]
        futures[name] = run_stage.with_options(task_run_name=name, retries=retries).submit(
            root, name, parent_run_id, wait_for=upstream
        )
    wait(list(futures.values()))
    states = {name: f.state for name, f in futures.items()}
    if not all(state.is_completed() for state in states.values()):
        raise StagesFailed(states)  # the flow run ends Failed; finished stages stay recorded in DVC
    return states


def run(root=".", gpus=(), gpus_per_stage=1, max_parallel=2, retries=0):
    """Run the DAG under Prefect inside one MLflow parent run; returns {stage: final Prefect state}.

    Raises StagesFailed (carrying every stage's state) when a stage failed; its downstream stages do not run."""
    from pipeline.tracking import parent_run

    root = str(Path(root).resolve())
    runner = ThreadPoolTaskRunner(max_workers=max_parallel)
    with parent_run(root, "distillery run") as run_id:
        return pipeline_flow.with_options(task_runner=runner)(
            root, list(gpus), gpus_per_stage, retries, max_parallel, run_id
        )
