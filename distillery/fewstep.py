"""K-step students (docs/methods.md §3.8): their noise levels and the multistep sampler.

A K-step student is an EDM denoiser G(x; σ) sampled at K fixed levels σ_0 = σ_max > σ_1 > … > σ_{K−1}:
x_0 = σ_0·z, x̂_k = G(x_k; σ_k), then x_{k+1} = x̂_k + σ_{k+1}·ε_k (stochastic: DMD2, multistep consistency
sampling) or the deterministic DDIM step x̂_k + σ_{k+1}·(x_k − x̂_k)/σ_k. NFE = K; K = 1 is the one-step student.
"""

import torch

from distillery.edm import karras_sigmas


def student_sigmas(steps, num_train_timesteps=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """DMD2's levels: `steps` evenly spaced timesteps from the top of a `num_train_timesteps`-level Karras schedule
    (t = 999, 749, 499, 249 for 4 steps), as float64 σ_0 = σ_max > … > σ_{K−1}."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1…{num_train_timesteps}, got {steps}")
    schedule = karras_sigmas(num_train_timesteps, sigma_min, sigma_max, rho)[:-1]  # descending, without the final 0
    return schedule[[k * num_train_timesteps // steps for k in range(steps)]]


def multistep(student, sigmas, deterministic=False, clip=None):
    """The sampler `(latents, labels, noise) -> images` of a K-step student at levels `sigmas` (descending).

    `noise(k, like)` gives ε_k for the stochastic step into level k + 1 (per-seed generators make image i depend
    on seed i only); `clip` = (lo, hi) clips every x̂ to the data range (the reflected variant of DDIL).
    """
    sigmas = [float(s) for s in sigmas]

    def sample(latents, labels, noise=None):
        x = latents * sigmas[0]
        for k, sigma in enumerate(sigmas):
            denoised = student(x, torch.full([len(x)], sigma, dtype=x.dtype, device=x.device), labels)
            if clip is not None:
                denoised = denoised.clamp(*clip)
            if k == len(sigmas) - 1:
                return denoised
            nxt = sigmas[k + 1]
            x = denoised + nxt * ((x - denoised) / sigma if deterministic else noise(k, denoised))
        return x

    return sample
