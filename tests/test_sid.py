import pytest
import torch

from distillery.edm import edm_loss
from distillery.methods.sid import SiD, sid_generator_loss, sid_loss_core, sid_sigmas

from toys import F64, AffineGenerator, gaussian, tiny_edm


class TinyDenoiser(torch.nn.Module):
    """A small trainable denoiser D(x; sigma) that records the mode it was called in."""

    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim, dtype=F64)
        self.modes = []

    def forward(self, x, sigma, class_labels=None):
        self.modes.append(self.training)
        c_skip = 0.25 / (sigma**2 + 0.25)
        return c_skip * x + self.lin(x / (sigma**2 + 0.25).sqrt())


def exact_fake(generator):
    """The exact denoiser of the generator's own distribution, built from detached parameters."""
    return gaussian(generator.mu.detach(), generator.log_s.detach().exp())


def test_generator_step_moves_the_mean_toward_the_teacher_and_a_flipped_sign_does_not():
    torch.manual_seed(0)
    mu_p, s_p = torch.tensor([1.0, -0.5, 0.3, 0.8], dtype=F64), 1.0
    generator = AffineGenerator([0.0, 0.5, -0.4, 0.2], -0.5)
    teacher = gaussian(mu_p, s_p)
    z = torch.randn(4096, 4, dtype=F64)
    loss = SiD().generator_loss(generator, exact_fake(generator), teacher, z)
    loss.backward()

    def distance_after_step(sign):
        step = sign * generator.mu.grad / generator.mu.grad.norm()
        return (generator.mu.detach() - 0.05 * step - mu_p).norm()

    start = (generator.mu.detach() - mu_p).norm()
    assert distance_after_step(+1) < start < distance_after_step(-1)
    # The mean gradient points (almost) straight away from the teacher; the scale grows toward s_p.
    cosine = torch.nn.functional.cosine_similarity(generator.mu.grad, generator.mu.detach() - mu_p, dim=0)
    assert cosine > 0.95
    assert generator.log_s.grad < 0


def fisher_gradient(mu, log_s, mu_p, s_p, sigma, frozen_sampling):
    """Closed-form gradient of E_{x~pi} ||s_p(x) - s_theta(x)||^2 at noise level sigma, w.r.t. (mu, log_s).

    Both noised scores are affine: s(x) = -(x - m) / v; pi = N(mu, v_theta I), detached if frozen_sampling.
    """
    mu, log_s = mu.clone().requires_grad_(), log_s.clone().requires_grad_()
    v_p, v_theta = s_p**2 + sigma**2, log_s.exp() ** 2 + sigma**2
    slope, offset = 1 / v_theta - 1 / v_p, mu_p / v_p - mu / v_theta  # s_p - s_theta = slope * x + offset
    pi_mean, pi_var = (mu.detach(), v_theta.detach()) if frozen_sampling else (mu, v_theta)
    divergence = ((slope * pi_mean + offset) ** 2).sum() + mu.numel() * slope**2 * pi_var
    return torch.autograd.grad(divergence, [mu, log_s])


def sid_gradient(alpha, mu, log_s, mu_p, s_p, sigma, batch=200_000):
    """Monte-Carlo gradient of SiD's un-normalised loss with weight 1/sigma^4 at a fixed sigma."""
    generator, teacher = AffineGenerator(mu, log_s), gaussian(mu_p, s_p)
    noise = torch.Generator().manual_seed(0)
    z, eps = (torch.randn(batch, mu.numel(), generator=noise, dtype=F64) for _ in range(2))
    z, eps = torch.cat([z, -z]), torch.cat([eps, -eps])  # antithetic pairs cancel the odd noise terms
    x_g = SiD().generate(generator, z)
    x_t = x_g + sigma * eps
    loss = sid_loss_core(x_g, teacher(x_t, sigma), exact_fake(generator)(x_t, sigma), alpha).mean() / sigma**4
    return torch.autograd.grad(loss, [generator.mu, generator.log_s])


