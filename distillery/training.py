"""Training loops: the EDM teacher and one-step distillation, both resumable bit for bit on CPU.

All randomness comes from the global torch RNG, whose state is part of every checkpoint, so a run
interrupted after a checkpoint and resumed ends with exactly the weights of an uninterrupted run.
"""

import contextlib
import copy
from pathlib import Path

import torch
import torch.distributed as dist

from distillery.checkpoint import load_state, rng_state, save_state, set_rng_state
from distillery.edm import edm_loss, ema_update, ramped_lr


def sanitize_grads(module):
    # NaN/Inf gradients would poison Adam's moments for good; zero them as EDM and SiD do
    for p in module.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)


class Schedule:
    """Fires once each time the image counter crosses a multiple of `every_kimg`."""

    def __init__(self, every_kimg):
        self.every = int(every_kimg * 1000) if every_kimg else 0

    def due(self, before, after):
        return self.every > 0 and after // self.every > before // self.every


def resume_state(path, fingerprint):
    """The saved state at `path` if it was written by a run with the same fingerprint, else None."""
    if path is None or not Path(path).exists():
        return None
    state = load_state(path)
    return state if state.get("fingerprint") == fingerprint else None


def train_teacher(net, images, labels, *, batch, lr, lr_rampup_kimg, duration_kimg, ema_halflife_kimg,
                  ema_rampup_ratio, P_mean=-1.2, P_std=1.2, checkpoint_path=None, checkpoint_kimg=0,
                  fingerprint="", on_progress=None):
    """EDM training (ALGORITHMS.md §1.2) on an in-memory data set; returns the EMA network."""
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    nimg = 0
    state = resume_state(checkpoint_path, fingerprint)
    if state is not None:
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        nimg = state["nimg"]
        set_rng_state(state["rng"])

    total = int(duration_kimg * 1000)
    checkpoints = Schedule(checkpoint_kimg)
    net.train()
    while nimg < total:
        idx = torch.randint(len(images), (batch,))
        loss = edm_loss(net, images[idx], labels[idx] if labels is not None else None, P_mean=P_mean, P_std=P_std)
        opt.zero_grad(set_to_none=True)
        loss.sum().mul(1 / batch).backward()
        for group in opt.param_groups:
            group["lr"] = ramped_lr(lr, nimg, lr_rampup_kimg)
        sanitize_grads(net)
        opt.step()
        ema_update(ema, net, nimg, batch, ema_halflife_kimg, ema_rampup_ratio)
        before, nimg = nimg, nimg + batch
        if on_progress:
            on_progress(nimg, {"loss": loss.mean().item()})
        if checkpoint_path and (checkpoints.due(before, nimg) and nimg < total):
            save_state(checkpoint_path, dict(fingerprint=fingerprint, nimg=nimg, net=net.state_dict(),
                                             ema=ema.state_dict(), opt=opt.state_dict(), rng=rng_state()))
    return ema


class ShardStreams:
    """One RNG stream per shard of the global batch.

    Every random draw for shard k (latents, labels, real batches, noise inside the losses) comes from
    stream k, so the same params give the same training whether the shards run as gradient-accumulation
    rounds in one process or spread over DDP ranks (then equal up to float summation order)."""

    def __init__(self, seed, shards, device):
        self.device = torch.device(device)
        self.cpu, self.cuda = [], []
        for k in range(shards):
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed * 1_000_003 + k)
                self.cpu.append(torch.get_rng_state())
                self.cuda.append(torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)

    @contextlib.contextmanager
    def use(self, k):
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.set_rng_state(self.cpu[k])
            if self.cuda[k] is not None:
                torch.cuda.set_rng_state(self.cuda[k], self.device)
            yield
            self.cpu[k] = torch.get_rng_state()
            if self.cuda[k] is not None:
                self.cuda[k] = torch.cuda.get_rng_state(self.device)

    def state(self, shards):
        return {k: (self.cpu[k], self.cuda[k]) for k in shards}

    def load(self, states):
        for k, (cpu, cuda) in states.items():
            self.cpu[k], self.cuda[k] = cpu, cuda


