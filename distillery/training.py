"""Training loops: the EDM teacher and one-step distillation, both resumable bit for bit on CPU.

All randomness comes from the global torch RNG, whose state is part of every checkpoint, so a run
interrupted after a checkpoint and resumed ends with exactly the weights of an uninterrupted run.
"""

import contextlib
import copy
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from distillery.checkpoint import rng_state, set_rng_state
from distillery.edm import edm_loss, ema_update, ramped_lr

NONFINITE_LIMIT = 10  # non-finite steps a run tolerates by default (params: teacher/distill.nonfinite_limit)


def sanitize_grads(module):
    # NaN/Inf gradients would poison Adam's moments for good: NaN → 0, ±Inf → ±1e5, as the EDM, SiD, DI and GDD loops
    for p in module.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)


def grads_finite(module):
    """Whether every gradient of `module` is finite, as a bool tensor (no host sync of its own)."""
    flags = [p.grad.isfinite().all() for p in module.parameters() if p.grad is not None]
    return torch.stack(flags).all() if flags else torch.tensor(True)


class Divergence(NamedTuple):
    """Why a run stopped early: more non-finite steps than its limit."""

    kimg: float  # images seen when the run stopped, in thousands
    loss: str  # the loss whose value or gradient went non-finite first (loss_g, loss_aux, loss_reg; the teacher's loss)
    first_kimg: float  # images seen after that first non-finite step, in thousands


class NonFiniteSteps:
    """The non-finite steps of a run: steps where a loss or a gradient before `sanitize_grads` is NaN/±Inf.

    sanitize_grads lets a run through an isolated bad step, as the reference loops do; a run that keeps making them
    has blown up (its updates are all zeroed or clipped), so past `limit` of them it stops as diverged."""

    def __init__(self, limit):
        self.limit, self.count, self.first, self.step = limit, 0, None, []  # first: (kimg, loss name)

    def check(self, name, loss_finite, grads_finite):
        """Note the update `name` of the current step if its loss or its gradients were non-finite."""
        if not (bool(loss_finite) and bool(grads_finite)):
            self.step.append(name)

    def end_step(self, nimg):
        """Close the step after which `nimg` images have been seen; True when the run has now diverged."""
        if self.step:
            self.count += 1
            self.first = self.first or (nimg / 1000, self.step[0])
            self.step = []
        return self.count > self.limit

    def divergence(self, nimg):
        return Divergence(nimg / 1000, self.first[1], self.first[0])

    def state_dict(self):
        return {"count": self.count, "first": self.first}

    def load_state_dict(self, state):
        self.count, self.first = state["count"], None if state["first"] is None else tuple(state["first"])


class TeacherResult(NamedTuple):
    ema: torch.nn.Module
    nonfinite_steps: int
    diverged: Divergence | None  # None: the run trained for its whole duration


class Schedule:
    """Fires once each time the image counter crosses a multiple of `every_kimg`."""

    def __init__(self, every_kimg):
        self.every = int(every_kimg * 1000) if every_kimg else 0

    def due(self, before, after):
        return self.every > 0 and after // self.every > before // self.every


