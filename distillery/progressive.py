"""Progressive distillation (Salimans & Ho, ICLR 2022) on EDM's deterministic sampler, docs/methods.md §3.10.

Each round halves the sampler's steps: on a grid σ_0 > σ_1 > … > σ_{2N} = 0 the student learns, at x = x_0 + σ_{2i}·ε,
the denoised image x̃ whose one DDIM step to σ_{2i+2} lands where two teacher DDIM steps (via σ_{2i+1}) land:
x̃ = (x'' − (σ_{2i+2}/σ_{2i})·x)/(1 − σ_{2i+2}/σ_{2i}). The student of a round is the teacher of the next.
"""

import torch

from distillery.edm import broadcast_per_sample


def ddim_step(x, denoised, sigma, sigma_next):
    """The deterministic step x̂ + σ'·(x − x̂)/σ (Euler on EDM's PF-ODE in σ)."""
    return denoised + sigma_next * (x - denoised) / sigma


def two_step_target(teacher, x, sigma, sigma_mid, sigma_next, class_labels=None):
    """The denoised image x̃ with ddim_step(x, x̃, σ, σ_next) = two teacher DDIM steps σ → σ_mid → σ_next."""
    mid = ddim_step(x, teacher(x, sigma, class_labels), sigma, sigma_mid)
    end = ddim_step(mid, teacher(mid, sigma_mid, class_labels), sigma_mid, sigma_next)
    ratio = sigma_next / sigma
    return (end - ratio * x) / (1 - ratio)


def progressive_loss(student, teacher, x0, grid, class_labels=None, sigma_data=0.5, states=None):
    """Per-sample λ(σ)·‖D_student(x; σ) − x̃‖², σ = grid[2i] with i uniform over the student's N steps; `grid` is the
    teacher's descending 2N + 1 levels ending in 0; λ is EDM's weight (σ² + σ_d²)/(σ·σ_d)². x is x_0 + σ·ε, or
    `states(σ)` (DDIL's mixture, one σ per sample)."""
    grid = torch.as_tensor(grid, dtype=x0.dtype, device=x0.device)
    i = 2 * torch.randint((len(grid) - 1) // 2, [len(x0)], device=x0.device)
    sigma, mid, nxt = (broadcast_per_sample(grid[i + j], x0) for j in range(3))
    x = x0 + sigma * torch.randn_like(x0) if states is None else states(grid[i])
    with torch.no_grad():
        target = two_step_target(teacher, x, sigma, mid, nxt, class_labels)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (weight * (student(x, sigma, class_labels) - target) ** 2).flatten(1).sum(1)
