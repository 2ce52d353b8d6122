"""One lock per repository while any stage runs: `distillery run`, `distillery repro` and every stage process take it.

An exclusive `flock` on `.dvc/tmp/distillery.lock` (`.distillery.lock` outside a DVC repository), which the kernel
releases when its holder exits, however it exits. The holder writes its pid, command line, start time and a random
token into the file and hands the token to the processes it starts (`DISTILLERY_LOCK`): a stage that finds its
token recorded while the lock is held runs under its driver's lock. Anyone else is refused at once, not made to
wait: `dvc repro` holds DVC's own repository lock while its stage runs, and the flow needs that lock to record its
stages, so waiting could deadlock.
"""

import fcntl
import json
import os
import secrets
import shlex
import time
from contextlib import contextmanager
from pathlib import Path

TOKEN_ENV = "DISTILLERY_LOCK"


class Held(Exception):
    """Another process holds the repository lock; the message names it and what to do (one line)."""


def lock_file(root):
    root = Path(root)
    return root / ".dvc" / "tmp" / "distillery.lock" if (root / ".dvc").is_dir() else root / ".distillery.lock"


def command_line():
    """This process's command line as typed: `distillery run …`, `python -m stages.teacher`."""
    import psutil

    args = psutil.Process().cmdline()
    if len(args) > 1 and Path(args[0]).name.startswith("python") and not args[1].startswith("-"):
        args = args[1:]  # a script (a console entry point): name the script, not the interpreter
    return shlex.join([Path(args[0]).name, *args[1:]])


def read_holder(path):
    """The record the holder wrote; it writes it right after taking the lock, so an empty file is retried."""
    for _ in range(20):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def is_locked(path):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def shares_driver_lock(path):
    """True when this process was started by the live holder of the lock (its token is the recorded one)."""
    token = os.environ.get(TOKEN_ENV)
    return bool(token) and path.is_file() and is_locked(path) and read_holder(path).get("token") == token


def refusal(path, holder):
    who = f"pid {holder['pid']} ({holder['command']}, since {holder['started']})" if holder else "another process"
    return (
        f"the repository is in use by {who}: one run at a time per repository ({path}); "
        f"wait for it to end or stop it, then run again"
    )


def acquire(root="."):
    """Take the repository lock, or share that of the driver which started this process; returns the function that
    releases it (the kernel does when the process exits). Raises Held at once when another process holds it."""
    path = lock_file(root)
    if shares_driver_lock(path):
        return lambda: None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Held(refusal(path, read_holder(path))) from None
    token = secrets.token_hex(16)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    record = {"pid": os.getpid(), "command": command_line(), "started": started, "token": token}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    previous = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = token  # the processes this one starts share the lock

    def release():
        if previous is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = previous
        os.ftruncate(fd, 0)
        os.close(fd)

    return release


def running_dvc_repro(root):
    """A live `dvc repro` (or `dvc exp run`) working in this repository: (pid, command line), or None. Its stages take
    the lock one at a time, so between two of them the lock is free while it still has stages to run."""
    import psutil

    root = Path(root).resolve()
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        args = [Path(a).name for a in (proc.info["cmdline"] or [])[:3]]
        if "dvc" in args and ("repro" in args or "exp" in args) and proc.info["cwd"]:
            cwd = Path(proc.info["cwd"]).resolve()
            if (cwd == root or root in cwd.parents) and proc.pid != os.getpid():
                return proc.pid, shlex.join(proc.info["cmdline"])
    return None


@contextmanager
def repository_lock(root="."):
    """The repository lock of a driver (`distillery run`, `distillery repro`) for the with-block; raises Held when
    another process holds it or a `dvc repro` is running in the repository."""
    dvc = running_dvc_repro(root)
    if dvc is not None and not shares_driver_lock(lock_file(root)):
        raise Held(
            f"the repository is in use by pid {dvc[0]} ({dvc[1]}): one run at a time per repository; "
            f"wait for it to end or stop it, then run again"
        )
    release = acquire(root)
    try:
        yield
    finally:
        release()
