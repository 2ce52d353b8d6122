"""One DVC stage on a Prefect worker, in the worker's own working copy of the repository (as on another machine).

`distillery worker --pool NAME`, started in a clone, holds that clone's repository lock and runs a Prefect process
worker whose flow runs (the deployment `distillery-stage/<pool>`) execute `stage_flow` here. A stage flow:
1. checks the clone out at the coordinator's commit (the deployment's pull step, before the flow's code is loaded)
   and writes the coordinator's dvc.lock over it;
2. pulls the outputs of the stage's upstream stages from the DVC remote, and fetches there the upstream outputs DVC
   does not cache (metrics: git carries them), which the coordinator put there for it;
3. fetches the stage's checkpoints from the remote when they go further than its own (another worker began it);
4. runs the stage's command on a free GPU group of this worker, its checkpoints mirrored to the remote as they are
   written, its progress and MLflow link published as this flow run's artifacts;
5. records the stage with `dvc commit`, pushes its outputs, and leaves its dvc.lock entry and the outputs DVC does
   not cache (metrics, small plots: git carries them) in the remote, where the coordinator (pipeline/pool.py) reads
   them.
"""

import fcntl
import os
import socket
import subprocess
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from pipeline.flow import commit_stage, dvc_repo, execute, stage_changed
from pipeline.io import atomic_path
from pipeline.remote import CheckpointMirror, Remote
from pipeline.runtime import stage_checkpoints

WORKDIR_ENV = "DISTILLERY_WORKDIR"  # the worker's clone
GPUS_ENV = "DISTILLERY_GPUS"  # the GPU ids of the worker's machine that its stages share ("" = the CPU)
NAME_ENV = "DISTILLERY_WORKER"
FLOW = "distillery-stage"
HEARTBEAT_S = 30  # how often a stage flow tells the server it is alive (Prefect's shortest period)


def workdir():
    if WORKDIR_ENV not in os.environ:
        raise RuntimeError(f"{WORKDIR_ENV} is not set: start workers with `distillery worker --pool NAME` in a clone")
    return Path(os.environ[WORKDIR_ENV]).resolve()


@contextmanager
def clone_lock(root):
    """One stage flow at a time checks out, writes dvc.lock or records in this clone (a worker may run several)."""
    path = root / ".dvc" / "tmp" / "worker.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextmanager
def gpu_group(root, per_stage):
    """A free group of `per_stage` of this worker's GPUs, held with a file lock while the stage runs ([]: CPU)."""
    gpus = [int(g) for g in os.environ.get(GPUS_ENV, "").split(",") if g.strip()]
    if not gpus:
        yield []
        return
    groups = [gpus[i : i + per_stage] for i in range(0, len(gpus) - per_stage + 1, per_stage)]
    if not groups:
        raise RuntimeError(f"the stage asks for {per_stage} GPUs; this worker has {len(gpus)} ({GPUS_ENV}={gpus})")
    (root / ".dvc" / "tmp" / "gpus").mkdir(parents=True, exist_ok=True)
    while True:  # the worker's --limit admits as many stages as it has groups: one is free or soon will be
        for group in groups:
            f = open(root / ".dvc" / "tmp" / "gpus" / f"{'-'.join(map(str, group))}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield group
            finally:
                f.close()
            return
        time.sleep(1)


def git(root, *args):
    """What git prints, stripped; raises when it fails."""
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def check_out(commit):
    """The deployment's pull step: this worker's clone at `commit`, before the stage flow's code is loaded from it."""
    root = workdir()
    with clone_lock(root):
        git(root, "fetch", "--quiet", "origin")
        git(root, "checkout", "--quiet", "--force", "--detach", commit)
    return {"directory": str(root)}


def write_lock(root, lock_text):
    with atomic_path(root / "dvc.lock") as tmp:
        Path(tmp).write_text(lock_text)


def pull(root, stages):
    if stages:
        with dvc_repo(root) as repo:
            repo.pull(targets=stages)


def push(root, stage):
    with dvc_repo(root) as repo:
        repo.push(targets=[stage])


def lock_entry(root, stage):
    from dvc.utils.serialize import load_yaml

    return load_yaml(root / "dvc.lock")["stages"][stage]  # DVC's YAML: PyYAML would read its 1e-08 as a string


def uncached_outs(root, stage):
    """The stage's outputs DVC leaves to git (`cache: false`: metrics, small plots): the remote carries them too."""
    with dvc_repo(root) as repo:
        (collected,) = repo.stage.collect(stage)
        return [str(out.def_path) for out in collected.outs if not out.use_cache]


@flow(name=FLOW)
def stage_flow(
    stage: str,
    commit: str,
    lock: str,
    upstream: list[str],
    inputs: dict,
    gpus_per_stage: int = 1,
    parent_run_id: str | None = None,
) -> dict:
    """Run DVC stage `stage` at git `commit` with the coordinator's dvc.lock text `lock`, the outputs of the
    `upstream` stages from the DVC remote and the files of `inputs` ({"key", "paths"}) the coordinator put there;
    returns what it recorded."""
    logger = get_run_logger()
    root = workdir()
    os.chdir(root)
    os.environ["DISTILLERY_ROOT"] = str(root)  # the MLflow store and the run's tags are this clone's
    worker = os.environ.get(NAME_ENV) or f"{socket.gethostname()}:{root}"
    with clone_lock(root):
        # the pull step checked it out; another flow run of this worker may have moved it since
        if git(root, "rev-parse", "HEAD") != commit:
            git(root, "checkout", "--quiet", "--force", "--detach", commit)
        write_lock(root, lock)
        pull(root, upstream)
    remote = Remote(root)
    remote.get_files(inputs["key"], inputs["paths"])
    checkpoints = stage_checkpoints(stage)
    if checkpoints is not None:
        resumed = remote.pull_checkpoints(checkpoints)  # paths relative to the clone: the same on every machine
        if resumed is not None:
            logger.info("%s: its checkpoints in the DVC remote reach %d images; it resumes from them", stage, resumed)
    changed, cmd = stage_changed(root, stage)
    started = finished = None
    if changed:
        with gpu_group(root, gpus_per_stage) as group:
            mirror = CheckpointMirror(remote, checkpoints) if checkpoints is not None else nullcontext()
            with mirror:
                started, finished = execute(root, stage, cmd, group, parent_run_id, logger)
    else:
        logger.info("%s: this clone already holds its outputs for these inputs; recording them", stage)
    with clone_lock(root):
        outs = commit_stage(root, stage)
        push(root, stage)
        entry = lock_entry(root, stage)
    uncached = uncached_outs(root, stage)
    remote.put_files(f"outs/{flow_run.get_id()}", uncached)
    if checkpoints is not None and not (root / checkpoints).exists():
        remote.remove(checkpoints)  # the stage ended and removed its own: nothing left to resume
    record = {
        "stage": stage,
        "worker": worker,
        "lock": entry,
        "outs": outs,
        "uncached": uncached,
        "started": started,
        "finished": finished,
    }
    remote.put_json(f"stages/{flow_run.get_id()}.json", record)
    logger.info("%s ran on %s; outputs pushed to the DVC remote: %s", stage, worker, outs)
    return record
