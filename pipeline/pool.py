"""`distillery run --pool NAME`: the DAG's stages on the workers of a Prefect work pool, this machine coordinating.

Each stage whose inputs are ready and which DVC says changed becomes a flow run of the deployment
`distillery-stage/<pool>` (pipeline/worker.py), picked up by whichever worker of the pool has room (the pool's and
each worker's concurrency limits decide). The worker runs it in its own clone at this repository's commit and
leaves the stage's dvc.lock entry in the DVC remote; this machine records the entry in its dvc.lock and pulls the
outputs, so the next stages see them and `dvc status` stays the truth. A flow run that ends without completing is
submitted again (`--retries`): one whose worker died stops sending heartbeats, and the automation this module
keeps on the server marks it Crashed after `HEARTBEAT_TIMEOUT_S`; the retry resumes from the stage's checkpoints in
the remote.

What the workers need travels through the servers alone: the commit through git's `origin`, the data through the
DVC remote, the runs to the MLflow server.
"""

import json
import time
import uuid
from datetime import timedelta

from dvc.utils.serialize import load_yaml, modify_yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from pipeline.flow import DVC_LOCK, dvc_repo, skipped, stage_changed
from pipeline.remote import Remote
from pipeline.worker import FLOW, HEARTBEAT_S, check_out, git

HEARTBEAT_TIMEOUT_S = 3 * HEARTBEAT_S  # silence after which a stage's flow run is marked Crashed
AUTOMATION = "distillery: a stage whose worker stopped sending heartbeats has crashed"


class PoolError(RuntimeError):
    """The repository is not ready to run on a pool (one line saying what to do)."""


def shared_commit(root):
    """The commit the workers check out: HEAD, with every tracked file but dvc.lock committed and HEAD on `origin`."""
    dirty = [path for path in git(root, "diff", "--name-only", "HEAD").splitlines() if path != "dvc.lock"]
    if dirty:
        raise PoolError(f"uncommitted changes to {', '.join(dirty)}: workers check out commits; commit and push them")
    commit = git(root, "rev-parse", "HEAD")
    git(root, "fetch", "--quiet", "origin")
    if not git(root, "branch", "--remotes", "--contains", commit):
        raise PoolError(f"commit {commit[:8]} is not on origin: workers fetch it from there; `git push` first")
    return commit


def check_remote(root):
    with dvc_repo(root) as repo:
        if not repo.config["core"].get("remote"):
            raise PoolError("no default DVC remote: workers exchange data through it; `dvc remote add -d NAME URL`")


def deploy(pool, commit):
    """The deployment of the stage flow at `commit` on `pool` (created when missing); returns its name. Its pull step
    checks the worker's clone out at the commit before the flow is loaded, so the flow runs the commit's code."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.utilities.callables import parameter_schema

    from pipeline.worker import stage_flow

    name = f"{pool}-{commit[:12]}"
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:  # a pool the workers will join
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        client.create_deployment(
            flow_id=client.create_flow_from_name(FLOW),
            name=name,
            version=commit,
            work_pool_name=pool,
            entrypoint=f"{stage_flow.fn.__module__}:{stage_flow.fn.__name__}",
            pull_steps=[{f"{check_out.__module__}.{check_out.__name__}": {"commit": commit}}],
            parameter_openapi_schema=parameter_schema(stage_flow).model_dump_for_openapi(),
            enforce_parameter_schema=True,
        )
    return f"{FLOW}/{name}"


def ensure_crash_detection():
    """The server-side automation that marks a flow run Crashed when its heartbeats stop (its machine died)."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(AUTOMATION):
            return
    Automation(
        name=AUTOMATION,
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=HEARTBEAT_TIMEOUT_S),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED, message=f"no heartbeat for {HEARTBEAT_TIMEOUT_S} s: its worker is gone"
            )
        ],
    ).create()


def uncached_inputs(root, name):
    """The files stage `name` reads that other stages write and DVC leaves to git (metrics, small plots): a worker's
    `dvc pull` cannot bring them, so the coordinator, which holds every finished stage's outputs, hands them over."""
    with dvc_repo(root) as repo:
        uncached = [str(out.def_path) for s in repo.index.stages for out in s.outs if not out.use_cache]
        (stage,) = repo.stage.collect(name)
        deps = [str(dep.def_path) for dep in stage.deps]
    return [u for u in uncached if any(u == d or u.startswith(d.rstrip("/") + "/") for d in deps)]


def record_stage(root, name, record, flow_run_id):
    """Bring a worker's results of stage `name` here: the outputs DVC does not cache from the remote, those it caches
    by `dvc pull` of the worker's dvc.lock entry, then `dvc commit` as for a stage run here (dvc.lock, the
    .gitignore entries); raises unless the entry recorded here is the worker's."""
    entry = json.loads(json.dumps(record["lock"]))
    Remote(root).get_files(f"outs/{flow_run_id}", record["uncached"])
    with dvc_repo(root) as repo:
        with modify_yaml(str(root / "dvc.lock")) as data:
            data.setdefault("schema", "2.0")
            data.setdefault("stages", {})[name] = entry
        repo.pull(targets=[name])
        repo.commit(name, force=True)
        here = json.loads(json.dumps(load_yaml(root / "dvc.lock")["stages"][name]))
    if here != entry:
        raise RuntimeError(f"{name}: what the worker recorded differs from what this repository records for it")


@task(cache_policy=NO_CACHE)
def run_on_pool(
    root: str, name: str, deployment: str, commit: str, upstream: list[str], gpus_per_stage: int, parent_run_id, retries
):
    """Run one DVC stage on the pool if DVC says it changed (skipped: `Cached`); returns where it ran, its outputs."""
    from pathlib import Path

    logger = get_run_logger()
    root = Path(root)
    task_started = time.time()
    changed, _ = stage_changed(root, name)
    if not changed:
        return skipped(name, logger, task_started)
    inputs = {"key": f"inputs/{uuid.uuid4()}", "paths": uncached_inputs(root, name)}
    Remote(root).put_files(inputs["key"], inputs["paths"])
    for attempt in range(retries + 1):
        with DVC_LOCK:
            lock = (root / "dvc.lock").read_text() if (root / "dvc.lock").is_file() else "schema: '2.0'\nstages: {}\n"
        run = run_deployment(
            deployment,
            parameters={
                "stage": name,
                "commit": commit,
                "lock": lock,
                "upstream": upstream,
                "inputs": inputs,
                "gpus_per_stage": gpus_per_stage,
                "parent_run_id": parent_run_id,
            },
            flow_run_name=name if attempt == 0 else f"{name} (retry {attempt})",
            tags=[f"stage:{name}"],
            timeout=None,
            poll_interval=2,
        )
        if run.state.is_completed():
            break
        logger.warning("%s: flow run %s ended %s (%s)", name, run.name, run.state.name, run.state.message)
    else:
        raise RuntimeError(f"stage {name} did not complete on the pool in {retries + 1} attempt(s)")
    remote = Remote(root)
    record = remote.get_json(f"stages/{run.id}.json")
    record_stage(root, name, record, run.id)
    for key in (inputs["key"], f"outs/{run.id}", f"stages/{run.id}.json"):
        remote.remove(key)  # all of it is in DVC's cache and this repository now
    logger.info("%s ran on %s; recorded in DVC: %s", name, record["worker"], record["outs"])
    return {
        "stage": name,
        "ran": True,
        "worker": record["worker"],
        "flow_run": str(run.id),
        "attempts": attempt + 1,
        "outs": record["outs"],
        "started": record["started"],
        "finished": record["finished"],
        "task_started": task_started,
        "task_finished": time.time(),
    }
