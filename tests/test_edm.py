import copy

import pytest
import torch

from distillery.analytic import GaussianMixture, gaussian_pf_ode
from distillery.edm import (
    StackedRandomGenerator,
    edm_loss,
    ema_update,
    heun_sampler,
    karras_sigmas,
    ramped_lr,
    seeded_latents,
)

from toys import F64, gaussian

# docs/methods.md §1.3, CIFAR-10 levels for N = 18, at the precision printed there.
CIFAR_SIGMAS = [
    "80",
    "57.59",
    "40.79",
    "28.37",
    "19.35",
    "12.91",
    "8.40",
    "5.32",
    "3.26",
    "1.92",
    "1.09",
    "0.585",
    "0.296",
    "0.140",
    "0.060",
    "0.023",
    "0.0075",
    "0.002",
    "0",
]


class CountingDenoiser:
    """Exact denoiser that also records the noise levels it was asked for."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.sigmas = []

    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(torch.as_tensor(sigma).detach().clone())
        return self.teacher(x, sigma, class_labels)


def mixture_log_density(mixture, x, sigma):
    """log p_sigma(x) of the noised mixture, written directly as a log-sum of Gaussian densities."""
    var = mixture.stds**2 + sigma**2
    log_norm = -0.5 * x.shape[1] * (2 * torch.pi * var).log()
    sq_dist = ((x[:, None, :] - mixture.means[None]) ** 2).sum(-1)
    log_w = (mixture.weights / mixture.weights.sum()).log()
    return torch.logsumexp(log_w + log_norm - 0.5 * sq_dist / var, dim=1)


def test_gaussian_mixture_denoiser_satisfies_tweedie_on_the_exact_density():
    # Unequal stds and weights, so every term of the responsibilities matters.
    mixture = GaussianMixture(
        torch.tensor([[-1.0, 0.5, 0.0], [1.5, -0.5, 0.3], [0.0, 0.0, -1.0]], dtype=F64),
        torch.tensor([0.2, 0.7, 0.4], dtype=F64),
        torch.tensor([1.0, 2.0, 1.5], dtype=F64),
    )
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=F64).requires_grad_()
    for sigma in [0.05, 0.5, 3.0]:
        grad_log_p = torch.autograd.grad(mixture_log_density(mixture, x, sigma).sum(), x)[0]
        assert torch.allclose(mixture.denoise(x, sigma), x + sigma**2 * grad_log_p, atol=1e-10)
        assert torch.allclose(mixture.score(x, sigma), grad_log_p, atol=1e-8)
    # sigma as 0-d, [B] or [B, 1, 1, 1]; x of image shape; float32 agrees with float64.
    images = x.detach().reshape(64, 3, 1, 1)
    reference = mixture(images, torch.tensor(0.5))
    assert reference.shape == images.shape
    assert torch.allclose(mixture(images, torch.full([64], 0.5)), reference)
    assert torch.allclose(mixture(images, torch.full([64, 1, 1, 1], 0.5)), reference)
    assert torch.allclose(mixture(images.float(), 0.5).double(), reference, atol=1e-5)


def test_gaussian_mixture_is_differentiable_in_its_parameters():
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64, requires_grad=True)
    stds = torch.tensor([0.3, 0.6], dtype=F64, requires_grad=True)
    weights = torch.tensor([0.4, 0.6], dtype=F64, requires_grad=True)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64, requires_grad=True)

    def denoise(x, means, stds, weights):
        return GaussianMixture(means, stds, weights).denoise(x, 0.7)

    assert torch.autograd.gradcheck(denoise, (x, means, stds, weights))


def test_gaussian_mixture_samples_have_its_proportions_and_moments():
    means = torch.tensor([[-4.0, 0.0], [4.0, 1.0]], dtype=F64)
    mixture = GaussianMixture(means, torch.tensor([0.5, 1.0], dtype=F64), torch.tensor([1.0, 3.0], dtype=F64))
    samples = mixture.sample(20000, torch.Generator().manual_seed(0))
    right = samples[:, 0] > 0
    assert right.double().mean().item() == pytest.approx(0.75, abs=0.01)
    assert torch.allclose(samples[right].mean(0), means[1], atol=0.03)
    assert torch.allclose(samples[~right].std(0), torch.tensor([0.5, 0.5], dtype=F64), atol=0.02)


def test_karras_sigmas_match_the_cifar10_schedule():
    sigmas = karras_sigmas(18)
    assert sigmas.dtype == F64 and sigmas.shape == (19,)
    for value, printed in zip(sigmas.tolist(), CIFAR_SIGMAS):
        decimals = len(printed.partition(".")[2])
        assert abs(value - float(printed)) <= 0.5 * 10**-decimals, (value, printed)
    assert sigmas[0] == 80 and sigmas[-2] == pytest.approx(0.002, rel=1e-12) and sigmas[-1] == 0


@pytest.mark.parametrize("num_steps", [1, 2, 18])
@pytest.mark.parametrize("S_churn", [0, 40])
def test_heun_sampler_calls_the_denoiser_2n_minus_1_times(num_steps, S_churn):
    net = CountingDenoiser(gaussian([0.1, -0.2], 0.5))
    latents = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    out = heun_sampler(net, latents, num_steps=num_steps, S_churn=S_churn)
    assert len(net.sigmas) == 2 * num_steps - 1
    assert out.dtype == F64 and out.shape == (4, 2) and out.isfinite().all()
    # First call at sigma_max, raised by the capped churn factor 1 + gamma = sqrt(2) when churning.
    assert net.sigmas[0].item() == pytest.approx(80 * (2**0.5 if S_churn else 1))


def test_heun_converges_to_the_exact_gaussian_ode_solution():
    mean, std = [0.3, -0.2, 0.1], 0.5
    teacher = gaussian(mean, std)
    latents = torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = gaussian_pf_ode(latents * 80, 80, 0, torch.tensor(mean, dtype=F64), std)
    steps = [8, 16, 32, 64]
    errors = [(heun_sampler(teacher, latents, num_steps=n) - exact).abs().max().item() for n in steps]
    # Second-order method: doubling N should cut the error by about 4 (at least 3).
    for coarse, fine in zip(errors, errors[1:]):
        assert fine < coarse / 3, errors
    assert errors[-1] < 1e-2, errors
    # Other schedule endpoints: the latents are scaled by the sampler's own sigma_max.
    short = heun_sampler(teacher, latents, num_steps=64, sigma_min=0.01, sigma_max=20)
    exact_short = gaussian_pf_ode(latents * 20, 20, 0, torch.tensor(mean, dtype=F64), std)
    assert (short - exact_short).abs().max() < 1e-2


def test_heun_samples_of_a_gaussian_mixture_have_its_proportions_and_means():
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=F64)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    teacher = GaussianMixture(means, torch.full([3], 0.3, dtype=F64), weights)
    latents, labels = seeded_latents(range(3000), (2,), 0, "cpu")
    assert labels is None
    # 64 steps: at 18 the sharp, well-separated modes still leave a ~0.04 outward bias in the means.
    samples = heun_sampler(teacher, latents, num_steps=64)
    component = torch.cdist(samples, means).argmin(1)
    for k in range(3):
        members = samples[component == k]
        assert len(members) / len(samples) == pytest.approx(weights[k].item(), abs=0.03)
        assert torch.allclose(members.mean(0), means[k], atol=0.04)
        assert members.std(0) == pytest.approx([0.3, 0.3], abs=0.03)


def test_seeded_latents_follow_the_per_seed_generator_convention():
    shape = (3, 4, 4)
    seeds = [3, 7, 2**32 + 2**31 + 5] + list(range(100, 110))
    alone, alone_labels = seeded_latents([7], shape, 10, "cpu")
    batch, batch_labels = seeded_latents(seeds, shape, 10, "cpu")
    # Image i depends only on seed i, whatever else is in the batch.
    assert torch.equal(batch[1], alone[0]) and torch.equal(batch_labels[1], alone_labels[0])
    # Seeds are taken modulo 2^32; latent first, then the class index, from the same generator.
    for seed, latent, label in zip(seeds, batch, batch_labels):
        gen = torch.Generator().manual_seed(seed % 2**32)
        assert torch.equal(latent, torch.randn(shape, generator=gen))
        assert label.argmax() == torch.randint(10, [], generator=gen)
    assert batch_labels.dtype == torch.float32 and torch.equal(batch_labels.sum(1), torch.ones(len(seeds)))
    assert not torch.equal(batch[0], batch[1])


def test_stochastic_heun_image_depends_only_on_its_own_seed():
    teacher = gaussian([0.2, -0.1], 0.5)

    def sample(seeds):
        rnd = StackedRandomGenerator("cpu", seeds)
        latents = rnd.randn([len(seeds), 2])
        return heun_sampler(
            teacher, latents, num_steps=8, S_churn=10, S_min=0.05, S_max=50, S_noise=1.003, randn_like=rnd.randn_like
        )

    alone, batch = sample([11]), sample([4, 11, 9])
    assert torch.equal(batch[1], alone[0])
    deterministic = heun_sampler(teacher, StackedRandomGenerator("cpu", [11]).randn([1, 2]), num_steps=8)
    assert not torch.allclose(alone, deterministic)


def test_edm_loss_weighting_makes_the_ideal_loss_one_per_element():
    # Data N(mu, sigma_data^2 I) and its exact denoiser: lambda(sigma) * posterior variance = 1 for every sigma.
    torch.manual_seed(0)
    mean = torch.tensor([0.3, -0.1, 0.0, 0.2, 0.5, -0.4, 0.1, 0.0], dtype=F64)
    data = mean + 0.5 * torch.randn(20000, 8, dtype=F64)
    net = CountingDenoiser(gaussian(mean.tolist(), 0.5))
    loss = edm_loss(net, data)
    assert loss.shape == data.shape
    assert loss.mean().item() == pytest.approx(1.0, abs=0.02)
    # ln sigma ~ N(P_mean, P_std^2), one sigma per sample, broadcastable against the batch.
    sigma = net.sigmas[0]
    assert sigma.shape == (20000, 1)
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.03)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.03)


def test_edm_loss_prefers_the_exact_denoiser_and_is_reproducible():
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64)
    stds, weights = torch.tensor([0.3, 0.6], dtype=F64), torch.tensor([0.4, 0.6], dtype=F64)
    exact = GaussianMixture(means, stds, weights)
    data = exact.sample(20000, torch.Generator().manual_seed(1))
    perturbed = [
        GaussianMixture(means + 0.1, stds, weights),
        GaussianMixture(means, stds * 1.3, weights),
        GaussianMixture(means, stds, weights.flip(0)),
    ]

    def expected_loss(net):
        torch.manual_seed(2)  # common random numbers for every denoiser
        return edm_loss(net, data).mean().item()

    best = expected_loss(exact)
    assert best == expected_loss(exact)  # bit-reproducible under a fixed seed
    for net in perturbed:
        assert best < expected_loss(net)


def test_ema_update_follows_the_halflife_formula_with_rampup():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ema.parameters()]
    # Early: the half-life is capped at 5 % of the 10k images seen, i.e. 500 images.
    beta = ema_update(ema, net, cur_nimg=10_000, batch_size=512, halflife_kimg=500)
    assert beta == pytest.approx(0.5 ** (512 / 500))
    for p_ema, p_old, p_net in zip(ema.parameters(), before, net.parameters()):
        assert torch.allclose(p_ema, p_net + beta * (p_old - p_net))
        assert not p_ema.requires_grad or p_ema.grad is None
    # Late (or without ramp-up): the configured half-life applies.
    assert ema_update(ema, net, 10**8, 512, 500) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_update(ema, net, 10_000, 512, 500, rampup_ratio=None) == pytest.approx(0.5 ** (512 / 500_000))


def test_ramped_lr_is_linear_then_flat():
    assert ramped_lr(1e-3, 5_000_000, 10_000) == pytest.approx(5e-4)
    assert ramped_lr(1e-3, 20_000_000, 10_000) == pytest.approx(1e-3)
    assert ramped_lr(1e-3, 0, 10_000) == 0
    assert ramped_lr(1e-3, 100, 0) == pytest.approx(1e-3)
