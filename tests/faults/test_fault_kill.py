"""SIGKILL at random points of the teacher, distill, teacher_samples and evaluate stages: nothing that existed is
damaged, no partial file appears at a final path, and the rerun ends with the bits of the undisturbed run."""

import random
import time

import pytest
from faults.faultkit import debris, kill_group, run_stage, snapshot, stage_command, stage_outputs, start

from conftest import copy_project

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

STAGES = ["teacher", "distill@sid-1e-4", "teacher_samples", "evaluate@sid-1e-4"]
KILLS = 2  # per stage, at uniformly random moments of its run (fixed seed: the same moments on every machine)


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_anywhere_then_rerun_ends_bit_identical(stage, fault_reference, ledger, tmp_path):
    project = copy_project(fault_reference, tmp_path / "p")
    files = stage_outputs(project, stage)
    before = snapshot(project, files)
    assert len(before) == len(files), "the reference build lacks outputs of " + stage

    code, _, err, seconds = run_stage(project, stage)  # undisturbed: the same bits again, and its duration
    assert code == 0, err
    assert snapshot(project, files) == before

    rng = random.Random(f"{stage}-13")
    for _ in range(KILLS):
        delay = rng.uniform(0.1, 0.95) * seconds
        with ledger.fault(project, keep=before):
            proc = start(stage_command(project, stage), project, shell=True)
            time.sleep(delay)
            kill_group(proc)
            assert snapshot(project, files) == before, f"killed after {delay:.1f} s: an output changed"
            code, _, err, _ = run_stage(project, stage)
            assert code == 0, f"rerun after a kill at {delay:.1f} s failed:\n{err}"
            assert snapshot(project, files) == before, f"killed after {delay:.1f} s: the rerun's bits differ"
            assert debris(project) == [], f"killed after {delay:.1f} s: temporary files left"
