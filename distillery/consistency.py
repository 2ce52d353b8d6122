"""Consistency distillation (Song et al., ICML 2023) with EDM's parametrisation, docs/methods.md §3.9.

The consistency function f_θ(x, σ) = c_skip(σ)·x + c_out(σ)·F_θ(x, σ) with c_skip = σ_d²/((σ − σ_min)² + σ_d²) and
c_out = (σ − σ_min)·σ_d/√(σ_d² + σ²) is exactly the identity at σ_min. F_θ is read out of the EDM denoiser the student
is (D = c_skip^EDM·x + c_out^EDM·F), so a student starts as the teacher's network. The loss compares f_θ at
x_{n+1} = x_0 + σ_{n+1}·z with the EMA target f_θ⁻ at the teacher's Heun step from σ_{n+1} to σ_n.
"""

import torch

from distillery.edm import broadcast_per_sample


def pseudo_huber(a, b, c):
    """√(‖a − b‖² + c²) − c per sample (iCT's metric; c = 0.00054·√d on CIFAR-10)."""
    return ((a - b).flatten(1).pow(2).sum(1) + c**2).sqrt() - c


def l2(a, b):
    return (a - b).flatten(1).pow(2).sum(1)


class ConsistencyFunction(torch.nn.Module):
    """f(x, σ) = c_skip(σ)·x + c_out(σ)·F(x, σ) around an EDM denoiser `net` (F recovered from its output)."""

    def __init__(self, net, sigma_min=0.002, sigma_data=0.5):
        super().__init__()
        self.net, self.sigma_min, self.sigma_data = net, sigma_min, sigma_data

    def forward(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s = broadcast_per_sample(s.flatten().expand(len(x)) if s.numel() == 1 else s.flatten(), x)
        d2 = self.sigma_data**2
        skip_edm, out_edm = d2 / (s**2 + d2), s * self.sigma_data / (s**2 + d2).sqrt()
        raw = (self.net(x, s.flatten(), class_labels) - skip_edm * x) / out_edm
        skip = d2 / ((s - self.sigma_min) ** 2 + d2)
        out = (s - self.sigma_min) * self.sigma_data / (d2 + s**2).sqrt()
        return skip * x + out * raw


def heun_step(teacher, x, sigma_from, sigma_to, class_labels=None):
    """One deterministic Heun step of the teacher's PF-ODE dx/dσ = (x − D(x; σ))/σ from σ_from to σ_to (> 0); the
    levels broadcast against x ([B, 1, …])."""
    d = (x - teacher(x, sigma_from, class_labels)) / sigma_from
    x_next = x + (sigma_to - sigma_from) * d
    d_next = (x_next - teacher(x_next, sigma_to, class_labels)) / sigma_to
    return x + (sigma_to - sigma_from) * (d + d_next) / 2


def consistency_distillation_loss(f, f_target, teacher, x0, sigmas, class_labels=None, c=None, states=None):
    """Per-sample CD loss: d(f_θ(x_{n+1}, σ_{n+1}), f_θ⁻(Heun(x_{n+1}; σ_{n+1} → σ_n), σ_n)), n uniform over the
    adjacent pairs of `sigmas` (ascending); pseudo-Huber with constant c, or L2 when c is None. x_{n+1} is
    x_0 + σ_{n+1}·z, or `states(σ_{n+1})` (DDIL's mixture, one σ per sample)."""
    sigmas = torch.as_tensor(sigmas, dtype=x0.dtype, device=x0.device)
    n = torch.randint(len(sigmas) - 1, [len(x0)], device=x0.device)
    lo, hi = broadcast_per_sample(sigmas[n], x0), broadcast_per_sample(sigmas[n + 1], x0)
    x_hi = x0 + hi * torch.randn_like(x0) if states is None else states(sigmas[n + 1])
    with torch.no_grad():
        target = f_target(heun_step(teacher, x_hi, hi, lo, class_labels), lo, class_labels)
    online = f(x_hi, hi, class_labels)
    return l2(online, target) if c is None else pseudo_huber(online, target, c)
