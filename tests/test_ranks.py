"""Sampling stages under torchrun (two CPU ranks, gloo): the ranks share out the batches and the outputs are the bits
of one process (docs/methods.md §2.1)."""

import json
import shlex
import sqlite3
import sys

import pytest
from faults.faultkit import digest, fault_params, stage_command, stage_outputs

from conftest import ROOT, copy_project, new_project, sh

pytestmark = pytest.mark.cluster

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the thread count can change float sums: every process uses one
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# after "--" torchrun parses no more options of its own: `--run` would otherwise be refused as an ambiguous
# abbreviation of its --run-path

# 200 seeds in batches of 45: rank 0 samples batches 0, 2, 4 (45 + 45 + 20), rank 1 batches 1, 3 (45 + 45)
SHARED = """
import json, torch
from pipeline.runtime import distributed
from distillery.sampling import generate
from distillery.training import gather_to_rank0, world

sizes = []

def sampler(latents, labels, noise):
    sizes.append(len(latents))
    x = latents * latents.mean() + labels.argmax(1)[:, None, None, None] + noise(0, latents)
    x[0] = float("nan")  # one blown-up image per batch
    return x  # an image that depends on its batch: re-batching the seeds would change it

with distributed() as (rank, dev):
    shared = generate(sampler, list(range(200)), [1, 3, 3], 5, batch=45, ranks=world())
    shares = gather_to_rank0(sizes)
if rank == 0:
    alone = generate(sampler, list(range(200)), [1, 3, 3], 5, batch=45)
    same = torch.equal(shared.images, alone.images) and torch.equal(shared.labels, alone.labels)
    print(json.dumps({"sizes": shares, "same": same, "blown_up": [shared.blown_up, alone.blown_up]}))
"""


def test_generate_shares_out_the_batches_of_one_process():
    out = sh([*TORCHRUN, "--no-python", "--", sys.executable, "-c", SHARED], ROOT, extra_env=ONE_THREAD).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"sizes": [[45, 45, 20], [45, 45]], "same": True, "blown_up": [5, 5]}


def test_stages_under_torchrun_write_the_bits_of_one_process(tmp_path):
    one = new_project(tmp_path / "one")
    # 5 batches of unequal size per 200-seed block, 3 to rank 0 and 2 to rank 1
    fault_params(one, evaluation={"batch": 45})
    sh(["dvc", "repro", "evaluate@sid-1e-4"], one, extra_env=ONE_THREAD)
    two = copy_project(one, tmp_path / "two")
    for stage in ["teacher_samples", "evaluate@sid-1e-4"]:
        outputs = stage_outputs(two, stage)
        for f in outputs:
            (two / f).unlink()
        args = shlex.split(stage_command(two, stage))  # python -m stages.<stage> [--run …]
        sh([*TORCHRUN, "-m", "--", *args[2:]], two, extra_env=ONE_THREAD)
        assert {str(f): digest(two / f) for f in outputs} == {str(f): digest(one / f) for f in outputs}, stage
    with sqlite3.connect(two / "mlflow.db") as db:
        names = [name for (name,) in db.execute("SELECT name FROM runs")]
    # rank 1 logs nothing: one run each from the one-process build and from torchrun
    assert names.count("teacher_samples") == names.count("evaluate@sid-1e-4") == 2, names
