"""EDM building blocks (Karras et al. 2022): training loss, Heun sampler, seeding, EMA.

Networks are callables `net(x, sigma, class_labels)` returning the denoised x, D(x; sigma).
"""

import torch


def broadcast_per_sample(values, like):
    # Shape a per-sample tensor [B] so it broadcasts against a batch `like` of any rank.
    return values.reshape([-1] + [1] * (like.ndim - 1))


def edm_loss(net, images, class_labels=None, augment_pipe=None, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
    """Per-element EDM denoising loss of `net` on clean `images` (global torch RNG; callers seed it).

    Random draws in EDM's order: σ, then the augmentation (when `augment_pipe` is given; its labels go to the
    net's augment map), then the noise."""
    rnd_normal = torch.randn([images.shape[0]], dtype=images.dtype, device=images.device)
    sigma = broadcast_per_sample((rnd_normal * P_std + P_mean).exp(), images)
    # docs/methods.md §1.2: lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2.
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    y, extra = images, {}
    if augment_pipe is not None:
        y, augment_labels = augment_pipe(images)
        extra = {"augment_labels": augment_labels}
    noisy = y + torch.randn_like(y) * sigma
    denoised = net(noisy, sigma, class_labels, **extra)
    # §1.2: lambda(sigma) * ||D(y + n; sigma) - y||^2, kept per element.
    return weight * (denoised - y) ** 2


def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80, rho=7):
    """The EDM noise levels t_0 > ... > t_{N-1} (docs/methods.md §1.3) followed by t_N = 0, float64."""
    ramp = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def heun_sampler(
    net,
    latents,
    class_labels=None,
    num_steps=18,
    sigma_min=0.002,
    sigma_max=80,
    rho=7,
    S_churn=0,
    S_min=0,
    S_max=float("inf"),
    S_noise=1,
    randn_like=torch.randn_like,
):
    """EDM's 2nd-order Heun sampler (§1.3): 2N-1 denoiser calls, last step Euler, float64 state."""
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho).to(latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_hat, t_hat = x_next, t_cur
        # Churn: raise the noise level to t_hat and add the matching fresh noise. With S_churn > 0 noise is
        # drawn at every step, also where gamma = 0, so per-seed generators advance as in EDM; with S_churn = 0
        # none is drawn (EDM draws it and scales it by zero: the same images).
        if S_churn > 0:
            gamma = min(S_churn / num_steps, 2**0.5 - 1) if S_min <= t_cur <= S_max else 0
            t_hat = t_cur * (1 + gamma)
            x_hat = x_hat + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_hat)
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Heun correction everywhere except the final step to sigma = 0.
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


class StackedRandomGenerator:
    """One torch.Generator per image seed, so image i depends only on seeds[i] (EDM convention)."""

    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        kwargs.setdefault("device", self.device)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, high, size, **kwargs):
        assert size[0] == len(self.generators)
        kwargs.setdefault("device", self.device)
        return torch.stack([torch.randint(high, size[1:], generator=gen, **kwargs) for gen in self.generators])


def seeded_latents(seeds, shape_chw, label_dim, device):
    """Latents and one-hot labels for `seeds`: latent first, then class index, from the seed's generator."""
    return seeded_draws(seeds, shape_chw, label_dim, device)[:2]


def seeded_draws(seeds, shape_chw, label_dim, device):
    """(latents, one-hot labels or None, the per-seed generators) — later draws (a K-step sampler's noise) continue
    each seed's own stream, so image i still depends only on seed i."""
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), *shape_chw])
    if not label_dim:
        return latents, None, rnd
    classes = rnd.randint(label_dim, size=[len(seeds)])
    return latents, torch.eye(label_dim, device=device)[classes], rnd


@torch.no_grad()
def ema_update(ema, net, cur_nimg, batch_size, halflife_kimg, rampup_ratio=0.05):
    """In place p_ema <- p + beta (p_ema - p), beta = 0.5^(batch / half-life) (§1.2); returns beta."""
    halflife_nimg = halflife_kimg * 1000
    # Early in training the half-life is capped at a fraction of the images seen so far.
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    beta = 0.5 ** (batch_size / max(halflife_nimg, 1e-8))
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p_net.detach().lerp(p_ema, beta))
    return beta


def ramped_lr(base_lr, cur_nimg, rampup_kimg):
    """Learning rate with EDM's linear warm-up over the first `rampup_kimg` thousand images."""
    return base_lr * min(cur_nimg / max(rampup_kimg * 1000, 1e-8), 1)
