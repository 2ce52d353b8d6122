"""What every stage process sets up: quiet offline defaults, seeding, device, progress, fingerprints."""

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path


def quiet_defaults():
    """Keep MLflow, DVC and Prefect off the network (telemetry) unless the user set otherwise."""
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }.items():
        os.environ.setdefault(key, value)


quiet_defaults()

CHECKPOINT_DIR = Path("checkpoints")  # resumable training states, one directory per stage run; outside DVC


def stage_checkpoints(stage):
    """The checkpoint directory of DVC stage `stage` (`teacher`, `distill@<run>`, `distill_fewstep@<run>`), or None
    for a stage that keeps none."""
    kind, _, run = stage.partition("@")
    if kind == "teacher":
        return CHECKPOINT_DIR / "teacher"
    if kind in ("distill", "distill_fewstep"):
        return CHECKPOINT_DIR / f"distill-{run}"
    return None


def seed_everything(seed):
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def distributed():
    """(rank, device) of this process: a torch.distributed group under torchrun (NCCL on GPUs, gloo on
    CPU), or (0, the default device) for a plain process."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield 0, device()
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield dist.get_rank(), torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    finally:
        dist.destroy_process_group()


def fingerprint(config, files=()):
    """sha256 over a JSON-able config and the bytes of input files: resume only into the same run."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for f in files:
        for path in sorted(Path(f).rglob("*")) if Path(f).is_dir() else [Path(f)]:
            if path.is_file():
                h.update(path.name.encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def kimg_bar(total_kimg, desc):
    from tqdm import tqdm

    return tqdm(
        total=round(total_kimg, 3),
        desc=desc,
        unit="kimg",
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}]{postfix}",
        mininterval=2.0,
    )
