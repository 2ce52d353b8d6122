"""Progressive distillation as a training method (docs/methods.md §3.10).

Round r distils a teacher of n_r = teacher_steps / 2^r DDIM steps on the Karras grid into a student of n_r / 2
steps; after `round_kimg` the student becomes the next round's teacher, until the student takes `steps` steps. The
round's teacher and the round index live in the auxiliary net (RoundTeacher), so a resumed run continues its round.
"""

import copy

import torch

from distillery.edm import karras_sigmas
from distillery.fewstep import multistep
from distillery.methods.base import DistillationMethod
from distillery.progressive import progressive_loss
from distillery.registry import PDSettings


class RoundTeacher(torch.nn.Module):
    """The teacher of the current round, with the round's index as a buffer (checkpointed with it)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("round", torch.zeros((), dtype=torch.long))

    def forward(self, x, sigma, class_labels=None):
        return self.net(x, sigma, class_labels)


class ProgressiveDistillation(DistillationMethod):
    needs_real_data = True
    generator_first = True  # a round ends after its last generator step

    def __init__(self, **settings):
        s = PDSettings(**settings)
        self.teacher_steps, self.steps, self.round_nimg = s.teacher_steps, s.steps, s.round_kimg * 1000
        self.sigma_data, self.sigma_init = s.sigma_data, s.sigma_init
        self.rounds = (s.teacher_steps // s.steps).bit_length() - 1
        self.nfe = s.steps

    def grid(self, round_index):
        """The round's teacher grid: n_r Karras levels from σ_max, then 0."""
        return karras_sigmas(self.teacher_steps >> round_index, sigma_max=self.sigma_init)

    def levels(self):
        """The final student's levels: every other level of the last round's teacher grid."""
        return self.grid(self.rounds - 1)[:-1:2]

    def sampler(self, generator):
        """The final student's K deterministic DDIM steps."""
        return multistep(generator, self.levels(), deterministic=True)

    def make_aux(self, teacher):
        return RoundTeacher(copy.deepcopy(teacher).eval().requires_grad_(False))

    def optimizers(self, generator, aux, lr, betas, eps, generator_betas=None):
        params = self.generator_parameters(generator)
        return torch.optim.Adam(params, lr=lr, betas=tuple(generator_betas or betas), eps=eps), None

    def generate(self, generator, z, class_labels=None):
        """One denoising at σ_max (the first step of the student's sampler)."""
        return generator(z * self.sigma_init, torch.full([len(z)], self.sigma_init), class_labels)

    def generator_loss(self, generator, aux, teacher, z, class_labels=None, real=None):
        grid = self.grid(int(aux.round))
        return progressive_loss(generator, aux, real[0], grid, class_labels, self.sigma_data).mean()

    @torch.no_grad()
    def update_aux(self, generator, aux, nimg):
        """At a round's end the student becomes the teacher of the next round (the last round never ends)."""
        if int(aux.round) < self.rounds - 1 and nimg >= (int(aux.round) + 1) * self.round_nimg:
            aux.net.load_state_dict(generator.state_dict())
            aux.round += 1
