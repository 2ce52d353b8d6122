import math

import pytest
import torch

from distillery.methods.sid import sid_generator_loss, sid_loss_core, sid_sigmas
from distillery.methods.sim import SIM, pseudo_huber_derivative, sim_generator_loss, sim_loss_core

from toys import F64, AffineGenerator, MLPDenoiser, assert_step_moves_toward_teacher, gaussian, tiny_distill, tiny_edm


def own_denoiser(generator):
    """The exact denoiser of the generator's own distribution (the ideal fake net), detached."""
    return gaussian(generator.mu.detach(), generator.log_s.detach().exp())


@pytest.mark.parametrize("distance", ["pseudo_huber", "l2"])
def test_a_descent_step_moves_the_mean_toward_the_teacher_and_a_flipped_sign_does_not(distance):
    torch.manual_seed(0)
    mu_p = torch.tensor([1.0, -0.5, 0.3, 0.8], dtype=F64)
    generator, teacher = AffineGenerator([0.0, 0.5, -0.4, 0.2], -0.5), gaussian(mu_p, 1.0)
    z = torch.randn(4096, 4, dtype=F64)
    loss = SIM(distance=distance).generator_loss(generator, own_denoiser(generator), teacher, z)
    assert_step_moves_toward_teacher(generator, loss, mu_p)


# Fixed-sigma check of the score gradient theorem (docs/methods.md §3.2) on N(mu, s^2) vs N(mu_p, s_p^2), 2-D.
MU, LOG_S = torch.tensor([0.2, 0.4], dtype=F64), torch.tensor(-0.3, dtype=F64)
MU_P, S_P, SIGMA, C = torch.tensor([1.0, -0.5], dtype=F64), 1.3, 0.7, 0.5  # typical ||y|| ~ 0.8, so c matters


def pseudo_huber_divergence(mu, log_s, xi):
    """E_{x~pi} d(s_p(x) - s_theta(x)), d(y) = sqrt(||y||^2 + c^2) - c, by Monte Carlo over fixed xi.

    pi is frozen at the unperturbed generator: x = MU + sqrt(v_0) xi. Noised scores in closed form:
    s(x) = -(x - m) / v with v = std^2 + sigma^2.
    """
    v_p, v_theta, v_0 = S_P**2 + SIGMA**2, log_s.exp() ** 2 + SIGMA**2, LOG_S.exp() ** 2 + SIGMA**2
    x = MU + v_0.sqrt() * xi
    y = -(x - MU_P) / v_p + (x - mu) / v_theta
    return ((y.pow(2).sum(1) + C**2).sqrt() - C).mean()


def finite_difference_gradient(h=1e-4):
    """Central differences of the divergence w.r.t. (mu_1, mu_2, log_s), common random numbers."""
    xi = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    xi = torch.cat([xi, -xi])
    grad = []
    for i in range(3):
        step = torch.zeros(3, dtype=F64)
        step[i] = h
        plus, minus = torch.cat([MU, LOG_S[None]]) + step, torch.cat([MU, LOG_S[None]]) - step
        difference = pseudo_huber_divergence(plus[:2], plus[2], xi) - pseudo_huber_divergence(minus[:2], minus[2], xi)
        grad.append(difference / (2 * h))
    return torch.stack(grad)


def surrogate_gradient(variant="sim", batch=200_000):
    """Monte-Carlo gradient w.r.t. (mu_1, mu_2, log_s) of a SIM-type surrogate at the fixed SIGMA, weight 1."""
    generator, teacher = AffineGenerator(MU, LOG_S), gaussian(MU_P, S_P)
    noise = torch.Generator().manual_seed(0)
    z, eps = (torch.randn(batch, 2, generator=noise, dtype=F64) for _ in range(2))
    z, eps = torch.cat([z, -z]), torch.cat([eps, -eps])  # antithetic pairs cancel the odd noise terms
    x_g = SIM().generate(generator, z)
    x_t = x_g + SIGMA * eps
    d_teacher, d_fake = teacher(x_t, SIGMA), own_denoiser(generator)(x_t, SIGMA)
    sigma = torch.tensor(SIGMA, dtype=F64)
    if variant == "sim":
        loss = sim_loss_core(x_g, d_teacher, d_fake, sigma, "pseudo_huber", C)
    elif variant == "detached_d_prime":
        d_prime = pseudo_huber_derivative(((d_teacher - d_fake) / SIGMA**2).detach(), C)
        loss = (d_prime * (d_fake - x_g) / SIGMA**2).sum(1)
    else:  # 'teacher_in_second_factor': the sign trap of §3.2, -d'(y) . (s_phi - grad log q)
        loss = -(pseudo_huber_derivative((d_teacher - d_fake) / SIGMA**2, C) * (d_teacher - x_g) / SIGMA**2).sum(1)
    grad_mu, grad_log_s = torch.autograd.grad(loss.mean(), [generator.mu, generator.log_s])
    return torch.cat([grad_mu, grad_log_s[None]])


def test_pseudo_huber_surrogate_gradient_matches_finite_differences_of_the_divergence():
    # Two independent Monte-Carlo estimates of the same gradient; with 4e5 draws each they agree to
    # ~0.3 %, so 1 % relative (per component) is the tolerance.
    reference = finite_difference_gradient()
    assert torch.allclose(surrogate_gradient("sim"), reference, rtol=0.01, atol=0)
    # The check is discriminating: the sign trap of §3.2 points the mean the wrong way.
    trap = surrogate_gradient("teacher_in_second_factor")
    assert (trap[:2] * reference[:2]).sum() < 0