def train_teacher(
    net,
    images,
    labels,
    *,
    batch,
    lr,
    lr_rampup_kimg,
    duration_kimg,
    ema_halflife_kimg,
    ema_rampup_ratio,
    P_mean=-1.2,
    P_std=1.2,
    augment_pipe=None,
    checkpoints=None,
    checkpoint_kimg=0,
    on_progress=None,
    nonfinite_limit=NONFINITE_LIMIT,
):
    """EDM training (docs/methods.md §1.2) on an in-memory data set, with EDM's augmentation when `augment_pipe`
    is given (its labels train the net's augment map); returns a TeacherResult: the EMA network, and how it ended.
    With `checkpoints` (distillery.checkpoint.Checkpoints) it resumes from the newest one and saves one every
    `checkpoint_kimg`. More than `nonfinite_limit` non-finite steps stop the run as diverged, its last checkpoint left
    as it was."""
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    nimg, nonfinite = 0, NonFiniteSteps(nonfinite_limit)
    state = checkpoints.latest() if checkpoints else None
    if state is not None:
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        nimg = state["nimg"]
        nonfinite.load_state_dict(state["nonfinite"])
        set_rng_state(state["rng"])

    total = int(duration_kimg * 1000)
    saves = Schedule(checkpoint_kimg)
    net.train()
    while nimg < total:
        idx = torch.randint(len(images), (batch,))
        loss = edm_loss(
            net,
            images[idx],
            labels[idx] if labels is not None else None,
            augment_pipe=augment_pipe,
            P_mean=P_mean,
            P_std=P_std,
        )
        opt.zero_grad(set_to_none=True)
        loss.sum().mul(1 / batch).backward()
        for group in opt.param_groups:
            group["lr"] = ramped_lr(lr, nimg, lr_rampup_kimg)
        nonfinite.check("loss", loss.isfinite().all(), grads_finite(net))
        sanitize_grads(net)
        opt.step()
        ema_update(ema, net, nimg, batch, ema_halflife_kimg, ema_rampup_ratio)
        before, nimg = nimg, nimg + batch
        if on_progress:
            on_progress(nimg, {"loss": loss.mean().item()})
        if nonfinite.end_step(nimg):
            return TeacherResult(ema, nonfinite.count, nonfinite.divergence(nimg))
        if checkpoints and (saves.due(before, nimg) and nimg < total):
            checkpoints.save(
                nimg,
                dict(
                    nimg=nimg,
                    net=net.state_dict(),
                    ema=ema.state_dict(),
                    opt=opt.state_dict(),
                    nonfinite=nonfinite.state_dict(),
                    rng=rng_state(),
                ),
            )
    return TeacherResult(ema, nonfinite.count, None)


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


class DistillConfig(NamedTuple):
    """The settings of one distillation run (the `distill` section of params.yaml, resolved for one method)."""

    batch: int
    lr: float
    betas: tuple[float, float]
    eps: float
    duration_kimg: float
    ema_halflife_kimg: float
    ema_rampup_ratio: float
    generator_betas: tuple[float, float] | None = None  # the generator's own Adam betas, where they differ
    seed: int = 0
    shards: int = 1  # micro-batches of the global batch, one RNG stream each
    checkpoint_kimg: float = 0
    monitor_kimg: float = 0
    nonfinite_limit: int = NONFINITE_LIMIT  # non-finite steps tolerated before the run stops as diverged


