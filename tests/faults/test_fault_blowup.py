"""Learning rates that blow training up (10 and 1e3) for every method, one-step and few-step: the DAG completes,
and every such run's row in the results table reads `diverged` with the step it diverged at — never `ok`."""

import pandas as pd
import pytest
import yaml
from faults.faultkit import fault_params

from conftest import ROOT, copy_project, sh

pytestmark = [pytest.mark.faults, pytest.mark.timeout(1200)]

ONE_STEP = ["sid", "sim", "diff_instruct", "gdd", "gdd_i"]
FEW_STEP = ["dmd2", "cd", "pd"]
LRS = ["10", "1e3"]


def test_every_method_at_a_blowup_rate_reads_diverged_with_its_step(fault_reference, tmp_path, ledger):
    project = copy_project(fault_reference, tmp_path / "p")
    toy = yaml.safe_load((ROOT / "params.yaml").read_text())
    methods = {m: toy.get(m, {}) for m in ONE_STEP + FEW_STEP}  # the toy's settings of every method (pd: defaults)
    methods["dmd2"].update(fake_updates=2, rollout_steps=2)
    methods["cd"].update(rollout_steps=2)
    methods["pd"].update(teacher_steps=4, round_kimg=0.064)  # two rounds, 4 → 2 steps
    fault_params(
        project,
        study={"methods": ONE_STEP, "lrs": LRS, "per_method": {}},
        fewstep={"methods": FEW_STEP, "lrs": LRS, "steps": [2], "variants": ["plain"], "per_method": {}},
        distill={"duration_kimg": 0.128},
        preference={"pairs": [{"a": "teacher", "b": "sid-10"}]},
        **methods,
    )
    runs = [f"{m}-{lr}" for m in ONE_STEP for lr in LRS] + [f"{m}-{lr}-2-plain" for m in FEW_STEP for lr in LRS]
    for _ in runs:
        ledger.injected += 1
    sh(["distillery", "run", "--max-parallel", "2"], project, extra_env={"OMP_NUM_THREADS": "1"})
    table = pd.read_csv(project / "reports" / "results.csv", dtype={"lr": str})
    students = table[table["status"].notna()]
    assert len(students) == len(runs), students
    at_a_step = students["status"].str.fullmatch(r"diverged at [\d.]+ kimg .+")
    ledger.survived += int(at_a_step.sum())
    assert at_a_step.all(), f"blown-up runs not reported as diverged at a step:\n{students[~at_a_step]}"
