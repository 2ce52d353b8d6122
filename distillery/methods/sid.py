"""SiD: Score identity Distillation (Zhou et al., ICML 2024), ALGORITHMS.md §3.1."""

import contextlib

import torch

from distillery.edm import broadcast_per_sample, edm_loss


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


def _finite_rows(x):
    return x.flatten(1).isfinite().all(1)


@contextlib.contextmanager
def _frozen(net):
    """Eval mode and no parameter gradients for `net` inside the block; both restored afterwards."""
    if not isinstance(net, torch.nn.Module):
        yield
        return
    was_training = net.training
    flags = [(p, p.requires_grad) for p in net.parameters()]
    net.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        net.train(was_training)


class SiD:
    """Generator and fake-score losses of SiD; networks are called as net(x, sigma, class_labels) -> D(x)."""

    def __init__(self, alpha=1.2, sigma_init=2.5, t_max=800, sigma_data=0.5, P_mean=-1.2, P_std=1.2,
                 loss_scale_g=100):
        self.alpha = alpha
        self.sigma_init = sigma_init
        self.t_max = t_max
        self.sigma_data = sigma_data
        self.P_mean = P_mean
        self.P_std = P_std
        self.loss_scale_g = loss_scale_g

    def generate(self, generator_net, z, class_labels=None):
        """One-step sample x_g = G(sigma_init * z; sigma_init)."""
        sigma = torch.full([z.shape[0]], self.sigma_init, dtype=z.dtype, device=z.device)
        return generator_net(self.sigma_init * z, broadcast_per_sample(sigma, z), class_labels)

    def generator_loss(self, generator_net, fake_net, teacher, z, class_labels=None):
        """Scalar generator loss: sum of per-sample SiD losses * loss_scale_g / batch.

        Gradients reach the generator through x_g and through the inputs of both (frozen) denoisers.
        """
        x_g = self.generate(generator_net, z, class_labels)
        # Samples with non-finite values are dropped: their rows are zeroed (torch.where passes them no
        # gradient) so they contribute exactly zero to the loss and cannot poison the other samples.
        keep = _finite_rows(x_g)
        x_g = torch.where(broadcast_per_sample(keep, x_g), x_g, 0)
        sigma = sid_sigmas(x_g.shape[0], self.t_max, device=x_g.device).flatten()
        sigma = broadcast_per_sample(sigma, x_g).to(x_g.dtype)
        x_t = x_g + sigma * torch.randn_like(x_g)
        with _frozen(teacher), _frozen(fake_net):
            d_teacher = teacher(x_t, sigma, class_labels)
            d_fake = fake_net(x_t, sigma, class_labels)
        keep = broadcast_per_sample(keep & _finite_rows(d_teacher) & _finite_rows(d_fake), x_g)
        x_g, d_teacher, d_fake = (torch.where(keep, t, 0) for t in (x_g, d_teacher, d_fake))
        per_sample = sid_generator_loss(x_g, d_teacher, d_fake, self.alpha)
        return per_sample.sum() * self.loss_scale_g / z.shape[0]

    def fake_loss(self, generator_net, fake_net, z, class_labels=None):
        """Scalar fake-score loss: EDM loss of fake_net on detached generator samples, summed / batch."""
        with torch.no_grad():
            x_g = self.generate(generator_net, z, class_labels)
        keep = _finite_rows(x_g)
        x_g = x_g[keep]
        class_labels = None if class_labels is None else class_labels[keep]
        if isinstance(fake_net, torch.nn.Module):
            fake_net.train()
        loss = edm_loss(fake_net, x_g, class_labels, P_mean=self.P_mean, P_std=self.P_std,
                        sigma_data=self.sigma_data)
        return loss.sum() / z.shape[0]