@pytest.mark.parametrize("alpha, frozen_sampling", [(1.0, True), (0.5, False)])
def test_sid_gradient_is_half_the_fisher_divergence_gradient(alpha, frozen_sampling):
    # docs/methods.md §3.1: alpha = 1 <-> Fisher divergence with the sampling distribution frozen at theta;
    # alpha = 0.5 <-> the full Fisher divergence (sampling distribution differentiated too).
    mu, log_s = torch.tensor([0.2, 0.4], dtype=F64), torch.tensor(-0.3, dtype=F64)
    mu_p, s_p, sigma = torch.tensor([1.0, -0.5], dtype=F64), 1.3, 0.7
    grad_mu, grad_log_s = sid_gradient(alpha, mu, log_s, mu_p, s_p, sigma)
    ref_mu, ref_log_s = (0.5 * g for g in fisher_gradient(mu, log_s, mu_p, s_p, sigma, frozen_sampling))
    assert torch.allclose(grad_mu, ref_mu, rtol=0.01, atol=1e-3)
    assert grad_log_s.item() == pytest.approx(ref_log_s.item(), rel=0.02)
    # The other pairing differs by far more than the tolerance, so the check is discriminating.
    wrong_mu, wrong_log_s = (0.5 * g for g in fisher_gradient(mu, log_s, mu_p, s_p, sigma, not frozen_sampling))
    assert not torch.allclose(grad_mu, wrong_mu, rtol=0.2)
    assert grad_log_s.item() != pytest.approx(wrong_log_s.item(), rel=0.2)


def test_sid_generator_loss_is_the_core_over_the_detached_l1_normaliser():
    torch.manual_seed(0)
    x_g, d_teacher, d_fake = (torch.randn(5, 3, 4, 4, dtype=F64, requires_grad=True) for _ in range(3))
    loss = sid_generator_loss(x_g, d_teacher, d_fake, alpha=1.2)
    normaliser = (x_g - d_teacher).abs().mean([1, 2, 3])
    diff = d_teacher - d_fake
    # Equivalent form from §3.1: (1 - alpha) ||D_phi - D_psi||^2 + (D_phi - D_psi) . (D_psi - x_g).
    core = (-0.2 * diff**2 + diff * (d_fake - x_g)).sum([1, 2, 3])
    assert loss.shape == (5,)
    assert torch.allclose(sid_loss_core(x_g, d_teacher, d_fake, 1.2), core)
    assert torch.allclose(loss, core / normaliser)
    # The normaliser carries no gradient.
    grad = torch.autograd.grad(loss.sum(), x_g)[0]
    expected = torch.autograd.grad((core / normaliser.detach()).sum(), x_g)[0]
    assert torch.allclose(grad, expected)


def test_losses_are_summed_over_samples_and_scaled_per_batch():
    torch.manual_seed(0)
    generator, fake = AffineGenerator([0.1, -0.2, 0.3], -0.2), TinyDenoiser(3)
    teacher = gaussian([0.5, 0.0, -0.5], 0.7)
    z = torch.randn(32, 3, dtype=F64)
    sid = SiD(loss_scale_g=100)
    x_g = sid.generate(generator, z)
    # Same random stream as the method: the 32 noise levels first, then the noise.
    torch.manual_seed(1)
    sigma = sid_sigmas(32).reshape(32, 1).to(F64)
    x_t = x_g + sigma * torch.randn_like(x_g)
    per_sample = sid_generator_loss(x_g, teacher(x_t, sigma), fake(x_t, sigma), sid.alpha)
    torch.manual_seed(1)
    assert sid.generator_loss(generator, fake, teacher, z).item() == pytest.approx(100 * per_sample.mean().item())
    torch.manual_seed(2)
    fake_per_element = edm_loss(fake, x_g.detach())
    torch.manual_seed(2)
    assert sid.aux_loss(generator, fake, z).item() == pytest.approx(fake_per_element.sum().item() / 32)


