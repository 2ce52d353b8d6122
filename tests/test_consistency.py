"""Consistency distillation on a Gaussian data set, where the exact consistency function is the closed-form PF-ODE
map to σ_min: the function is the identity at σ_min, the exact map has (near) zero loss against the teacher's Heun
target, and a CD step moves a parametrised consistency function toward the exact one (the flipped loss does not)."""

import math

import pytest
import torch

from distillery.analytic import gaussian_pf_ode
from distillery.consistency import ConsistencyFunction, consistency_distillation_loss
from distillery.edm import karras_sigmas

from toys import F64, gaussian, tiny_edm

M, S, SIGMA_MIN = 0.3, 0.5, 0.002
SIGMAS = karras_sigmas(40)[:-1].flip(0)  # ascending σ_min … σ_max


class GaussianConsistency(torch.nn.Module):
    """f(x, σ) = m + (x − m)·√(s² + σ_min²)/√(s² + σ²): the exact consistency function of N(m, s²), trainable m."""

    def __init__(self, m, s):
        super().__init__()
        self.m, self.s = torch.nn.Parameter(torch.tensor(m, dtype=F64)), s

    def forward(self, x, sigma, class_labels=None):
        ratio = math.sqrt(self.s**2 + SIGMA_MIN**2) / (self.s**2 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2).sqrt()
        return self.m + (x - self.m) * ratio


def test_the_consistency_function_is_the_identity_at_sigma_min():
    f = ConsistencyFunction(tiny_edm(perturb=0.1).eval())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(f(x, torch.full([2], SIGMA_MIN)), x)


def test_the_exact_pf_ode_map_is_the_consistency_target():
    x0 = M + S * torch.randn(4096, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    exact = GaussianConsistency(M, S)
    torch.manual_seed(1)
    loss = consistency_distillation_loss(exact, exact, gaussian(torch.full([3], M, dtype=F64), S), x0, SIGMAS)
    assert loss.mean() < 1e-6  # Heun's discretisation error between adjacent levels
    x = torch.randn(5, 3, dtype=F64)
    torch.testing.assert_close(exact(x, torch.full([5], 7.0, dtype=F64)), gaussian_pf_ode(x, 7.0, SIGMA_MIN, M, S))


def cd_steps(sign, c, steps=20, lr=0.02, ema=0.0):
    """m after `steps` normalised steps on sign × the CD loss, the target an EMA of the student (θ⁻ ← μθ⁻ + (1−μ)θ;
    μ = 0 as in iCT)."""
    x0 = M + S * torch.randn(2048, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    teacher = gaussian(torch.full([3], M, dtype=F64), S)
    student, target = GaussianConsistency(0.0, S), GaussianConsistency(0.0, S).requires_grad_(False)
    torch.manual_seed(2)
    for _ in range(steps):
        loss = sign * consistency_distillation_loss(student, target, teacher, x0, SIGMAS, c=c).mean()
        (grad,) = torch.autograd.grad(loss, student.m)
        with torch.no_grad():
            student.m -= lr * grad / grad.abs().clamp(min=1e-12)  # normalised steps: the metric's scale aside
            target.m.copy_(ema * target.m + (1 - ema) * student.m)
    return student.m.item()


@pytest.mark.parametrize("c", [None, 0.01])
def test_cd_steps_move_toward_the_exact_consistency_function_and_flipped_ones_do_not(c):
    assert abs(cd_steps(+1, c) - M) < 0.05  # 20 steps of 0.02 from 0 toward 0.3
    assert abs(cd_steps(-1, c) - M) > M
