"""Corrupted and truncated checkpoints of a killed distill stage: the stage resumes from the newest intact one, says
which file it skipped, and ends with the bits of the undisturbed run; with none intact it stops with a clear error
and the previous outputs stay as they were."""

import json
import time

import pytest
from faults.faultkit import kill_group, run_stage, snapshot, stage_command, stage_outputs, start

from conftest import copy_project

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

STAGE = "distill@sid-1e-4"
CHECKPOINTS = "checkpoints/distill-sid-1e-4"


def flip(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])  # inside the tensor data
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def killed_with_two_checkpoints(project):
    """Run the stage and SIGKILL it once its checkpoint directory lists two checkpoints; returns their paths."""
    manifest = project / CHECKPOINTS / "manifest.json"
    proc = start(stage_command(project, STAGE), project, shell=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            entries = json.loads(manifest.read_text())["checkpoints"]
        except (OSError, ValueError, KeyError):
            entries = []
        if len(entries) >= 2:
            break
        assert proc.poll() is None, f"the stage ended before its second checkpoint:\n{proc.communicate()[1]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    kill_group(proc)
    return [project / CHECKPOINTS / e["file"] for e in json.loads(manifest.read_text())["checkpoints"]]


@pytest.mark.parametrize("damage", [flip, truncate])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(damage, fault_reference, tmp_path, ledger):
    project = copy_project(fault_reference, tmp_path / "p")
    files = stage_outputs(project, STAGE)
    before = snapshot(project, files)
    with ledger.fault(project, keep=before):
        *older, newest = killed_with_two_checkpoints(project)
        damage(newest)
        code, _, err, _ = run_stage(project, STAGE)
        assert code == 0, err
        assert newest.name in err and older[-1].name in err, f"the fallback was not announced:\n{err}"
        assert snapshot(project, files) == before


def test_no_intact_checkpoint_is_a_clear_error(fault_reference, tmp_path, ledger):
    project = copy_project(fault_reference, tmp_path / "p")
    files = stage_outputs(project, STAGE)
    before = snapshot(project, files)
    with ledger.fault(project, keep=before):
        for path in killed_with_two_checkpoints(project):
            flip(path)
        code, _, err, _ = run_stage(project, STAGE)
        assert code == 1 and "Traceback" not in err, err
        assert CHECKPOINTS in err, err
