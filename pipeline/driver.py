"""A stage process lives no longer than the driver that started it: `dvc repro`, `distillery repro`, `distillery run`.

Killed drivers (even with SIGKILL) must not leave their stages running on as orphans that later rewrite outputs.
Between dvc and the stage there is a shell (`/bin/sh -c`), so Linux's parent-death signal (prctl) would watch the
shell, not dvc: the stage watches every process from its parent up to its driver instead.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DRIVER_ENV = "DISTILLERY_DRIVER_PID"  # set by `distillery run` and `distillery repro` for the processes they start
POLL_S = 1.0
GRACE_S = 10.0  # after SIGTERM, how long a process may take to clean up before it is killed


def is_dvc(proc):
    return "dvc" in [Path(arg).name for arg in proc.cmdline()[:3]]


def driver_chain():
    """[parent, …, driver]: this process's ancestors up to the outermost driver among them, [] when it has none (a
    stage started by hand)."""
    import psutil

    named = os.environ.get(DRIVER_ENV)
    ancestors = psutil.Process().parents()
    last = None
    for i, proc in enumerate(ancestors):
        try:
            if str(proc.pid) == named or is_dvc(proc):
                last = i
        except psutil.Error:
            continue
    return [] if last is None else ancestors[: last + 1]


def gone(proc):
    import psutil

    try:  # is_running also compares the start time: a reused pid is not the process watched
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def exit_with_driver(poll_s=POLL_S):
    """Watch, in a daemon thread, the processes between this one and its driver; once one is gone, send SIGTERM to
    this process (its cleanup runs: atomic writes delete their temporary files) and end it if it still runs GRACE_S
    later. Returns the watched chain ([] when there is no driver: nothing is watched)."""
    chain = driver_chain()

    def watch():
        while not any(gone(proc) for proc in chain):
            time.sleep(poll_s)
        try:
            print(f"{Path(sys.argv[0]).name}: its driver (pid {chain[-1].pid}) is gone: stopping", file=sys.stderr)
        except OSError:
            pass  # the driver held the other end of stderr
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(GRACE_S)
        os._exit(128 + signal.SIGTERM)

    if chain:
        threading.Thread(target=watch, name="driver-watchdog", daemon=True).start()
    return chain


def terminate(popens, grace_s=GRACE_S):
    """SIGTERM to the processes started with `popens` and to all their descendants (torchrun's ranks), SIGKILL to
    any still running grace_s later. The Popen objects are waited on through themselves, so that the threads which
    also wait on them read their real exit status."""
    import psutil

    descendants = []
    for popen in popens:
        try:
            descendants += psutil.Process(popen.pid).children(recursive=True)
        except psutil.Error:
            pass
    for popen in popens:
        popen.terminate()
    for proc in descendants:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    deadline = time.monotonic() + grace_s
    for popen in popens:
        try:
            popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            popen.kill()
    for proc in psutil.wait_procs(descendants, timeout=max(0.0, deadline - time.monotonic()))[1]:
        try:
            proc.kill()
        except psutil.Error:
            pass
