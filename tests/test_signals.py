"""A stage lives no longer than its driver, and a stopped stage leaves nothing behind: killed drivers (a `sh -c`
chain, a real `dvc repro` killed with SIGKILL, `distillery run` stopped with SIGTERM) take their stages with them
within seconds, with no partial output and no temporary files; a writer killed outright leaves temporary files
that the next stage removes (those of running writers stay); outputs get the umask's permissions."""

import os
import signal
import stat
import subprocess
import sys
import textwrap

import psutil
import pytest
from test_repo_lock import DISTILLERY, holder, slow_teacher, wait_for

from pipeline.driver import DRIVER_ENV
from pipeline.io import atomic_path, remove_debris
from pipeline.repo_lock import Held, acquire

from conftest import copy_project, sh, tool_env

pytestmark = pytest.mark.faults  # real processes killed and signalled: make test-faults


def debris(repo):
    """Temporary files anywhere in the project (`.<name>.<pid>.<random>.tmp`), hidden directories included."""
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*.tmp") if ".git" not in p.parts)


def ended(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def lock_is_free(repo):
    """True once the kernel released the lock (a dying process's threads may still hold its file for a moment)."""
    try:
        acquire(repo)()
    except Held:
        return False
    return True


@pytest.fixture
def repo(micro_data, tmp_path):
    return copy_project(micro_data, tmp_path / "repo")


# A stage (the real skeleton) that is killed in the middle of writing its output.
WRITER = textwrap.dedent(
    """
    import time

    from pipeline.io import atomic_path
    from stages.skeleton import run_stage


    def body(params, args, run):
        with atomic_path("models/probe", is_dir=True) as tmp:
            (tmp / "half.bin").write_bytes(b"written before the driver died")
            print("writing", flush=True)
            time.sleep(120)


    run_stage("probe", body, doc="writes forever")
    """
)

# A driver that starts the stage through a shell that stays between them, as dvc does.
DRIVER = textwrap.dedent(
    f"""
    import os, subprocess, sys

    os.environ["{DRIVER_ENV}"] = str(os.getpid())
    subprocess.run(["/bin/sh", "-c", sys.executable + " writer.py; exit $?"])
    """
)


def test_a_stage_under_a_shell_ends_itself_when_its_driver_is_killed(repo):
    (repo / "writer.py").write_text(WRITER)
    (repo / "driver.py").write_text(DRIVER)
    driver = subprocess.Popen(
        [sys.executable, "driver.py"], cwd=repo, env=tool_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert driver.stdout.readline().strip() == "writing"
        writer = holder(repo)["pid"]
        chain = [p.name() for p in psutil.Process(writer).parents()[:2]]
        assert chain[0] in ("sh", "dash", "bash") and chain[1].startswith("python"), chain  # stage <- sh <- driver
        (temp,) = debris(repo)  # mid-write: the temporary directory, named with its writer's pid
        assert temp.startswith(f"models/.probe.{writer}."), temp
        driver.kill()
        driver.wait()
        wait_for(lambda: ended(writer), timeout=10, what="the orphaned stage to end")
    finally:
        driver.kill()
    assert not (repo / "models" / "probe").exists()
    assert debris(repo) == []
    wait_for(lambda: lock_is_free(repo), timeout=5, what="the lock to be released")


def test_a_stage_run_by_hand_is_not_watched(repo):
    """No driver among its ancestors: a stage started from a shell (nohup, a terminal closing) runs on."""
    (repo / "writer.py").write_text(WRITER)
    shell = subprocess.Popen(
        ["/bin/sh", "-c", f"{sys.executable} writer.py; exit $?"],
        cwd=repo,
        env=tool_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert shell.stdout.readline().strip() == "writing"
        writer = holder(repo)["pid"]
        shell.kill()
        shell.wait()
        with pytest.raises(AssertionError, match="timed out"):
            wait_for(lambda: ended(writer), timeout=3)
    finally:
        psutil.Process(writer).terminate()
    wait_for(lambda: ended(writer), timeout=10, what="the stage to end on SIGTERM")
    assert not (repo / "models" / "probe").exists() and debris(repo) == []  # SIGTERM: its cleanup ran


def test_killing_dvc_repro_with_sigkill_ends_its_stage_with_nothing_left(repo):
    slow_teacher(repo)
    dvc = subprocess.Popen(["dvc", "repro", "teacher"], cwd=repo, env=tool_env(), stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: "stages.teacher" in holder(repo).get("command", ""), what="the teacher stage to start")
        teacher = holder(repo)["pid"]
        wait_for(lambda: (repo / "checkpoints" / "teacher" / "manifest.json").exists(), what="the teacher to train")
        dvc.kill()
        dvc.wait()
        wait_for(lambda: ended(teacher), timeout=10, what="the teacher stage to end after dvc was killed")
    finally:
        dvc.kill()
    assert not (repo / "models" / "teacher").exists()
    assert debris(repo) == []
    wait_for(lambda: lock_is_free(repo), timeout=5, what="the lock to be released")


def test_sigterm_to_distillery_run_stops_its_running_stages(repo, tmp_path):
    slow_teacher(repo)
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        run = subprocess.Popen(
            [DISTILLERY, "run", "--max-parallel", "1"],
            cwd=repo,
            env=tool_env({"PREFECT_HOME": str(tmp_path / "prefect-home")}),
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def teacher():
        found = []
        for proc in psutil.Process(run.pid).children(recursive=True):
            try:
                if "stages.teacher" in " ".join(proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                pass
        return found

    try:
        wait_for(
            lambda: teacher() and (repo / "checkpoints" / "teacher" / "manifest.json").exists(),
            timeout=180,
            what="the teacher",
        )
        (stage,) = teacher()
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert ended(stage.pid)
    assert not (repo / "models" / "teacher").exists()
    assert debris(repo) == []
    wait_for(lambda: lock_is_free(repo), timeout=5, what="the lock to be released")


def test_debris_of_dead_writers_is_removed_at_the_next_stage_start_and_that_of_live_ones_kept(repo):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale_dir = repo / "models" / f".teacher.{dead.pid}.abcd1234.tmp"
        stale_dir.mkdir(parents=True)
        (stale_dir / "network.safetensors").write_bytes(b"half")
        stale_file = repo / "metrics" / f".teacher.json.{dead.pid}.k2_9zq0x.tmp"
        stale_file.write_text("{")
        running = repo / "runs" / f".sid-1e-4.{live.pid}.abcdefgh.tmp"
        running.mkdir(parents=True)
        kept = [repo / "downloads" / "teacher.pkl.part", repo / "models" / ".teacher.tmp"]  # not temporary siblings
        for path in kept:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        sh([sys.executable, "-m", "stages.data"], repo)
        assert not stale_dir.exists() and not stale_file.exists()
        assert running.is_dir() and all(path.exists() for path in kept)
    finally:
        live.kill()
        live.wait()
    assert [str(p.relative_to(repo)) for p in remove_debris(repo)] == [f"runs/.sid-1e-4.{live.pid}.abcdefgh.tmp"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_get_the_permissions_of_the_umask(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "study", is_dir=True) as tmp:
            (tmp / "index.html").write_text("<html>")
        with atomic_path(tmp_path / "study", is_dir=True) as tmp:  # replacing an existing directory
            (tmp / "index.html").write_text("<html>")
        with atomic_path(tmp_path / "results.md") as tmp:
            tmp.write_text("| a |")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "study").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "study" / "index.html").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "results.md").stat().st_mode) == file_mode
    assert debris(tmp_path) == []
