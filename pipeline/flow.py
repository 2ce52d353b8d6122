"""Prefect runs the DVC DAG: one task per DVC stage, independent stages concurrently, DVC stays the truth.

The stage graph comes from DVC itself (`Repo.index.graph`). A task skips its stage when DVC says it is
up to date, otherwise runs the stage's command with its own GPU group (`CUDA_VISIBLE_DEVICES`), streams
the output into the Prefect task log, and records the outputs with `dvc commit` under a lock (DVC
refuses concurrent writers). Afterwards `dvc status` is clean and `dvc repro` has nothing to do.

The flow holds the repository lock (pipeline/repo_lock.py) for its whole run, its stage processes share it, and
a stopped flow (Ctrl-C, SIGTERM) stops them: none runs on after it.
"""

import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline import events
from pipeline.driver import DRIVER_ENV, terminate
from pipeline.repo_lock import repository_lock

DVC_LOCK = threading.Lock()  # one DVC writer (and reader of the lock file) at a time in this process


def open_repo(root):
    from dvc.repo import Repo

    # wait for DVC's lock, as `dvc --wait-for-lock` does: a `dvc repro` holding it while its stage is refused our
    # repository lock ends soon, and failing here would leave a computed stage unrecorded
    return Repo(str(root), _wait_for_lock=True)


@contextmanager
def dvc_repo(root):
    """DVC's repository at `root`, opened for the with-block by one thread of this process at a time."""
    with DVC_LOCK:
        repo = open_repo(root)
        try:
            yield repo
        finally:
            repo.close()


def stage_graph(root):
    """{stage name: [upstream stage names]} in DVC's own order, from DVC's stage graph."""
    with dvc_repo(root) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        return {s.addressing: sorted(u.addressing for u in graph.successors(s)) for s in graph.nodes if s.cmd}


def stage_changed(root, name):
    with dvc_repo(root) as repo, repo.lock:
        (stage,) = repo.stage.collect(name)
        return stage.changed(), stage.cmd


def commit_stage(root, name):
    """Record the stage's deps, params and outputs in dvc.lock and the cache; returns {out path: hash}."""
    with dvc_repo(root) as repo:
        repo.commit(name, force=True)
        (stage,) = repo.stage.collect(name)
        return {str(out.def_path): out.hash_info.value for out in stage.outs}


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


# stages whose code shards work over torch.distributed ranks ("evaluate" covers evaluate_fewstep@ too)
DDP_STAGES = ("distill@", "distill_fewstep@", "teacher_samples", "evaluate")


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
            "--",  # what follows is the stage's: torchrun would take `--run` for its own `--run-path`
            *args[2:],
        ]
    if args[:1] == ["python"]:
        args[0] = sys.executable
    return args


# The GPU pool of the running flow: tasks run in this process's threads and share it.
POOL = GPUPool([], 1)

RUNNING = set()  # the stage processes of the running flow (Popen)
RUNNING_LOCK = threading.Lock()
STOPPING = threading.Event()  # set when the flow is stopped: no stage starts after it


def start_stage(args, **kwargs):
    with RUNNING_LOCK:
        if STOPPING.is_set():
            raise RuntimeError("the flow is stopping: stage not started")
        proc = subprocess.Popen(args, **kwargs)
        RUNNING.add(proc)
    return proc


def stop_stages():
    """End the running stage processes and their children (SIGTERM, then SIGKILL after a grace period)."""
    with RUNNING_LOCK:
        STOPPING.set()
        running = list(RUNNING)
    terminate(running)


