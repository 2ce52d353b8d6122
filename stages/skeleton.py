"""The one shape of every stage: arguments, validated params, one MLflow run, the exit status.

`python -m stages.<name> [--flag value ...]` exits 0 when its outputs are written, 2 when params.yaml or the
arguments are invalid or another run holds the repository (before any compute), and 1 when the stage fails while
running; every output is written atomically, so a failed or stopped stage leaves the previous outputs as they were.
SIGTERM and SIGINT stop it as an exception (its MLflow run ends KILLED, its context managers clean up), then the
process dies of the same signal.
"""

import argparse
import contextlib
import errno
import os
import signal
import sys

from pipeline.driver import exit_with_driver
from pipeline.io import remove_debris
from pipeline.params import load_params_or_exit
from pipeline.repo_lock import Held, acquire
from pipeline.runs_file import check_or_exit as runs_file_current_or_exit
from pipeline.tracking import stage_run


class InvalidInput(Exception):
    """The params or arguments ask for something the stage cannot do: refused before any compute (exit 2)."""


class StageFailed(Exception):
    """A failure while running whose message says all the user needs (exit 1, no traceback)."""


class Killed(KeyboardInterrupt):
    """SIGTERM or SIGINT, raised where the stage is: a KeyboardInterrupt, which ends the MLflow run KILLED."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_killed(signum, frame):
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)  # a second signal kills at once, without the clean-up
    raise Killed(signum)


@contextlib.contextmanager
def signals_raise():
    """SIGTERM and SIGINT raise Killed inside the block; after the clean-up the process dies of the signal, so that
    its parent (DVC, Prefect, a shell) sees the usual status. A signal the process was started ignoring (nohup)
    stays ignored."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, raise_killed)
    try:
        yield
    except Killed as e:
        print(f"stopped by {e}", file=sys.stderr, flush=True)
        signal.signal(e.signum, signal.SIG_DFL)
        os.kill(os.getpid(), e.signum)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Silent:
    """The run of a DDP rank other than 0: rank 0 alone logs to MLflow."""

    def log_metrics(self, metrics, step=None):
        pass

    def log_artifact(self, path):
        pass

    def log_table(self, frame, artifact_file):
        pass

    def set_tag(self, key, value):
        pass


def shared_params(params, args=None):
    """What a stage logs to MLflow by default: the sections that belong to no method and no run."""
    from distillery.registry import METHODS

    return {k: v for k, v in params.model_dump().items() if k not in {*METHODS, "study", "fewstep", "distill"}}


def no_space(error):
    """The OSError "no space left" (or "quota exceeded") behind `error`, if that is what it is (torch.save wraps it
    in a RuntimeError)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def claim_repository(name, rank0):
    """Before any compute: hold the repository lock until this process ends (or share that of the driver which
    started it; exit 2 when another process holds it), end with that driver, and delete the temporary files that
    killed writers left. Rank 0 of a DDP stage holds the lock and writes for all ranks."""
    if rank0:
        try:
            acquire()  # released by the kernel when this process exits
        except Held as e:
            print(f"{name}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        remove_debris(".")
    exit_with_driver()


def run_stage(stage, body, *, doc, arguments=None, instance=None, tags=None, logged=shared_params):
    """Run the stage `stage`: parse `arguments` ({flag: help}, all required), load params.yaml, resolve the stage's
    name, open its MLflow run and call `body(params, args, run)`.

    instance(params, args): the DVC name of a foreach/matrix stage (`distill@<suffix>`), raising InvalidInput when
    params.yaml defines no such stage; tags(params, args): the MLflow tags of the run (logged as params too);
    logged(params, args): the params the run logs.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, help in (arguments or {}).items():
        parser.add_argument(flag, required=True, help=help)
    args = parser.parse_args()
    params = load_params_or_exit()
    runs_file_current_or_exit(params)  # runs.yaml, which dvc.yaml expands, must be that of params.yaml
    try:
        name = instance(params, args) if instance else stage
        run_tags = tags(params, args) if tags else {}
        logged_params = logged(params, args)
    except InvalidInput as e:
        print(f"{stage}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    rank0 = int(os.environ.get("RANK", "0")) == 0
    claim_repository(name, rank0)
    try:
        with (
            signals_raise(),
            stage_run(name, logged_params, tags=run_tags) if rank0 else contextlib.nullcontext(Silent()) as run,
        ):
            body(params, args, run)
    except StageFailed as e:
        print(f"{name}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as error:
        e = no_space(error)
        if e is None:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(
            f"{name}: {e.strerror}{where}: free some space and run it again (earlier outputs are as they were)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