def test_detaching_the_d_prime_factor_changes_the_gradient():
    # §3.2: without the x_t-dependence of d', the mean component stays right but the scale component
    # is biased (here halved), so the theorem needs the gradient through d'.
    reference, detached = finite_difference_gradient(), surrogate_gradient("detached_d_prime")
    assert torch.allclose(detached[:2], reference[:2], rtol=0.01, atol=0)
    assert detached[2].item() == pytest.approx(0.5 * reference[2].item(), rel=0.02)
    assert not torch.allclose(surrogate_gradient("sim"), detached, rtol=0.2)


def test_squared_l2_sim_is_twice_sid_with_alpha_one_under_the_same_weighting():
    # docs/methods.md §8 test 1 on random tensors and tiny random networks.
    torch.manual_seed(0)
    generator = torch.nn.Linear(6, 6).to(F64)
    teacher, fake = MLPDenoiser(6, seed=1), MLPDenoiser(6, seed=2)
    torch.manual_seed(3)
    z, eps = torch.randn(32, 6, dtype=F64), torch.randn(32, 6, dtype=F64)
    sigma = torch.randn(32, 1, dtype=F64).mul(1.2).sub(1.2).exp()
    x_g = generator(z)
    x_t = x_g + sigma * eps
    d_teacher, d_fake = teacher(x_t, sigma), fake(x_t, sigma)
    params = list(generator.parameters())

    def grads(loss):
        return torch.autograd.grad(loss.sum(), params, retain_graph=True)

    # SIM's squared l2 core is in score units; weight sigma^4 puts it in SiD's denoiser units.
    sim_l2 = sim_generator_loss(x_g, d_teacher, d_fake, sigma, "l2", c=0, weight_power=4)
    for sid, sim in zip(grads(sid_loss_core(x_g, d_teacher, d_fake, alpha=1.0)), grads(sim_l2)):
        assert torch.allclose(sid, sim / 2, rtol=1e-10, atol=0)
    # Also with SiD's full weighting, sigma^4 / sg(mean |x_g - D_phi|).
    normaliser = (x_g - d_teacher).abs().mean(1).clamp(min=1e-5).detach()
    for sid, sim in zip(grads(sid_generator_loss(x_g, d_teacher, d_fake, alpha=1.0)), grads(sim_l2 / normaliser)):
        assert torch.allclose(sid, sim / 2, rtol=1e-10, atol=0)
    # The identity is specific to alpha = 1.
    sid_alpha = grads(sid_loss_core(x_g, d_teacher, d_fake, alpha=1.2))
    assert not torch.allclose(sid_alpha[0], grads(sim_l2)[0] / 2, rtol=1e-3)


def input_detached(net):
    return lambda x, sigma, class_labels: net(x.detach(), sigma, class_labels)


def test_generator_loss_is_the_weighted_core_and_trains_only_the_generator_through_both_inputs():
    torch.manual_seed(0)
    generator, teacher, fake = AffineGenerator([0.1, -0.2, 0.3], -0.2), MLPDenoiser(3, seed=1), MLPDenoiser(3, seed=2)
    teacher.requires_grad_(False).eval()
    z = torch.randn(64, 3, dtype=F64)
    sim = SIM(c=0.4, loss_scale_g=3.0)
    torch.manual_seed(1)
    loss = sim.generator_loss(generator, fake, teacher, z)
    loss.backward()
    # The fake net ran frozen (eval, no parameter gradients) and got its train mode and grad flags back.
    assert fake.modes == [False] and fake.training
    assert all(p.grad is None and p.requires_grad for p in fake.parameters())
    # Same random stream as the method: the noise levels first, then the noise.
    torch.manual_seed(1)
    sigma = sid_sigmas(64).reshape(64, 1).to(F64)
    with torch.no_grad():
        x_g = sim.generate(generator, z)
        x_t = x_g + sigma * torch.randn_like(x_g)
        core = sim_loss_core(x_g, teacher(x_t, sigma), fake(x_t, sigma), sigma, "pseudo_huber", 0.4)
    assert loss.item() == pytest.approx(3.0 * (sigma.flatten() ** 2 * core).mean().item(), rel=1e-12)
    # Gradients flow through both denoisers' inputs: cutting either one changes the generator gradient.
    full = generator.mu.grad.clone()
    for cut_teacher, cut_fake in [(input_detached(teacher), fake), (teacher, input_detached(fake))]:
        generator.zero_grad()
        torch.manual_seed(1)
        sim.generator_loss(generator, cut_fake, cut_teacher, z).backward()
        assert not torch.allclose(generator.mu.grad, full, rtol=1e-3)


def test_pseudo_huber_needs_a_positive_c():
    with pytest.raises(ValueError):
        SIM(c=0)
    SIM(distance="l2", c=0)


@pytest.mark.parametrize("distance", ["pseudo_huber", "l2"])
def test_non_finite_samples_are_dropped(distance):
    torch.manual_seed(0)
    generator, teacher, fake = AffineGenerator([0.1, -0.2, 0.3], -0.2), MLPDenoiser(3, seed=1), MLPDenoiser(3, seed=2)
    z = torch.randn(16, 3, dtype=F64)
    z[3, 1] = float("nan")
    loss = SIM(distance=distance).generator_loss(generator, fake, teacher, z)
    loss.backward()
    assert loss.isfinite() and loss != 0
    assert generator.mu.grad.isfinite().all()


def test_distill_runs_sim_on_a_tiny_edm_network():
    teacher = tiny_edm(dropout=0.5).eval().requires_grad_(False)
    generator, losses = tiny_distill(SIM(), teacher)
    assert len(losses) == 5
    assert all(math.isfinite(value) for logs in losses for value in logs.values())
    moved = [not torch.equal(p, q) for p, q in zip(generator.parameters(), teacher.parameters())]
    assert any(moved)