def artifact_key(*parts):
    """A Prefect artifact key (lowercase letters, digits, dashes) from a stage name."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


class Artifacts:
    """Turns the events a stage process prints (pipeline/events.py) into the task's Prefect artifacts."""

    def __init__(self, name, logger):
        self.name, self.logger = name, logger
        self.progress_id = None

    def __call__(self, event):
        kind = event["kind"]
        if kind == "mlflow_run":
            self.logger.info("MLflow run of %s: %s", self.name, event["url"])
            create_link_artifact(
                event["url"],
                link_text=f"MLflow run of {self.name}",
                key=artifact_key("mlflow", self.name),
                description=f"{self.name}: its params, metrics over training and artifacts in MLflow",
            )
        elif kind == "progress":
            percent = min(100.0, 100 * event["kimg"] / event["total_kimg"])
            text = progress_text(event)
            if self.progress_id is None:
                self.progress_id = create_progress_artifact(
                    percent, key=artifact_key("progress", self.name), description=text
                )
            else:
                update_progress_artifact(self.progress_id, percent, description=text)
        elif kind == "table":
            create_table_artifact(event["table"], key=artifact_key(event["key"]), description=event["description"])


def progress_text(event):
    eta = event["eta_s"]
    fid = event["fid"]
    return " · ".join(
        [
            f"**{event['stage']}**: {event['kimg']:.2f} / {event['total_kimg']:g} kimg",
            f"{event['images_per_s']:.1f} images/s",
            "ETA " + (f"{eta / 60:.1f} min" if eta is not None else "unknown"),
            "monitoring FID " + (f"{fid:.3f}" if fid is not None else "not measured yet"),
        ]
    )


