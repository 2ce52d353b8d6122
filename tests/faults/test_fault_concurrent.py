"""`distillery run` and `dvc repro` on one repository at once: whichever comes second refuses before it computes
anything, the first finishes, and the outputs are those of the undisturbed run."""

import shutil
import time

import psutil
import pytest
from faults.faultkit import snapshot, stage_outputs, start

from conftest import copy_project

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

STAGES = ["distill@sid-1e-4", "evaluate@sid-1e-4"]
DRIVERS = {"distillery run": ["distillery", "run"], "dvc repro": ["dvc", "repro"]}


def running_stage(proc, timeout=120):
    """Wait until `proc` (a driver) has a stage process computing under it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
            if any("stages.distill" in " ".join(c.cmdline()) for c in children):
                return
        except psutil.Error:
            pass
        assert proc.poll() is None, f"the first driver ended early:\n{proc.communicate()}"
        time.sleep(0.2)
    raise AssertionError("no stage started under the first driver")


@pytest.mark.parametrize("first,second", [("distillery run", "dvc repro"), ("dvc repro", "distillery run")])
def test_the_second_driver_refuses_before_computing(first, second, fault_reference, tmp_path, ledger):
    project = copy_project(fault_reference, tmp_path / "p")
    files = [f for stage in STAGES for f in stage_outputs(project, stage)]
    before = snapshot(project, files)
    shutil.rmtree(project / "runs" / "sid-1e-4")  # the distill stage and what follows it are to be rerun
    with ledger.fault(project, keep=before):
        one = start(DRIVERS[first], project)
        running_stage(one)
        started = time.monotonic()
        two = start(DRIVERS[second], project)
        out, err = two.communicate(timeout=120)
        assert two.returncode != 0, f"{second} ran alongside {first}:\n{out}\n{err}"
        assert "the repository is in use by" in out + err, f"{second} did not say why it refused:\n{out}\n{err}"
        assert time.monotonic() - started < 60
        out, err = one.communicate(timeout=500)
        assert one.returncode == 0, f"{first} failed after {second} refused:\n{out}\n{err}"
