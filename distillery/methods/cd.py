"""Consistency distillation as a training method (docs/methods.md §3.9): the student's consistency function
f_θ (around G) against the EMA target f_θ⁻ (the auxiliary net, updated by EMA after every generator step, never by a
loss) at the teacher's Heun step between adjacent levels of its ODE discretisation; x_{n+1} from the forward-diffused
data, or DDIL's mixture of data, teacher and student states (§3.6)."""

import copy
import math

import torch

from distillery.consistency import ConsistencyFunction, consistency_distillation_loss
from distillery.edm import karras_sigmas
from distillery.fewstep import FewStepStudent, student_sigmas
from distillery.methods.base import DistillationMethod
from distillery.registry import CDSettings


class ConsistencyDistillation(FewStepStudent, DistillationMethod):
    generator_first = True  # the target's EMA follows the generator step

    def __init__(self, **settings):
        s = CDSettings(**settings)
        self.sigma_min, self.sigma_data, self.sigma_init = s.sigma_min, s.sigma_data, s.sigma_max
        self.distance, self.huber_c, self.target_ema = s.distance, s.huber_c, s.target_ema
        self.grid = karras_sigmas(s.num_levels, s.sigma_min, s.sigma_max, s.rho)[:-1].flip(0)  # ascending
        self.fewstep_setup(s, student_sigmas(s.steps, sigma_min=s.sigma_min, sigma_max=s.sigma_max, rho=s.rho))
        self.needs_real_data = True  # x_0 of the loss is a data image, whatever the states

    def make_aux(self, teacher):
        self.teacher = teacher
        return copy.deepcopy(teacher).eval().requires_grad_(False)

    def optimizers(self, generator, aux, lr, betas, eps, generator_betas=None):
        params = self.generator_parameters(generator)
        return torch.optim.Adam(params, lr=lr, betas=tuple(generator_betas or betas), eps=eps), None

    def consistency(self, net):
        return ConsistencyFunction(net, self.sigma_min, self.sigma_data)

    def student(self, generator):
        """Multistep consistency sampling (§3.8) calls the consistency function at each level."""
        return self.consistency(generator)

    def generate(self, generator, z, class_labels=None):
        """One-step sample f_θ(σ_max·z, σ_max)."""
        return self.consistency(generator)(z * self.sigma_init, torch.full([len(z)], self.sigma_init), class_labels)

    def generator_loss(self, generator, aux, teacher, z, class_labels=None, real=None):
        x0 = real[0]
        c = None
        if self.distance == "pseudo_huber":
            c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(x0[0].numel())
        states = None
        if self.weights != (1.0, 0.0, 0.0):
            states = lambda sigma: self.states(sigma, generator, z, x0, class_labels)  # noqa: E731
        loss = consistency_distillation_loss(
            self.consistency(generator), self.consistency(aux), teacher, x0, self.grid, class_labels, c, states
        )
        return loss.mean()

    @torch.no_grad()
    def update_aux(self, generator, aux, nimg):
        for target, online in zip(aux.parameters(), generator.parameters()):
            target.lerp_(online, 1 - self.target_ema)
