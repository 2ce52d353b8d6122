"""Generate image sets from fixed seeds, EDM-style: image i depends only on seed i."""

import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from distillery.edm import heun_sampler, seeded_draws
from distillery.metrics import to_uint8


def heun(net, num_steps):
    """The teacher: deterministic Heun from σ_max (2·num_steps − 1 denoiser calls)."""
    return lambda latents, labels, noise=None: heun_sampler(net, latents, labels, num_steps=num_steps)


def one_step(generator, sigma_init):
    """A one-step student: x = G(σ_init·z; σ_init) (SiD/SIM generator parametrisation)."""
    sigma = torch.tensor(sigma_init)
    return lambda latents, labels, noise=None: generator(
        latents * sigma_init, sigma.to(latents.device).expand(len(latents)), labels
    )


# The data lie in [-1, 1]. A coarse sampler of a crude net strays further (4-step Heun samples of the micro profile's
# 3-kimg teacher reach ±10.6), but nets trained at a blow-up rate (SiD, SIM, Diff-Instruct, GDD, GDD-I at lr 10 on
# that teacher) give finite values of 1.3e3 to 1.1e4, which uint8 conversion would clip into images that still score.
BLOWN_UP = 100.0


def blown_up_rows(x):
    """Per image: NaN/Inf anywhere, or a value beyond ±BLOWN_UP."""
    flat = x.flatten(1)
    return ~flat.isfinite().all(1) | (flat.abs() > BLOWN_UP).any(1)


class SampleSet(NamedTuple):
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor | None  # class indices, or None when unconditional
    seconds: float  # pure sampling time, for images/s
    blown_up: int  # images of a diverged net: NaN/Inf values, or values beyond ±BLOWN_UP, before the uint8 conversion


@torch.no_grad()
def generate(sampler, seeds, shape, label_dim=0, batch=256, device="cpu", ranks=(0, 1)):
    """The images of `seeds`, `batch` seeds at a time. ranks = (rank, world size) of a torch.distributed group: this
    rank samples batches rank, rank + world, … of the one-process run, and every rank gets the whole set back in seed
    order, bit for bit that of one process, since every network sees the same batches (a net's output for an image
    may depend on its batch). Every rank must call it alike."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rank, world = ranks
    starts = range(0, len(seeds), batch)
    parts, seconds, blown_up = [], 0.0, 0
    for start in starts[rank::world]:
        latents, c, rnd = seeded_draws(seeds[start : start + batch], shape, label_dim, device)
        sync()
        t0 = time.perf_counter()
        x = sampler(latents, c, lambda k, like, rnd=rnd: rnd.randn_like(like))  # a K-step sampler's noise, per seed
        sync()
        seconds += time.perf_counter() - t0
        blown_up += int(blown_up_rows(x).sum())
        parts.append((to_uint8(x).cpu(), None if c is None else c.argmax(dim=1).cpu()))
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, (parts, seconds, blown_up))  # every rank gets every rank's share
        parts = [shares[i % world][0][i // world] for i in range(len(starts))]
        seconds = max(s for _, s, _ in shares)  # the ranks sample side by side
        blown_up = sum(b for _, _, b in shares)
    labels = torch.cat([c for _, c in parts]) if label_dim else None
    return SampleSet(torch.cat([x for x, _ in parts]), labels, seconds, blown_up)


def image_grid(images_uint8, rows, pad=1):
    """A rows×rows tile of the first images, separated by `pad` mid-grey pixels, as HxW(xC) uint8."""
    x = images_uint8[: rows * rows]
    n, c, h, w = x.shape
    x = torch.cat([x, torch.zeros([rows * rows - n, c, h, w], dtype=x.dtype)])
    x = torch.nn.functional.pad(x, (0, pad, 0, pad), value=128)
    h, w = h + pad, w + pad
    x = x.reshape(rows, rows, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, rows * w, c)
    return x[: rows * h - pad, : rows * w - pad].squeeze(-1).numpy()
