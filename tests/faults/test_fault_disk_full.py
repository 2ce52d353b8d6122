"""A disk too small for the outputs (a tmpfs with a few KiB free): the stage stops with a clear error, every output
of the previous run is intact and no temporary file is left."""

import shutil
import subprocess

import pytest
from faults.faultkit import debris, run_stage, snapshot, stage_outputs

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

STAGE = "distill@sid-1e-4"


def mount_tmpfs(path, size_kib):
    path.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(path)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")


def used_kib(path):
    return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True).stdout.split()[0])


def test_no_space_left_fails_clearly_and_keeps_the_previous_outputs(fault_reference, tmp_path, ledger):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, used_kib(fault_reference) + 32 * 1024)  # room for a whole run once the filler is gone
    try:
        project = disk / "project"
        shutil.copytree(fault_reference, project, symlinks=True)
        files = stage_outputs(project, STAGE)
        before = snapshot(project, files)
        with ledger.fault(project, keep=before):
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(b"\0" * (free - 16 * 1024))  # 16 KiB left: less than one network file
            code, _, err, _ = run_stage(project, STAGE)
            assert code == 1, f"exit {code}:\n{err}"
            assert "Traceback" not in err and "No space left on device" in err, err
            assert len([line for line in err.splitlines() if STAGE in line]) >= 1, err
            assert debris(project) == []
            (disk / "filler").unlink()
            code, _, err, _ = run_stage(project, STAGE)  # with room again it finishes, to the same bits
            assert code == 0, err
            assert snapshot(project, files) == before
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)
