"""The interface every one-step distillation method shares, and the fake-score machinery of the
score-based ones (SiD, SIM, Diff-Instruct).

Per iteration the training loop makes one auxiliary update (a fake score network or a
discriminator) and one generator update, in the order the method asks for. A method's settings and
their defaults are defined once, in distillery/registry.py.
"""

import contextlib
import copy

import torch

from distillery.augment import AugmentPipe
from distillery.edm import broadcast_per_sample, edm_loss
from distillery.layers import UNetBlock
from distillery.sampling import one_step


def finite_rows(x):
    return x.flatten(1).isfinite().all(1)


@contextlib.contextmanager
def eval_mode(net):
    """`net` in eval mode inside the block (no dropout), its mode restored afterwards."""
    if not isinstance(net, torch.nn.Module):
        yield
        return
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


@contextlib.contextmanager
def frozen(net, keep_mode=False):
    """No parameter gradients for `net` inside the block, and eval mode unless keep_mode; both restored afterwards.

    Gradients still flow through the network's *inputs*, which the score-based generator losses need.
    """
    if not isinstance(net, torch.nn.Module):
        yield
        return
    flags = [(p, p.requires_grad) for p in net.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with contextlib.nullcontext() if keep_mode else eval_mode(net):
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class DistillationMethod:
    """A generator G (initialised from the teacher) evaluated once: x_g = G(σ_init·z; σ_init)."""

    needs_teacher = True  # GDD trains against real data only
    needs_real_data = False
    generator_first = False  # SiD/SIM/DI update the fake score first; GDD updates G first
    generator_every = 1  # G is updated every this many iterations, the auxiliary net every iteration (DMD2: 5)
    generator_dropout = None  # None keeps the teacher's dropout in G (SiD); GDD trains G without it

    def make_aux(self, teacher):
        """The auxiliary network: a fake score (a teacher copy) or a discriminator."""
        raise NotImplementedError

    def make_generator(self, teacher):
        """G starts as a copy of the teacher, with the method's dropout rate when it sets one."""
        generator = copy.deepcopy(teacher).requires_grad_(True)
        if self.generator_dropout is not None:
            for block in generator.modules():
                if isinstance(block, UNetBlock):
                    block.dropout = self.generator_dropout
        return generator

    def generator_parameters(self, generator):
        """The generator parameters the optimiser updates (GDD-I freezes most convolutions)."""
        return list(generator.parameters())

    def optimizers(self, generator, aux, lr, betas, eps, generator_betas=None):
        """Adam for both networks; `generator_betas` where G's differ (SiD's FFHQ-64 generator uses β₁ = 0.9)."""
        opt_g = torch.optim.Adam(
            self.generator_parameters(generator), lr=lr, betas=tuple(generator_betas or betas), eps=eps
        )
        opt_aux = torch.optim.Adam([p for p in aux.parameters() if p.requires_grad], lr=lr, betas=tuple(betas), eps=eps)
        return opt_g, opt_aux

    def generate(self, generator, z, class_labels=None):
        """One-step sample x_g = G(σ_init·z; σ_init)."""
        sigma = torch.full([z.shape[0]], self.sigma_init, dtype=z.dtype, device=z.device)
        return generator(self.sigma_init * z, broadcast_per_sample(sigma, z), class_labels)

    nfe = 1  # denoiser calls per sample

    def sampler(self, generator):
        """How a trained generator samples (`(latents, labels, noise) -> images`): one step from σ_init·z."""
        return one_step(generator, self.sigma_init)

    def generator_loss(self, generator, aux, teacher, z, class_labels=None, real=None):
        raise NotImplementedError

    def aux_loss(self, generator, aux, z, class_labels=None, real=None):
        raise NotImplementedError

    def update_aux(self, generator, aux, nimg):
        """The auxiliary net's update when `optimizers` gives it no optimiser (the consistency target's EMA, the
        progressive rounds' teacher), with `nimg` images seen once this iteration ends."""
        raise NotImplementedError

    def regularizer_due(self, step):
        """Whether iteration `step` (counted from 0) ends with an extra auxiliary step (GDD's lazy R1)."""
        return False

    def regularizer_loss(self, aux, class_labels=None, real=None):
        raise NotImplementedError


class FakeScoreMethod(DistillationMethod):
    """Score-based methods: the auxiliary network is a fake denoiser D_ψ of the generator's samples,
    initialised from the teacher and trained with the EDM loss (docs/methods.md §3, shared fake-score update)."""

    def __init__(self, settings):
        self.sigma_init = settings.sigma_init
        self.sigma_data = settings.sigma_data
        self.P_mean = settings.P_mean
        self.P_std = settings.P_std
        # SiD's fake-score loss sees EDM's augmented generator samples, with the augment labels (§3.1)
        self.augment = AugmentPipe.edm(settings.augment_p) if settings.augment_p > 0 else None

    def make_aux(self, teacher):
        return copy.deepcopy(teacher).train().requires_grad_(True)

    def aux_loss(self, generator, aux, z, class_labels=None, real=None):
        """EDM loss of the fake net on generator samples, summed / batch (§3).

        As in SiD's and Diff-Instruct's loops, the samples come from G in eval mode (no dropout), without gradient,
        and the fake net trains in train mode.
        Non-finite samples are dropped before the fake net sees them (their NaN activations would reach every
        weight gradient, even through zero upstream gradients); rows whose loss is non-finite are dropped after it.
        """
        with torch.no_grad(), eval_mode(generator):
            x_g = self.generate(generator, z, class_labels)
        keep = finite_rows(x_g)
        x_g = x_g[keep]
        class_labels = None if class_labels is None else class_labels[keep]
        if isinstance(aux, torch.nn.Module):
            aux.train()  # the fake net learns with its dropout
        loss = edm_loss(
            aux,
            x_g,
            class_labels,
            augment_pipe=self.augment,
            P_mean=self.P_mean,
            P_std=self.P_std,
            sigma_data=self.sigma_data,
        )
        return loss[finite_rows(loss)].sum() / z.shape[0]

    def denoise_pair(self, teacher, fake, x_t, sigma, class_labels):
        """D_φ(x_t) and D_ψ(x_t) with frozen weights, differentiable w.r.t. x_t."""
        with frozen(teacher), frozen(fake):
            return teacher(x_t, sigma, class_labels), fake(x_t, sigma, class_labels)

    def diffused_pair(self, generator, fake, teacher, z, class_labels, sigmas):
        """(x_g, σ, D_φ(x_t), D_ψ(x_t)) for x_t = x_g + σε with σ = sigmas(batch, device) — the common start of
        the SiD and SIM generator losses. Non-finite samples are zeroed: torch.where passes them no gradient, so
        they contribute exactly zero and cannot poison the other samples."""
        x_g = self.generate(generator, z, class_labels)
        keep = finite_rows(x_g)
        x_g = torch.where(broadcast_per_sample(keep, x_g), x_g, 0)
        sigma = broadcast_per_sample(sigmas(x_g.shape[0], x_g.device).flatten(), x_g).to(x_g.dtype)
        x_t = x_g + sigma * torch.randn_like(x_g)
        d_teacher, d_fake = self.denoise_pair(teacher, fake, x_t, sigma, class_labels)
        keep = broadcast_per_sample(keep & finite_rows(d_teacher) & finite_rows(d_fake), x_g)
        x_g, d_teacher, d_fake = (torch.where(keep, t, 0) for t in (x_g, d_teacher, d_fake))
        return x_g, sigma, d_teacher, d_fake
