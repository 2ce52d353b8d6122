"""The K-step sampler: DMD2's levels, K = 1 as the one-step path bit for bit, a perfect student reproducing the data
distribution at every K, and the reflected variant staying in the data range."""

import pytest
import torch

from distillery.analytic import gaussian_pf_ode
from distillery.edm import karras_sigmas
from distillery.fewstep import SOURCES, choose_sources, multistep, rollout, states_at, student_sigmas, student_state
from distillery.sampling import one_step

from toys import F64, gaussian, tiny_edm


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


def test_each_source_gives_its_own_states():
    # data N(m, s²I): the forward-diffused data and the exact teacher's ODE states at σ_k both have the marginal
    # N(m, (s² + σ_k²)I); the student (here: one that always predicts 0) gives 0 + σ_k·ε
    m, s, n = 0.5, 0.3, 4000
    teacher = gaussian(torch.full([2], m, dtype=F64), s)
    student = lambda x, sigma, labels=None: torch.zeros_like(x)  # noqa: E731
    levels = student_sigmas(4)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3 * n, 2, generator=gen, dtype=F64)
    real = m + s * torch.randn(3 * n, 2, generator=gen, dtype=F64)
    sources = torch.arange(3).repeat_interleave(n)
    torch.manual_seed(1)
    x = states_at(levels[2], z, sources, levels=levels, student=student, teacher=teacher, real=real, rollout_steps=32)
    sigma = float(levels[2])
    for index, (mean, std) in enumerate([(m, (s**2 + sigma**2) ** 0.5)] * 2 + [(0.0, sigma)]):
        part = x[sources == index]
        assert part.mean().item() == pytest.approx(mean, abs=4 * std / (2 * n) ** 0.5), SOURCES[index]
        assert part.std().item() == pytest.approx(std, rel=0.03), SOURCES[index]
    at_top = states_at(levels[0], z, sources, levels=levels, student=student, teacher=teacher, real=real)
    assert torch.equal(at_top, z * 80.0)


def test_the_reflected_rollouts_clip_every_prediction_to_the_data_range():
    # clipping inside the rollouts is the same as rolling out a net whose predictions never leave [-1, 1]
    overshooting = lambda x, sigma, labels=None: 3 * torch.tanh(x)  # noqa: E731
    in_range = lambda x, sigma, labels=None: (3 * torch.tanh(x)).clamp(-1, 1)  # noqa: E731
    levels = student_sigmas(4)
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    sources = torch.tensor([1, 2]).repeat(32)
    states = {}
    for name, net, clip in [("clipped", overshooting, (-1, 1)), ("in range", in_range, None)]:
        torch.manual_seed(1)
        states[name] = states_at(levels[3], z, sources, levels=levels, student=net, teacher=net, clip=clip)
    assert torch.equal(states["clipped"], states["in range"])
    torch.manual_seed(1)
    assert not torch.equal(
        states_at(levels[3], z, sources, levels=levels, student=overshooting, teacher=overshooting), states["clipped"]
    )
    # and the reflected sampler's images stay in the data range
    gen = torch.Generator().manual_seed(2)
    noise = lambda k, like: torch.randn(like.shape, generator=gen)  # noqa: E731
    assert multistep(overshooting, levels, clip=(-1, 1))(z, None, noise).abs().max() <= 1


@pytest.mark.parametrize("deterministic", [False, True])
def test_the_students_state_at_its_own_level_is_the_state_its_sampler_visits(deterministic):
    net = tiny_edm(perturb=0.1).eval()
    levels = student_sigmas(4)
    z = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    states = []
    for state in (
        lambda: student_state(net, levels, float(levels[2]), z, deterministic=deterministic),
        lambda: rollout(net, levels, 2, z, noise=lambda j, like: torch.randn_like(like), deterministic=deterministic),
    ):
        torch.manual_seed(3)
        with torch.no_grad():
            states.append(state())
    assert torch.equal(*states)


@pytest.mark.parametrize("name", ["dmd2", "cd", "pd"])
def test_each_k_step_students_image_depends_only_on_its_seed(name):
    from distillery.registry import METHODS
    from distillery.sampling import generate

    settings = {"dmd2": {"steps": 4}, "cd": {"steps": 4}, "pd": {"teacher_steps": 8, "steps": 4}}[name]
    sampler = METHODS[name].build(**settings).sampler(tiny_edm(perturb=0.1).eval())
    alone = generate(sampler, [7], [1, 8, 8]).images
    batch = generate(sampler, [3, 7, 11], [1, 8, 8], batch=2).images
    assert torch.equal(alone[0], batch[1])
    assert not torch.equal(batch[0], batch[1])


@pytest.mark.parametrize("name", ["cd", "pd"])
def test_ddil_trains_cd_and_pd_on_the_mixture_instead_of_the_diffused_data(name):
    # on the student's own states alone (β = 0, 0, 1) the loss no longer sees where the forward-diffused data would be
    from distillery.registry import METHODS

    teacher = tiny_edm(perturb=0.05).eval()
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    reals = [torch.zeros(6, 1, 8, 8), torch.ones(6, 1, 8, 8)]
    base = {"cd": {"steps": 2}, "pd": {"teacher_steps": 8, "steps": 2}}[name]

    def loss(ddil, real):
        method = METHODS[name].build(**base, ddil=ddil)
        generator, aux = method.make_generator(teacher), method.make_aux(teacher)
        torch.manual_seed(1)
        with torch.no_grad():
            return method.generator_loss(generator, aux, teacher, z, None, (real,))

    student_only = [loss((0, 0, 1), real) for real in reals]
    assert torch.equal(*student_only)
    assert not torch.equal(*[loss(None, real) for real in reals])


def test_one_sigma_per_sample_equals_each_sigma_on_its_own():
    # the deterministic rollouts (teacher ODE, student DDIM) of a batch with one σ per sample row by row
    from distillery.fewstep import teacher_rollout

    teacher = gaussian(torch.full([2], 0.3, dtype=F64), 0.4)
    student = lambda x, sigma, labels=None: 0.9 * x / (1 + sigma[:, None] ** 2) ** 0.5  # noqa: E731
    levels = student_sigmas(4)
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    sigma = torch.tensor([0.05, 0.7, 2.0, 0.05, 11.0, float(levels[3])], dtype=F64)
    together = teacher_rollout(teacher, 80.0, sigma, z * 80.0, steps=4)
    alone = torch.cat(
        [teacher_rollout(teacher, 80.0, float(s), z[i : i + 1] * 80.0, steps=4) for i, s in enumerate(sigma)]
    )
    assert torch.allclose(together, alone, rtol=1e-12, atol=0)
    together = student_state(student, levels, sigma, z, deterministic=True)
    alone = torch.cat(
        [student_state(student, levels, float(s), z[i : i + 1], deterministic=True) for i, s in enumerate(sigma)]
    )
    assert torch.equal(together, alone)
