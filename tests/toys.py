"""Tiny analytic models shared by the method tests."""

import torch

F64 = torch.float64


class AffineGenerator(torch.nn.Module):
    """G(x; σ) = μ + exp(log_s)·x/σ: the one-step sample G(σ_init z; σ_init) is N(μ, s²I) for any σ_init."""

    def __init__(self, mu, log_s):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.as_tensor(mu, dtype=F64).clone())
        self.log_s = torch.nn.Parameter(torch.as_tensor(log_s, dtype=F64).clone())

    def forward(self, x, sigma, class_labels=None):
        return self.mu + self.log_s.exp() * x / sigma
