"""DDP on CPU: two gloo processes sharing the global batch train the same generator as one process."""

import copy
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distillery.methods.sid import SiD
from distillery.training import distill

from toys import tiny_edm, tiny_run

STEPS, BATCH, SHARDS = 3, 8, 2


def train(lr=1e-3):
    teacher = tiny_edm(dropout=0.1).eval().requires_grad_(False)
    generator = copy.deepcopy(teacher).requires_grad_(True)
    method = SiD()
    ema = distill(
        method,
        teacher,
        generator,
        method.make_aux(teacher),
        tiny_run(batch=BATCH, lr=lr, duration_kimg=STEPS * BATCH / 1000, seed=5, shards=SHARDS),
    ).ema
    return generator.state_dict(), ema.state_dict()


def worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        weights, ema = train()
        if rank == 0:
            torch.save({"weights": weights, "ema": ema}, out)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    torch.set_num_threads(1)
    single, single_ema = train()
    mp.spawn(worker, args=(free_port(), tmp_path / "ddp.pt"), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    moved = 0.0
    for name, value in single.items():
        torch.testing.assert_close(ddp["weights"][name], value, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(ddp["ema"][name], single_ema[name], rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, (value - tiny_edm(dropout=0.1).state_dict()[name]).abs().max().item())
    assert moved > 1e-4  # the comparison is between trained weights, not two copies of the teacher
    # and a different global batch split (one shard) is a different run: the test can tell them apart
    global SHARDS
    SHARDS, saved = 1, SHARDS
    try:
        other, _ = train()
    finally:
        SHARDS = saved
    assert any(not torch.allclose(other[k], single[k], rtol=1e-4, atol=1e-6) for k in single)
