"""SiD: Score identity Distillation (Zhou et al., ICML 2024), docs/methods.md §3.1."""

import torch

from distillery.methods.base import FakeScoreMethod
from distillery.registry import SiDSettings


def sid_sigmas(batch_size, t_max=800, sigma_min=0.002, sigma_max=80, rho=7, device=None):
    """Generator-loss noise levels [B, 1, 1, 1]: uniform over the first t_max/1000 of the Karras schedule
    counted from the clean end, i.e. sigma in [sigma_min, sigma(t_max)] (= [0.002, 24.41] by default)."""
    u = torch.rand([batch_size, 1, 1, 1], device=device) * (t_max / 1000)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + (1 - u) * (lo - hi)) ** rho


def sid_loss_core(x_g, d_teacher, d_fake, alpha):
    """Un-normalised SiD generator loss per sample, [B]:
    (D_phi - D_psi) . [(D_phi - x_g) - alpha (D_phi - D_psi)] summed over pixels (§3.1)."""
    diff = d_teacher - d_fake
    return (diff * ((d_teacher - x_g) - alpha * diff)).flatten(1).sum(1)


def sid_generator_loss(x_g, d_teacher, d_fake, alpha):
    """SiD generator loss per sample, [B]: the core divided by sg(mean_pixels |x_g - D_phi|) >= 1e-5 (§3.1)."""
    normaliser = (x_g - d_teacher).abs().flatten(1).mean(1).clamp(min=1e-5).detach()
    return sid_loss_core(x_g, d_teacher, d_fake, alpha) / normaliser


class SiD(FakeScoreMethod):
    """SiD generator loss; the fake-score update is the shared one of FakeScoreMethod."""

    def __init__(self, **settings):
        s = SiDSettings(**settings)
        super().__init__(s)
        self.alpha, self.t_max, self.loss_scale_g = s.alpha, s.t_max, s.loss_scale_g

    def generator_loss(self, generator, aux, teacher, z, class_labels=None, real=None):
        """Scalar generator loss: sum of per-sample SiD losses * loss_scale_g / batch.

        Gradients reach the generator through x_g and through the inputs of both (frozen) denoisers.
        """
        x_g, _, d_teacher, d_fake = self.diffused_pair(
            generator, aux, teacher, z, class_labels, lambda n, device: sid_sigmas(n, self.t_max, device=device)
        )
        per_sample = sid_generator_loss(x_g, d_teacher, d_fake, self.alpha)
        return per_sample.sum() * self.loss_scale_g / z.shape[0]
