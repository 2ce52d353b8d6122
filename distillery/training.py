"""Training loops: the EDM teacher and one-step distillation, both resumable bit for bit on CPU.

All randomness comes from the global torch RNG, whose state is part of every checkpoint, so a run
interrupted after a checkpoint and resumed ends with exactly the weights of an uninterrupted run.
"""

import copy
from pathlib import Path

import torch

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


def distill(method, teacher, generator, aux, *, batch, lr, betas, eps, duration_kimg, ema_halflife_kimg,
            ema_rampup_ratio, label_dim=0, real_images=None, real_labels=None, checkpoint_path=None,
            checkpoint_kimg=0, fingerprint="", monitor=None, monitor_kimg=0, on_progress=None):
    """One-step distillation: per iteration one auxiliary update (fake score or discriminator) and one
    generator update, in the order the method asks for (`method.generator_first`).

    `monitor(ema) -> float` (e.g. a small-sample FID, lower is better) runs every `monitor_kimg` and
    at the end; the EMA weights with the lowest value are kept as the "best" snapshot.
    Returns (ema, best, history) with best = {value, kimg, ema state} and history = [(kimg, value), ...].
    """
    shape = [generator.img_channels, generator.img_resolution, generator.img_resolution]
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    ema = copy.deepcopy(generator).eval().requires_grad_(False)
    opt_g, opt_aux = method.optimizers(generator, aux, lr, betas, eps)
    nimg, step, history, best = 0, 0, [], None
    state = resume_state(checkpoint_path, fingerprint)
    if state is not None:
        for module, key in [(generator, "generator"), (aux, "aux"), (ema, "ema"), (opt_g, "opt_g"), (opt_aux, "opt_aux")]:
            module.load_state_dict(state[key])
        nimg, step, history, best = state["nimg"], state["step"], [tuple(h) for h in state["history"]], state["best"]
        set_rng_state(state["rng"])

    def draw():
        z = torch.randn([batch, *shape])
        c = torch.eye(label_dim)[torch.randint(label_dim, (batch,))] if label_dim else None
        return z, c

    def draw_real():
        """A batch of (images, labels or None) from the data set, for methods that train against data."""
        if real_images is None:
            return None
        idx = torch.randint(len(real_images), (batch,))
        return real_images[idx], (real_labels[idx] if real_labels is not None else None)

    def aux_update(real):
        aux.train()
        z, c = draw()
        loss = method.aux_loss(generator, aux, z, c, real=real, step=step)
        opt_aux.zero_grad(set_to_none=True)
        loss.backward()
        sanitize_grads(aux)
        opt_aux.step()
        return loss.item()

    def generator_update(real):
        z, c = draw()
        loss = method.generator_loss(generator, aux, teacher, z, c, real=real)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        sanitize_grads(generator)
        opt_g.step()
        return loss.item()

    def evaluate():
        nonlocal best
        saved = rng_state()  # monitoring must not shift the training random stream
        value = float(monitor(ema))
        set_rng_state(saved)
        history.append((nimg / 1000, value))
        if best is None or value < best["value"]:
            best = {"value": value, "kimg": nimg / 1000, "ema": {k: v.clone() for k, v in ema.state_dict().items()}}

    total = int(duration_kimg * 1000)
    checkpoints, monitors = Schedule(checkpoint_kimg), Schedule(monitor_kimg)
    generator.train()
    while nimg < total:
        real = draw_real()
        if method.generator_first:
            loss_g = generator_update(real)
            loss_aux = aux_update(real)
        else:
            loss_aux = aux_update(real)
            loss_g = generator_update(real)
        ema_update(ema, generator, nimg, batch, ema_halflife_kimg, ema_rampup_ratio)
        before, nimg, step = nimg, nimg + batch, step + 1
        if on_progress:
            on_progress(nimg, {"loss_g": loss_g, "loss_aux": loss_aux})
        if monitor and (monitors.due(before, nimg) or nimg >= total):
            evaluate()
        if checkpoint_path and checkpoints.due(before, nimg) and nimg < total:
            save_state(checkpoint_path, dict(fingerprint=fingerprint, nimg=nimg, step=step, generator=generator.state_dict(),
                                             aux=aux.state_dict(), ema=ema.state_dict(), opt_g=opt_g.state_dict(),
                                             opt_aux=opt_aux.state_dict(), history=history, best=best, rng=rng_state()))
    return ema, best, history
