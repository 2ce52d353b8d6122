"""Analytic teachers: distributions whose denoiser E[x0 | x0 + sigma*eps = x] is known exactly."""

import math

import torch


class GaussianMixture:
    """Mixture of isotropic Gaussians sum_k w_k N(means[k], stds[k]^2 I) in D dimensions.

    Parameters may be tensors requiring grad; every method stays differentiable w.r.t. them.
    """

    def __init__(self, means, stds, weights):
        self.means = torch.as_tensor(means)
        self.stds = torch.as_tensor(stds)
        self.weights = torch.as_tensor(weights)
        assert self.means.ndim == 2 and self.stds.shape == self.weights.shape == self.means.shape[:1]

    @property
    def dim(self):
        return self.means.shape[1]

    def denoise(self, x, sigma):
        """Exact posterior mean E[x0 | x] for x = x0 + sigma*eps; x is [B, *shape] with prod(shape) = D."""
        flat = x.reshape(x.shape[0], -1)
        assert flat.shape[1] == self.dim
        means = self.means.to(dtype=x.dtype, device=x.device)
        var0 = self.stds.to(dtype=x.dtype, device=x.device) ** 2
        sigma2 = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1) ** 2
        var = var0 + sigma2  # [B or 1, K]: variance of component k after noising
        sq_dist = (flat[:, None, :] - means[None]).pow(2).sum(-1)
        # Responsibilities p(k | x) from the noised component densities N(x; mu_k, var_k I); the softmax
        # makes the weights' normalisation and the shared 2*pi factor irrelevant.
        log_w = self.weights.to(dtype=x.dtype, device=x.device).log()
        logits = log_w - 0.5 * self.dim * var.log() - 0.5 * sq_dist / var
        resp = logits.softmax(dim=1)
        # E[x0 | x, k] = mu_k + var0_k / var_k (x - mu_k), averaged over p(k | x).
        shrink = (resp * var0 / var).sum(1, keepdim=True)
        denoised = shrink * flat + (resp * sigma2 / var) @ means
        return denoised.reshape(x.shape)

    def score(self, x, sigma):
        """Score of the noised density, grad_x log p_sigma(x) = (D(x) - x) / sigma^2 (Tweedie)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape([-1] + [1] * (x.ndim - 1))
        return (self.denoise(x, sigma) - x) / sigma**2

    def sample(self, n, generator=None):
        """n clean samples, [n, D]: component from the weights, then Gaussian noise around its mean."""
        k = torch.multinomial(self.weights.detach().to(torch.float64), n, replacement=True, generator=generator)
        noise = torch.randn([n, self.dim], generator=generator, dtype=self.means.dtype, device=self.means.device)
        return self.means[k] + self.stds[k, None] * noise

    def __call__(self, x, sigma, class_labels=None):
        return self.denoise(x, sigma)


def gaussian_pf_ode(x, sigma_from, sigma_to, mean, std):
    """Exact probability-flow ODE map from sigma_from to sigma_to for data N(mean, std^2 I).

    Along the ODE dx/dsigma = (x - D(x; sigma)) / sigma the offset x - mean scales as sqrt(std^2 + sigma^2).
    """
    flat = x.reshape(x.shape[0], -1)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    ratio = math.sqrt(std**2 + sigma_to**2) / math.sqrt(std**2 + sigma_from**2)
    return (mean + (flat - mean) * ratio).reshape(x.shape)