def world():
    """(rank, world size) of the torch.distributed group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_grads(module):
    # summing the shard-averaged gradients of all ranks gives the global-batch gradient
    if world()[1] > 1:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)


def gather_to_rank0(obj):
    rank, size = world()
    if size == 1:
        return [obj]
    objs = [None] * size
    dist.all_gather_object(objs, obj)
    return objs


def distill(method, teacher, generator, aux, *, batch, lr, betas, eps, duration_kimg, ema_halflife_kimg,
            ema_rampup_ratio, generator_betas=None, label_dim=0, real_images=None, real_labels=None, seed=0, shards=1,
            checkpoint_path=None, checkpoint_kimg=0, fingerprint="", monitor=None, monitor_kimg=0,
            on_progress=None):
    """One-step distillation: per iteration one auxiliary update (fake score or discriminator) and one
    generator update, in the order the method asks for (`method.generator_first`).

    The global batch is split into `shards` micro-batches with their own RNG streams (ShardStreams);
    under torch.distributed each rank takes an equal share of them and gradients are all-reduced.
    Rank 0 alone monitors, checkpoints and reports progress. `real_images` (float, or uint8 converted per batch)
    and `real_labels` (class indices) are the data set of the methods that train against data (GDD).
    `monitor(ema) -> float` (e.g. a small-sample FID, lower is better) runs every `monitor_kimg` and
    at the end; the EMA weights with the lowest value are kept as the "best" snapshot.
    Returns (ema, best, history) with best = {value, kimg, ema state} and history = [(kimg, value), ...].
    """
    rank, size = world()
    if batch % shards or shards % size:
        raise ValueError(f"batch {batch} must split into {shards} shards, and the shards over {size} processes")
    micro, mine = batch // shards, range(rank * shards // size, (rank + 1) * shards // size)
    device = next(generator.parameters()).device
    shape = [generator.img_channels, generator.img_resolution, generator.img_resolution]
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    ema = copy.deepcopy(generator).eval().requires_grad_(False)
    opt_g, opt_aux = method.optimizers(generator, aux, lr, betas, eps, generator_betas)
    streams = ShardStreams(seed, shards, device)
    nimg, step, history, best = 0, 0, [], None
    state = resume_state(checkpoint_path, fingerprint)
    if state is not None:
        for module, key in [(generator, "generator"), (aux, "aux"), (ema, "ema"), (opt_g, "opt_g"), (opt_aux, "opt_aux")]:
            module.load_state_dict(state[key])
        nimg, step, history, best = state["nimg"], state["step"], [tuple(h) for h in state["history"]], state["best"]
        streams.load(state["streams"])

    def draw():
        z = torch.randn([micro, *shape], device=device)
        c = torch.eye(label_dim, device=device)[torch.randint(label_dim, (micro,), device=device)] if label_dim else None
        real = None
        if real_images is not None:  # a data batch for the methods that train against data (GDD)
            idx = torch.randint(len(real_images), (micro,))
            x = real_images[idx].to(device)
            x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x  # data sets too big for float32 stay uint8
            c_real = torch.eye(label_dim, device=device)[real_labels[idx].to(device)] if real_labels is not None else None
            real = (x, c_real)
        return z, c, real

    def update(opt, module, loss_of, batches=None):
        """One optimiser step on the global batch; returns (loss, the shards' batches). `batches` reuses an earlier
        update's draws (GDD's R1 step sees the real batch of the D step)."""
        opt.zero_grad(set_to_none=True)
        total, drawn = torch.zeros([], device=device), {}
        for k in mine:
            with streams.use(k):
                drawn[k] = batches[k] if batches is not None else draw()
                loss = loss_of(*drawn[k]) / shards
                loss.backward()
            total += loss.detach()
        all_reduce_grads(module)
        sanitize_grads(module)
        opt.step()
        if size > 1:
            dist.all_reduce(total)
        return total.item(), drawn

    def aux_update():
        aux.train()
        loss, drawn = update(opt_aux, aux, lambda z, c, real: method.aux_loss(generator, aux, z, c, real=real))
        if method.regularizer_due(step):
            update(opt_aux, aux, lambda z, c, real: method.regularizer_loss(aux, c, real=real), batches=drawn)
        return loss

    def generator_update():
        return update(opt_g, generator, lambda z, c, real: method.generator_loss(generator, aux, teacher, z, c, real=real))[0]

    def evaluate():
        nonlocal best
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            value = float(monitor(ema))
        history.append((nimg / 1000, value))
        if best is None or value < best["value"]:
            best = {"value": value, "kimg": nimg / 1000, "ema": {k: v.clone() for k, v in ema.state_dict().items()}}

    total = int(duration_kimg * 1000)
    checkpoints, monitors = Schedule(checkpoint_kimg), Schedule(monitor_kimg)
    generator.train()
    while nimg < total:
        if method.generator_first:
            loss_g = generator_update()
            loss_aux = aux_update()
        else:
            loss_aux = aux_update()
            loss_g = generator_update()
        ema_update(ema, generator, nimg, batch, ema_halflife_kimg, ema_rampup_ratio)
        before, nimg, step = nimg, nimg + batch, step + 1
        if rank == 0 and on_progress:
            on_progress(nimg, {"loss_g": loss_g, "loss_aux": loss_aux})
        if rank == 0 and monitor and (monitors.due(before, nimg) or nimg >= total):
            evaluate()
        if checkpoint_path and checkpoints.due(before, nimg) and nimg < total:
            all_streams = {k: v for part in gather_to_rank0(streams.state(mine)) for k, v in part.items()}
            if rank == 0:
                save_state(checkpoint_path, dict(
                    fingerprint=fingerprint, nimg=nimg, step=step, generator=generator.state_dict(),
                    aux=aux.state_dict(), ema=ema.state_dict(), opt_g=opt_g.state_dict(),
                    opt_aux=opt_aux.state_dict(), history=history, best=best, streams=all_streams))
    return ema, best, history