def execute(root, name, cmd, group, parent_run_id, logger, cpu_threads=None):
    """Run stage `name`'s command on the GPU ids `group` (none: the CPU, `cpu_threads` OpenMP threads), its output
    into `logger` and its events into the running task's or flow's artifacts; raises when it fails. Returns its
    start and finish times."""
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": ",".join(map(str, group)),
        "DISTILLERY_EVENTS": "1",
        DRIVER_ENV: str(os.getpid()),  # the stage ends itself if this process dies
    }
    if not group and cpu_threads:
        env.setdefault("OMP_NUM_THREADS", str(cpu_threads))
    if parent_run_id:
        env["DISTILLERY_PARENT_RUN_ID"] = parent_run_id
    args = stage_command(name, cmd, group)
    logger.info("running %s on %s: %s", name, f"GPUs {group}" if group else "CPU", " ".join(args))
    started = time.time()
    proc = start_stage(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        artifacts = Artifacts(name, logger)
        for line in proc.stdout:
            text, event = events.parse(line)
            if text.strip() or event is None:
                logger.info(text.rstrip())
            if event is not None:
                artifacts(event)
        if proc.wait() != 0:
            raise RuntimeError(f"stage {name} failed with exit code {proc.returncode}")
    finally:
        with RUNNING_LOCK:
            RUNNING.discard(proc)
    return started, time.time()


def skipped(name, logger, task_started):
    """The end of a task whose stage DVC says is up to date: the state `Cached`, not `Completed`."""
    logger.info("%s is up to date (DVC); skipped", name)
    result = {"stage": name, "ran": False, "outs": {}, "task_started": task_started, "task_finished": time.time()}
    return Completed(name="Cached", message="up to date in DVC: not run", data=result)


@task(cache_policy=NO_CACHE)
def run_stage(root: str, name: str, parent_run_id: str | None):
    """Run one DVC stage if DVC says it changed; returns its outputs' paths and hashes (a stage DVC skips ends in
    the state `Cached`, not `Completed`)."""
    logger = get_run_logger()
    task_started = time.time()
    changed, cmd = stage_changed(root, name)
    if not changed:
        return skipped(name, logger, task_started)
    with POOL.acquire() as group:
        started, finished = execute(root, name, cmd, group, parent_run_id, logger, POOL.cpu_threads)
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


RESULTS = "reports/results.md"


@flow(name="distillery")
def pipeline_flow(
    root: str,
    gpus: list[int],
    gpus_per_stage: int,
    retries: int,
    max_parallel: int,
    parent_run_id: str | None = None,
    mlflow_url: str | None = None,
    pool: str | None = None,
    commit: str | None = None,
):
    """Every stage of the DAG as a task once its upstream stages are done: run here on this machine's GPU groups, or
    with `pool` as a flow run on that Prefect work pool's workers (pipeline/pool.py) at git `commit`."""
    global POOL
    POOL = GPUPool(gpus, gpus_per_stage, cpu_threads=max(1, (os.cpu_count() or 1) // max_parallel))
    if mlflow_url:
        get_run_logger().info("MLflow runs of this flow: %s", mlflow_url)
        create_link_artifact(
            mlflow_url,
            link_text="MLflow runs of this flow",
            key="mlflow-pipeline",
            description="The MLflow run that groups the stage runs of this flow",
        )
    graph = stage_graph(root)
    futures = {}
    STOPPING.clear()
    if pool:
        from pipeline.pool import deploy, run_on_pool

        deployment = deploy(pool, commit)
    try:
        for name in topological(graph):
            upstream = [futures[u] for u in graph[name]]
            if pool:
                futures[name] = run_on_pool.with_options(task_run_name=name).submit(
                    root,
                    name,
                    deployment,
                    commit,
                    graph[name],
                    gpus_per_stage,
                    parent_run_id,
                    retries,
                    wait_for=upstream,
                )
            else:
                futures[name] = run_stage.with_options(task_run_name=name, retries=retries).submit(
                    root, name, parent_run_id, wait_for=upstream
                )
        wait(list(futures.values()))
    except BaseException:
        # Ctrl-C or SIGTERM (Prefect's TerminationSignal): the task threads, which the task runner waits for on the
        # way out, wait for their stage processes, so those are ended first
        stop_stages()
        raise
    states = {name: f.state for name, f in futures.items()}
    results = Path(root) / RESULTS
    if "report" in states and states["report"].is_completed() and results.is_file():
        # the figures' relative links would not resolve in the Prefect UI: name the files instead
        text = re.sub(r"!\[([^]]*)\]\(([^)]+)\)", r"(figure: reports/\2)", results.read_text())
        create_markdown_artifact(
            text, key="results", description="The results table (reports/results.md), as DVC records it"
        )
    if not all(state.is_completed() for state in states.values()):
        raise StagesFailed(states)  # the flow run ends Failed; finished stages stay recorded in DVC
    return states


def run(root=".", gpus=(), gpus_per_stage=1, max_parallel=2, retries=0, pool=None):
    """Run the DAG under Prefect inside one MLflow parent run, holding the repository lock; returns {stage: final
    Prefect state}. With `pool`, the stages run on that work pool's workers (`gpus_per_stage` GPUs of theirs each).

    The flow run is named after the profile and the git commit and tagged with both and the GPUs.
    Raises StagesFailed (carrying every stage's state) when a stage failed; its downstream stages do not run.
    Raises repo_lock.Held, before anything runs, when another process holds the repository lock; pool.PoolError
    when the commit or the DVC remote is not one the workers can reach."""
    from prefect import tags

    from pipeline.params import load_params
    from pipeline.tracking import git_commit, parent_run, ui_url

    root = str(Path(root).resolve())
    runner = ThreadPoolTaskRunner(max_workers=max_parallel)
    profile = load_params(Path(root) / "params.yaml").profile
    os.environ["DISTILLERY_ROOT"] = root
    commit = git_commit()
    if pool:
        from pipeline.pool import check_remote, ensure_crash_detection, shared_commit

        commit = shared_commit(root)
        check_remote(root)
        ensure_crash_detection()
    where = f"pool:{pool}" if pool else f"gpus:{','.join(map(str, gpus))}" if gpus else "gpus:none (CPU)"
    with (
        repository_lock(root),
        parent_run(root, "distillery run") as info,
        tags(f"profile:{profile}", f"commit:{commit[:8]}", where),
    ):
        return pipeline_flow.with_options(task_runner=runner, flow_run_name=f"{profile} @ {commit[:8]}")(
            root,
            list(gpus),
            gpus_per_stage,
            retries,
            max_parallel,
            info.run_id,
            ui_url(info.experiment_id, info.run_id),
            pool,
            commit,
        )