def test_sid_sigmas_cover_the_first_80_percent_of_the_karras_schedule():
    torch.manual_seed(0)
    sigma = sid_sigmas(100_000)
    assert sigma.shape == (100_000, 1, 1, 1)
    assert sigma.min() >= 0.002 and sigma.max() <= 24.41
    assert sigma.min() < 0.0021 and sigma.max() > 24.3
    assert sigma.median().item() == pytest.approx(0.97, abs=0.02)


def test_generator_loss_trains_only_the_generator_through_both_denoiser_inputs():
    torch.manual_seed(0)
    generator, fake, teacher = AffineGenerator([0.1, -0.2, 0.3], -0.2), TinyDenoiser(3), TinyDenoiser(3)
    teacher.requires_grad_(False).eval()
    z = torch.randn(64, 3, dtype=F64)
    torch.manual_seed(1)
    SiD().generator_loss(generator, fake, teacher, z).backward()
    assert generator.mu.grad.abs().sum() > 0 and generator.log_s.grad != 0
    # The fake net ran in eval mode, accumulated nothing, and got its train mode and grad flags back.
    assert fake.modes == [False] and fake.training
    assert all(p.grad is None and p.requires_grad for p in fake.parameters())
    assert teacher.modes == [False] and not teacher.training
    # Gradients also flow through the fake net's input: detaching its output changes the generator gradient.
    with_fake_input = generator.mu.grad.clone()
    generator.zero_grad()
    torch.manual_seed(1)
    SiD().generator_loss(generator, lambda x, s, c: fake(x, s, c).detach(), teacher, z).backward()
    assert not torch.allclose(generator.mu.grad, with_fake_input)


def test_fake_loss_trains_only_the_fake_net_in_train_mode():
    torch.manual_seed(0)
    generator, fake = AffineGenerator([0.1, -0.2, 0.3], -0.2), TinyDenoiser(3)
    fake.eval()
    loss = SiD().aux_loss(generator, fake, torch.randn(64, 3, dtype=F64))
    loss.backward()
    assert loss.ndim == 0 and fake.modes == [True]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())
    assert all(p.grad is None for p in generator.parameters())


def test_non_finite_samples_are_dropped_from_both_losses():
    torch.manual_seed(0)
    generator, fake = AffineGenerator([0.1, -0.2, 0.3], -0.2), TinyDenoiser(3)
    teacher = gaussian([0.5, 0.0, -0.5], 0.7)
    z = torch.randn(16, 3, dtype=F64)
    z[3, 1] = float("nan")
    g_loss = SiD().generator_loss(generator, fake, teacher, z)
    g_loss.backward()
    assert g_loss.isfinite() and g_loss != 0
    assert generator.mu.grad.isfinite().all()
    f_loss = SiD().aux_loss(generator, fake, z)
    f_loss.backward()
    assert f_loss.isfinite() and all(p.grad.isfinite().all() for p in fake.parameters())


def test_fake_score_loss_sees_augmented_samples_with_their_labels():
    # §3.1: SiD's fake-score loss runs EDM's augmentation on the generator samples and feeds the 9 augment labels
    # to the fake net, so only then does the fake net's map_augment layer get a gradient
    teacher = tiny_edm(augment_dim=9)
    z = torch.randn(16, 1, 8, 8)
    grads = {}
    for p in (0.0, 0.5):
        method = SiD(augment_p=p)
        generator, fake = method.make_generator(teacher), method.make_aux(teacher)
        torch.manual_seed(1)
        method.aux_loss(generator, fake, z).backward()
        grads[p] = fake.model.map_augment.weight.grad
    assert grads[0.0] is None or grads[0.0].abs().max() == 0
    assert grads[0.5].abs().max() > 0
