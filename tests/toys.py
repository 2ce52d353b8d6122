"""Tiny models shared by the tests: analytic toys for the method tests and small seeded EDM networks."""

import copy
from unittest import mock

import torch
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

from distillery.analytic import GaussianMixture
from distillery.networks import build_network, edm_config
from distillery.training import DistillConfig, distill

F64 = torch.float64


def tiny_config(arch="ddpmpp", resolution=8, channels=1, **overrides):
    """EDMPrecond kwargs of a small `arch` UNet (ddpmpp or ncsnpp): 8·[1, 2] channels, one block per resolution,
    attention at 4×4, no augmentation labels, no dropout, unconditional; `overrides` (label_dim, model_channels,
    augment_dim, dropout, …) replace these."""
    small = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=0, dropout=0.0)
    return edm_config(arch, resolution, channels, **{**small, **overrides})


def seeded_network(config, seed=0, perturb=0.0, redraw=False):
    """build_network(config) right after torch.manual_seed(seed), so the same seed gives the same weights. With
    perturb > 0 every parameter then gets perturb·N(0, 1) added (or, with redraw, is replaced by it), from the same
    random stream: EDM and ADM zero-initialise the convolution after each dropout and the output convolution, so
    F ≈ 0 (D ≈ c_skip·x) and dropout is invisible until the weights are randomised."""
    torch.manual_seed(seed)
    net = build_network(config)
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                if redraw:
                    p.copy_(torch.randn_like(p) * perturb)
                else:
                    p.add_(perturb * torch.randn_like(p))
    return net


def tiny_edm(arch="ddpmpp", resolution=8, channels=1, *, seed=0, perturb=0.0, redraw=False, **overrides):
    """The small EDM network of tiny_config(arch, resolution, channels, **overrides), built by seeded_network."""
    return seeded_network(tiny_config(arch, resolution, channels, **overrides), seed, perturb, redraw)


class AffineGenerator(torch.nn.Module):
    """G(x; σ) = μ + s·x/σ: the one-step sample G(σ_init z; σ_init) is N(μ, s²I) for any σ_init.

    By default s = exp(log_s) with μ and log_s trainable; with `scale` given, s is that fixed number and only μ is a
    parameter."""

    def __init__(self, mu, log_s=None, *, scale=None):
        super().__init__()
        if (log_s is None) == (scale is None):
            raise ValueError("give either log_s (a trainable scale) or scale (a fixed one)")
        self.mu = torch.nn.Parameter(torch.as_tensor(mu, dtype=F64).clone())
        self.scale = scale
        if scale is None:
            self.log_s = torch.nn.Parameter(torch.as_tensor(log_s, dtype=F64).clone())

    def forward(self, x, sigma, class_labels=None):
        s = self.log_s.exp() if self.scale is None else self.scale
        return self.mu + s * x / sigma


class MLPDenoiser(torch.nn.Module):
    """A small random nonlinear denoiser D(x; sigma) in EDM form; records the mode of each call."""

    def __init__(self, dim, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, dim)).to(F64)
        self.modes = []

    def forward(self, x, sigma, class_labels=None):
        self.modes.append(self.training)
        sigma = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1).expand(x.shape[0], 1)
        scale = (sigma**2 + 0.25).sqrt()
        out = self.net(torch.cat([x / scale, sigma.log()], 1))
        return 0.25 / scale**2 * x + 0.5 * sigma / scale * out


def gaussian(mean, std):
    """The exact denoiser of N(mean, std²I), as a one-component mixture."""
    return GaussianMixture(
        torch.as_tensor(mean, dtype=F64)[None], torch.as_tensor(std, dtype=F64).reshape(1), torch.ones(1, dtype=F64)
    )


def assert_step_moves_toward_teacher(generator, loss, mu_p):
    """One normalised descent step on `loss` brings the AffineGenerator's mean toward the teacher's `mu_p` (and the
    sign-flipped loss does not), the gradient points along the mean error, and a too-narrow std grows."""
    grad, grad_log_s = torch.autograd.grad(loss, [generator.mu, generator.log_s], retain_graph=True)
    flipped = torch.autograd.grad(-loss, generator.mu)[0]

    def distance_after_step(g):
        return (generator.mu.detach() - 0.05 * g / g.norm() - mu_p).norm()

    start = (generator.mu.detach() - mu_p).norm()
    assert distance_after_step(grad) < start
    assert not distance_after_step(flipped) < start
    assert torch.nn.functional.cosine_similarity(grad, generator.mu.detach() - mu_p, dim=0) > 0.95
    assert grad_log_s < 0


def tiny_run(**settings):
    """The training settings of the tiny distillation runs of the tests: batch 8, 5 iterations, lr 1e-3."""
    return DistillConfig(
        **{
            "batch": 8,
            "lr": 1e-3,
            "betas": (0.0, 0.999),
            "eps": 1e-8,
            "duration_kimg": 0.04,
            "ema_halflife_kimg": 0.01,
            "ema_rampup_ratio": 0.05,
            **settings,
        }
    )


def tiny_distill(method, teacher, **settings):
    """A tiny distillation run of `method` from `teacher` (tiny_run settings); returns (generator, losses per step)."""
    generator, losses = copy.deepcopy(teacher).requires_grad_(True), []
    distill(
        method,
        teacher,
        generator,
        method.make_aux(teacher),
        tiny_run(**settings),
        on_progress=lambda nimg, logs: losses.append(logs),
    )
    return generator, losses


def write_random_inception(path, seed=0):
    """A weights file in torch-fidelity's Inception-v3 format (a torch.save'd state dict) with random weights. It
    exercises the Inception plumbing offline; the features it gives measure nothing about images."""
    torch.manual_seed(seed)
    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url"),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)  # He init keeps the activations' scale through the 94 convolutions
    torch.save(net.state_dict(), path)
    return path
