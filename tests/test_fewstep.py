"""The K-step sampler: DMD2's levels, K = 1 as the one-step path bit for bit, a perfect student reproducing the data
distribution at every K, and the reflected variant staying in the data range."""

import pytest
import torch

from distillery.analytic import gaussian_pf_ode
from distillery.edm import karras_sigmas
from distillery.fewstep import choose_sources, multistep, rollout, student_sigmas
from distillery.sampling import one_step

from toys import tiny_edm


def test_levels_are_dmd2s_evenly_spaced_timesteps_on_the_karras_schedule():
    schedule = karras_sigmas(1000)
    assert student_sigmas(4).tolist() == schedule[[0, 250, 500, 750]].tolist()  # t = 999, 749, 499, 249
    assert student_sigmas(1).tolist() == [80.0]
    with pytest.raises(ValueError, match="steps must be in"):
        student_sigmas(0)


def test_one_step_is_the_one_step_path_bit_for_bit():
    net = tiny_edm(perturb=0.1).eval()
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = multistep(net, student_sigmas(1))(latents, None)
        theirs = one_step(net, 80.0)(latents, None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_perfect_student_samples_the_data_distribution_at_every_k(steps):
    # data N(m, s²I): the exact consistency function is the PF-ODE map to σ = 0, so every x̂ is a data sample and
    # every re-noised state has the exact marginal of its level
    m, s, n = 0.3, 0.5, 20000
    student = lambda x, sigma, labels: gaussian_pf_ode(x, float(sigma[0]), 0.0, m, s)  # noqa: E731
    gen = torch.Generator().manual_seed(steps)
    noise = lambda k, like: torch.randn(like.shape, generator=gen, dtype=like.dtype)  # noqa: E731
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    x = multistep(student, student_sigmas(steps))(z, None, noise)
    assert x.mean().item() == pytest.approx(m, abs=4 * s / (2 * n) ** 0.5)
    assert x.std().item() == pytest.approx(s, rel=0.02)


def test_the_reflected_sampler_never_leaves_the_data_range():
    seen = []

    def student(x, sigma, labels):  # a student whose predictions overshoot the data range
        seen.append(x)
        return 3 * torch.tanh(x)

    gen = torch.Generator().manual_seed(0)
    noise = lambda k, like: torch.randn(like.shape, generator=gen)  # noqa: E731
    out = multistep(student, student_sigmas(4), clip=(-1, 1))(torch.randn(64, 3, generator=gen), None, noise)
    assert out.abs().max() <= 1
    assert len(seen) == 4


def test_the_rollout_to_level_k_is_the_sampler_without_its_last_denoising():
    net = tiny_edm(perturb=0.1).eval()
    sigmas = student_sigmas(4)
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x3 = rollout(net, sigmas, 3, latents, deterministic=True)
        final = multistep(net, sigmas, deterministic=True)(latents, None)
        assert torch.equal(net(x3, torch.full([3], float(sigmas[3])), None), final)
        assert torch.equal(rollout(net, sigmas, 0, latents), latents * 80.0)


def test_sources_are_drawn_in_the_stated_proportions():
    weights = [0.5, 0.3, 0.2]
    n = 30000
    counts = torch.bincount(choose_sources(n, weights, torch.Generator().manual_seed(0)), minlength=3).double()
    expected = torch.tensor(weights, dtype=torch.float64) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 13.8  # χ² with 2 degrees of freedom: p = 0.001
    assert torch.bincount(choose_sources(1000, [0, 1, 0]), minlength=3).tolist() == [0, 1000, 0]
    with pytest.raises(ValueError, match="non-negative"):
        choose_sources(10, [0, 0, 0])