class TrainingData(NamedTuple):
    """The data set a run draws from: images for the methods that train against data (GDD; float, or uint8 converted
    per batch), class indices from which conditional runs draw their labels, as the reference loops do."""

    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class Distillation:
    """The state of a one-step distillation run and its iteration: one auxiliary update (fake score or
    discriminator) and one generator update, in the order the method asks for (`method.generator_first`).

    The global batch is split into `config.shards` micro-batches with their own RNG streams (ShardStreams);
    under torch.distributed each rank takes an equal share of them and gradients are all-reduced.
    """

    def __init__(self, method, teacher, generator, aux, config, data=None, label_dim=0):
        self.rank, self.size = world()
        if config.batch % config.shards or config.shards % self.size:
            raise ValueError(
                f"batch {config.batch} must split into {config.shards} shards, "
                f"and the shards over {self.size} processes"
            )
        self.method, self.teacher, self.generator, self.aux, self.config = method, teacher, generator, aux, config
        self.data, self.label_dim = data or TrainingData(), label_dim
        self.micro = config.batch // config.shards
        self.mine = range(self.rank * config.shards // self.size, (self.rank + 1) * config.shards // self.size)
        self.device = next(generator.parameters()).device
        self.shape = [generator.img_channels, generator.img_resolution, generator.img_resolution]
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.ema = copy.deepcopy(generator).eval().requires_grad_(False)
        self.opt_g, self.opt_aux = method.optimizers(
            generator, aux, config.lr, config.betas, config.eps, config.generator_betas
        )
        self.streams = ShardStreams(config.seed, config.shards, self.device)
        self.nimg, self.step, self.history, self.best = 0, 0, [], None
        self.nonfinite = NonFiniteSteps(config.nonfinite_limit)

    # --- Checkpoint state ------------------------------------------------------------------------------------------

    def state_dict(self):
        """Everything a resumed run needs to continue bit for bit (collective under DDP: gathers the RNG streams)."""
        streams = {k: v for part in gather_to_rank0(self.streams.state(self.mine)) for k, v in part.items()}
        return dict(
            nimg=self.nimg,
            step=self.step,
            generator=self.generator.state_dict(),
            aux=self.aux.state_dict(),
            ema=self.ema.state_dict(),
            opt_g=self.opt_g.state_dict(),
            opt_aux=self.opt_aux.state_dict() if self.opt_aux else None,
            history=self.history,
            best=self.best,
            nonfinite=self.nonfinite.state_dict(),
            streams=streams,
        )

    def load_state_dict(self, state):
        for module, key in [
            (self.generator, "generator"),
            (self.aux, "aux"),
            (self.ema, "ema"),
            (self.opt_g, "opt_g"),
            (self.opt_aux, "opt_aux"),
        ]:
            if module is not None:
                module.load_state_dict(state[key])
        self.nimg, self.step, self.best = state["nimg"], state["step"], state["best"]
        self.history = [tuple(h) for h in state["history"]]
        self.nonfinite.load_state_dict(state["nonfinite"])
        self.streams.load(state["streams"])

    # --- One iteration ---------------------------------------------------------------------------------------------

    def draw(self):
        """A shard's latents z, class labels c and real batch (x, c) or None, from its RNG stream.

        Conditional runs take the labels of a data batch when the data set is given (GDD's generator sees the real
        batch's labels), else uniform ones."""
        z = torch.randn([self.micro, *self.shape], device=self.device)
        images, labels = self.data
        from_data = images is not None or (self.label_dim and labels is not None)
        idx = torch.randint(len(images if images is not None else labels), (self.micro,)) if from_data else None
        c = None
        if self.label_dim:
            classes = (
                labels[idx].to(self.device)
                if idx is not None
                else torch.randint(self.label_dim, (self.micro,), device=self.device)
            )
            c = torch.eye(self.label_dim, device=self.device)[classes]
        if images is None:
            return z, c, None
        x = images[idx].to(self.device)
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x  # data sets too big for float32 stay uint8
        return z, c, (x, c)

    def update(self, name, opt, module, loss_of, batches=None):
        """One optimiser step of `module` on the global batch; returns (loss, the shards' draws), and notes the
        update as `name` in the step's non-finite updates when its loss or a gradient was NaN/Inf. `batches` reuses
        an earlier update's draws (GDD's R1 step sees the real batch of the D step)."""
        opt.zero_grad(set_to_none=True)
        total, drawn = torch.zeros([], device=self.device), {}
        for k in self.mine:
            with self.streams.use(k):
                drawn[k] = batches[k] if batches is not None else self.draw()
                loss = loss_of(*drawn[k]) / self.config.shards
                loss.backward()
            total += loss.detach()
        all_reduce_grads(module)
        finite = grads_finite(module)  # the all-reduced gradients, before sanitising
        sanitize_grads(module)
        opt.step()
        if self.size > 1:
            # the loss and a "some rank saw a non-finite gradient" count in one collective: every rank decides alike
            reduced = torch.stack([total, (~finite).to(total)])
            dist.all_reduce(reduced)
            total, finite = reduced[0], reduced[1] == 0
        self.nonfinite.check(name, total.isfinite(), finite)
        return total.item(), drawn

    def aux_update(self):
        """The auxiliary net's optimiser step, or, for a method whose auxiliary net is not trained by a loss (the
        consistency target), its own update."""
        method, generator, aux = self.method, self.generator, self.aux
        if self.opt_aux is None:
            method.update_aux(generator, aux, self.nimg + self.config.batch)
            return None
        aux.train()
        loss, drawn = self.update(
            "loss_aux", self.opt_aux, aux, lambda z, c, real: method.aux_loss(generator, aux, z, c, real=real)
        )
        if method.regularizer_due(self.step):
            self.update(
                "loss_reg", self.opt_aux, aux, lambda z, c, real: method.regularizer_loss(aux, c, real=real), drawn
            )
        return loss

    def generator_update(self):
        method, generator, aux, teacher = self.method, self.generator, self.aux, self.teacher
        generator.train()  # G trains with its dropout, as in the reference loops
        return self.update(
            "loss_g",
            self.opt_g,
            generator,
            lambda z, c, real: method.generator_loss(generator, aux, teacher, z, c, real=real),
        )[0]

    def iteration(self):
        """One auxiliary update and, every `generator_every`-th iteration (DMD2's two time scales), one generator
        update, then the EMA; returns the losses of the updates made."""
        losses = {}
        due = self.step % self.method.generator_every == 0
        if self.method.generator_first and due:
            losses["loss_g"] = self.generator_update()
        loss_aux = self.aux_update()
        if loss_aux is not None:
            losses["loss_aux"] = loss_aux
        if not self.method.generator_first and due:
            losses["loss_g"] = self.generator_update()
        c = self.config
        ema_update(self.ema, self.generator, self.nimg, c.batch, c.ema_halflife_kimg, c.ema_rampup_ratio)
        self.nimg, self.step = self.nimg + c.batch, self.step + 1
        return losses

    # --- Monitoring ------------------------------------------------------------------------------------------------

    def observe(self, monitor):
        """Record monitor(ema) (lower is better) in the history; the EMA with the lowest finite value becomes
        "best" (a non-finite value, e.g. the FID of a generator that makes NaN images, never does)."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            value = float(monitor(self.ema))
        self.history.append((self.nimg / 1000, value))
        if math.isfinite(value) and (self.best is None or value < self.best["value"]):
            self.best = {
                "value": value,
                "kimg": self.nimg / 1000,
                "ema": {k: v.clone() for k, v in self.ema.state_dict().items()},
            }

    def result(self, diverged=None):
        return DistillResult(self.ema, self.best, self.history, self.nonfinite.count, diverged)


class DistillResult(NamedTuple):
    ema: torch.nn.Module
    best: dict | None  # {value, kimg, ema state} of the best monitored EMA; None when no monitored value was finite
    history: list  # [(kimg, monitor value), ...]
    nonfinite_steps: int = 0
    diverged: Divergence | None = None  # None: the run trained for its whole duration


def distill(
    method,
    teacher,
    generator,
    aux,
    config,
    *,
    data=None,
    label_dim=0,
    checkpoints=None,
    monitor=None,
    on_progress=None,
):
    """One-step distillation (docs/methods.md §3) for `config.duration_kimg` thousand images, resumable.

    `monitor(ema) -> float` (e.g. a small-sample FID) runs every `config.monitor_kimg` and at the end. Every rank
    resumes from the newest of `checkpoints` (distillery.checkpoint.Checkpoints); rank 0 alone monitors, saves one
    every `config.checkpoint_kimg` and reports progress through `on_progress(nimg, losses)`. More than
    `config.nonfinite_limit` non-finite steps stop the run as diverged (every rank at the same step): it returns at
    once, without a monitor value or checkpoint of the blown-up state.
    """
    run = Distillation(method, teacher, generator, aux, config, data=data, label_dim=label_dim)
    state = checkpoints.latest() if checkpoints else None
    if state is not None:
        run.load_state_dict(state)

    total = int(config.duration_kimg * 1000)
    saves, monitors = Schedule(config.checkpoint_kimg), Schedule(config.monitor_kimg)
    while run.nimg < total:
        before = run.nimg
        losses = run.iteration()
        if run.rank == 0 and on_progress:
            on_progress(run.nimg, losses)
        if run.nonfinite.end_step(run.nimg):
            return run.result(run.nonfinite.divergence(run.nimg))
        if run.rank == 0 and monitor and (monitors.due(before, run.nimg) or run.nimg >= total):
            run.observe(monitor)
        if checkpoints and saves.due(before, run.nimg) and run.nimg < total:
            state = run.state_dict()
            if run.rank == 0:
                checkpoints.save(run.nimg, state)
    return run.result()
