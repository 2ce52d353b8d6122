"""Diff-Instruct (Luo et al., NeurIPS 2023), docs/methods.md §3.4.

The generator minimises the integral KL divergence from the teacher: per sample the surrogate
(D_ψ(x_t) − D_φ(x_t))·x_g with both denoisers evaluated without gradient, so the signal pushed into
x_g is D_ψ − D_φ = σ²(s_ψ − s_φ), weight 1, no normaliser. σ ~ lognormal(P_mean, P_std).

Quirk kept from the reference code: during the generator loss the teacher and the fake net both run
in *train* mode (dropout on), and the random state is rewound between the two forward passes so that
both draw the same dropout masks; where their weights agree their outputs then agree exactly.
loss_scale_g = 1 is the reference code's default generator loss scaling.
"""

import contextlib

import torch

from distillery.edm import broadcast_per_sample
from distillery.methods.base import FakeScoreMethod, finite_rows
from distillery.registry import DiffInstructSettings


@contextlib.contextmanager
def train_mode(*nets):
    """Train mode for every nn.Module among `nets` inside the block; their modes restored afterwards."""
    modules = [net for net in nets if isinstance(net, torch.nn.Module)]
    was_training = [module.training for module in modules]
    for module in modules:
        module.train()
    try:
        yield
    finally:
        for module, mode in zip(modules, was_training):
            module.train(mode)


def forked_rng(device):
    """A block after which the CPU random state, and that of `device` if it is an accelerator, is rewound."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def same_dropout_pair(teacher, fake, x_t, sigma, class_labels=None):
    """D_φ(x_t) and D_ψ(x_t), both in train mode with identical dropout masks (§3.4)."""
    with train_mode(teacher, fake):
        with forked_rng(x_t.device):
            d_teacher = teacher(x_t, sigma, class_labels)
        return d_teacher, fake(x_t, sigma, class_labels)


def diff_instruct_loss(x_g, d_teacher, d_fake):
    """Per-sample Diff-Instruct surrogate, [B]; the denoiser outputs must carry no gradient (§3.4)."""
    # §3.4: L = (D_psi(x_t) - D_phi(x_t)) . x_g, so dL/dx_g = D_psi - D_phi (reverse KL), weight 1.
    return ((d_fake - d_teacher) * x_g).flatten(1).sum(1)


class DiffInstruct(FakeScoreMethod):
    """Diff-Instruct generator loss; the fake-score update is the shared one of FakeScoreMethod."""

    def __init__(self, **settings):
        s = DiffInstructSettings(**settings)
        super().__init__(s)
        self.loss_scale_g = s.loss_scale_g

    def generator_loss(self, generator, aux, teacher, z, class_labels=None, real=None):
        """Scalar generator loss: sum of per-sample surrogates * loss_scale_g / batch.

        Gradients reach the generator only through the explicit x_g factor; neither denoiser is
        differentiated, so no gradient reaches teacher or fake parameters.
        """
        x_g = self.generate(generator, z, class_labels)
        # Non-finite samples contribute exactly zero (their rows are zeroed, as in SiD).
        keep = finite_rows(x_g)
        x_g = torch.where(broadcast_per_sample(keep, x_g), x_g, 0)
        with torch.no_grad():
            rnd_normal = torch.randn([x_g.shape[0]], dtype=x_g.dtype, device=x_g.device)
            sigma = broadcast_per_sample((rnd_normal * self.P_std + self.P_mean).exp(), x_g)
            x_t = x_g + sigma * torch.randn_like(x_g)
            d_teacher, d_fake = same_dropout_pair(teacher, aux, x_t, sigma, class_labels)
        keep = broadcast_per_sample(keep & finite_rows(d_teacher) & finite_rows(d_fake), x_g)
        x_g, d_teacher, d_fake = (torch.where(keep, t, 0) for t in (x_g, d_teacher, d_fake))
        return diff_instruct_loss(x_g, d_teacher, d_fake).sum() * self.loss_scale_g / z.shape[0]
