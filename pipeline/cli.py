"""The `distillery` command."""

import argparse
import json
import sys
from pathlib import Path

from pipeline.params import ParamsError, invalid, load_params
from pipeline.repo_lock import Held, repository_lock
from pipeline.runs_file import sync as sync_runs_file


def cmd_validate(args):
    params = load_params(args.params)
    dvc_yaml = Path("dvc.yaml")
    if dvc_yaml.is_file():  # what DVC will refuse although the schema fills a default
        from ruamel.yaml import YAML

        from pipeline.dvc_keys import missing_keys

        missing = missing_keys(dvc_yaml.read_text(), YAML(typ="safe", pure=True).load(Path(args.params).read_text()))
        if missing:
            raise invalid(
                args.params,
                [
                    f"  {key}: missing: dvc.yaml's stages read it (write it out, even with its default value)"
                    for key in missing
                ],
            )
    runs = ", ".join(run.name for run in params.runs())
    print(f"{args.params}: valid (profile {params.profile}; runs: {runs})")
    sync_runs_file(args.params, params)  # the runs dvc.yaml expands


def parse_gpus(text):
    return [int(g) for g in text.split(",") if g.strip()] if text else []


def stop_on_sigterm():
    """SIGTERM unwinds like Ctrl-C: the running stages are stopped, the MLflow run ended, the lock released."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def cmd_run(args):
    import os

    from pipeline.runtime import quiet_defaults

    quiet_defaults()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    stop_on_sigterm()
    with repository_lock("."):  # refused at once while another run holds it; runs.yaml is written under it
        sync_runs_file(args.params, load_params(args.params))  # refuse a bad params.yaml, write runs.yaml, before all
        return run_flow(args)


def run_flow(args):
    from pipeline.flow import StagesFailed, run
    from pipeline.pool import PoolError

    try:
        states, error = (
            run(
                ".",
                gpus=parse_gpus(args.gpus),
                gpus_per_stage=args.gpus_per_stage,
                max_parallel=args.max_parallel,
                retries=args.retries,
                pool=args.pool,
            ),
            None,
        )
    except PoolError as e:
        print(f"distillery run: {e}", file=sys.stderr)
        return 2
    except StagesFailed as e:
        states, error = e.states, e
    except KeyboardInterrupt:
        print("distillery run: interrupted; its running stages were stopped", file=sys.stderr)
        return 130
    timeline = {}
    for name, state in states.items():
        result = state.result(raise_on_failure=False) if state.is_completed() else {}
        timeline[name] = {
            "state": state.name,
            **{
                k: result[k]
                for k in ("ran", "started", "finished", "task_started", "task_finished", "worker", "attempts")
                if k in result
            },
        }
        took = (
            f"{result['finished'] - result['started']:7.1f} s"
            if result.get("started") is not None
            else " skipped"
            if result
            else ""
        )
        print(f"{state.name:>12}  {name:<28}{took}")
    if args.timeline:
        Path(args.timeline).write_text(json.dumps(timeline, indent=2))
    if error:
        print(error, file=sys.stderr)
        return 1
    return 0


def cmd_worker(args):
    """A Prefect process worker of `--pool` serving this clone: it holds the clone's repository lock, and its stage
    flows (pipeline/worker.py) run here, on `--gpus`."""
    import os
    import signal
    import subprocess

    from pipeline.runtime import quiet_defaults
    from pipeline.worker import GPUS_ENV, HEARTBEAT_S, NAME_ENV, WORKDIR_ENV

    quiet_defaults()
    root = Path.cwd().resolve()
    gpus = parse_gpus(args.gpus)
    limit = max(1, len(gpus) // args.gpus_per_stage) if gpus else 1  # one stage per GPU group, one on a CPU box
    name = args.name or f"{os.uname().nodename}:{root.name}"
    prefect = Path(sys.executable).parent / "prefect"
    command = [str(prefect), "worker", "start", "--pool", args.pool, "--type", "process", "--limit", str(limit)]
    with repository_lock(root):  # its token (in os.environ from here on) is shared by the stages the flows start
        env = {
            **os.environ,
            WORKDIR_ENV: str(root),
            GPUS_ENV: ",".join(map(str, gpus)),
            NAME_ENV: name,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),  # this clone's code
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
            # the worker asks for work every 2 s, not Prefect's 10: a stage waits 1 s for it on average, not 5
            "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "2"),
        }
        worker = subprocess.Popen([*command, "--name", name], env=env)
        signal.signal(signal.SIGTERM, lambda signum, frame: worker.terminate())
        try:
            return worker.wait()
        except KeyboardInterrupt:
            worker.terminate()
            return worker.wait()


def cmd_repro(args):
    """`dvc repro` inside one MLflow parent run, so the stage runs of this invocation are grouped."""
    import os
    import subprocess

    from pipeline.driver import DRIVER_ENV
    from pipeline.runtime import quiet_defaults
    from pipeline.tracking import parent_run

    quiet_defaults()
    stop_on_sigterm()  # subprocess.run kills dvc on the way out; its stage then ends itself (pipeline/driver.py)
    with repository_lock("."):  # shared by the stages dvc runs
        sync_runs_file(args.params, load_params(args.params))  # runs.yaml before DVC reads dvc.yaml
        with parent_run(Path.cwd(), "dvc repro") as info:
            env = {**os.environ, "DISTILLERY_PARENT_RUN_ID": info.run_id, DRIVER_ENV: str(os.getpid())}
            return subprocess.run(["dvc", "repro", *args.targets], env=env).returncode


def cmd_compare(args):
    """The MLflow runs of the distill or evaluate stages side by side: those dvc.lock points to, or every run."""
    from pipeline.runtime import quiet_defaults
    from pipeline.tracking import compare_table, unsynced_note

    quiet_defaults()
    table = compare_table(args.experiment, args.stage, history=args.all)
    table = table.map(lambda v: f"{v:.4g}" if isinstance(v, float) else v)
    # numparse off: learning rates print as written in params.yaml (3e-4, not 0.0003)
    print(table.to_markdown(index=False, disable_numparse=True) if len(table) else "no runs found")
    if note := unsynced_note():
        print(note, file=sys.stderr)


def cmd_sync(args):
    """Send the runs kept in mlruns-unsynced/ (written while MLflow was unreachable) to the tracking server."""
    from pipeline.runtime import quiet_defaults
    from pipeline.tracking import sync_unsynced, tracking_uri

    quiet_defaults()
    try:
        sent = sync_unsynced()
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{sent} unsynced runs sent to {tracking_uri()}" if sent else "nothing to sync")
    return 0


def cmd_plan(args):
    from pipeline.plan import print_plan

    path = Path(args.profile if args.profile.endswith(".yaml") else f"profiles/{args.profile}.yaml")
    if args.profile == "params":
        path = Path("params.yaml")
    print_plan(".", path, load_params(path), measure=not args.no_measure)


def cmd_ui(args):
    """Prefect server and MLflow UI on 127.0.0.1 until Ctrl-C."""
    from pipeline.servers import serve_uis
    from pipeline.tracking import unsynced_note

    if note := unsynced_note():
        print(note, file=sys.stderr)
    serve_uis(args.prefect_port, args.mlflow_port)


def cmd_cluster(args):
    """PostgreSQL, SeaweedFS (S3), the Prefect server and MLflow on 127.0.0.1, detached; or stop them."""
    from pipeline import cluster

    if args.action == "up":
        try:
            info = cluster.up(args.dir)
        except cluster.ClusterError as e:
            print(f"distillery cluster up: {e}", file=sys.stderr)
            return 1
        cluster.print_up(args.dir, info)
    elif args.action == "down":
        stopped = cluster.down(args.dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else f"no cluster is up in {args.dir}")
    else:
        env = Path(args.dir) / "cluster.env"
        if not env.is_file():
            print(f"no cluster is up in {args.dir}", file=sys.stderr)
            return 1
        print(env.read_text(), end="")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="distillery", description="One-step diffusion distillation pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check params.yaml against the schema, before any compute")
    validate.add_argument("--params", default="params.yaml")
    validate.set_defaults(func=cmd_validate)

    run = sub.add_parser("run", help="run the DVC DAG under Prefect: concurrent stages, one GPU group each")
    run.add_argument("--params", default="params.yaml")
    run.add_argument("--gpus", default="", help="GPU ids to use, e.g. 0,1,2,3 (default: none, CPU)")
    run.add_argument("--gpus-per-stage", type=int, default=1, help="GPUs per stage (>1 runs the stage under torchrun)")
    run.add_argument("--max-parallel", type=int, default=2, help="stages running at once")
    run.add_argument("--retries", type=int, default=0, help="retries of a failed stage")
    run.add_argument("--timeline", help="write each stage's state and start/finish times to this JSON file")
    run.add_argument("--pool", help="run the stages on the workers of this Prefect work pool (distillery worker)")
    run.set_defaults(func=cmd_run)

    worker = sub.add_parser("worker", help="serve a Prefect work pool from this clone: run the stages it is given")
    worker.add_argument("--pool", required=True, help="the work pool (created when missing)")
    worker.add_argument("--gpus", default="", help="this machine's GPU ids its stages share, e.g. 0,1 (default: CPU)")
    worker.add_argument(
        "--gpus-per-stage", type=int, default=1, help="GPUs per stage: the worker's limit is #GPUs / it"
    )
    worker.add_argument("--name", help="the worker's name in Prefect (default: host:clone folder)")
    worker.set_defaults(func=cmd_worker)

    repro = sub.add_parser("repro", help="dvc repro, grouped under one MLflow parent run")
    repro.add_argument("--params", default="params.yaml")
    repro.add_argument("targets", nargs="*")
    repro.set_defaults(func=cmd_repro)

    compare = sub.add_parser("compare", help="compare runs across methods and learning rates (from MLflow)")
    compare.add_argument("--experiment", help="MLflow experiment (default: every distillery experiment)")
    compare.add_argument("--stage", default="evaluate", choices=["distill", "evaluate"])
    compare.add_argument("--all", action="store_true", help="every run, also those dvc.lock no longer points to")
    compare.set_defaults(func=cmd_compare)

    sync = sub.add_parser("sync", help="send the runs kept locally while MLflow was unreachable to the server")
    sync.set_defaults(func=cmd_sync)

    plan = sub.add_parser("plan", help="validate a profile; print its DAG, downloads, disk and compute estimate")
    plan.add_argument("--profile", default="params", help="a name in profiles/, a YAML path, or 'params'")
    plan.add_argument("--no-measure", action="store_true", help="skip the timed steps (DAG and downloads only)")
    plan.set_defaults(func=cmd_plan)

    ui = sub.add_parser("ui", help="start the Prefect server and the MLflow UI on 127.0.0.1 (Ctrl-C stops both)")
    ui.add_argument("--prefect-port", type=int, default=4200)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    cluster = sub.add_parser("cluster", help="start or stop PostgreSQL, S3, Prefect and MLflow servers on 127.0.0.1")
    cluster.add_argument("action", choices=["up", "down", "env"], help="start, stop, print cluster.env")
    cluster.add_argument("--dir", default=".cluster", help="data and logs (default .cluster)")
    cluster.set_defaults(func=cmd_cluster)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ParamsError, Held) as e:
        print(f"distillery {args.command}: {e}" if isinstance(e, Held) else e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
