"""Progressive distillation as a training method (docs/methods.md §3.10).

Round r distils a teacher of n_r = teacher_steps / 2^r DDIM steps on the Karras grid into a student of n_r / 2
steps; after `round_kimg` the student becomes the next round's teacher, until the student takes `steps` steps. The
round's teacher and the round index live in the auxiliary net (RoundTeacher), so a resumed run continues its round.
The student trains at the forward-diffused data, or at DDIL's mixture (§3.6), its own states being its DDIM rollout
on the round's grid.
"""

import copy

import torch

from distillery.edm import karras_sigmas
from distillery.fewstep import FewStepStudent
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


class ProgressiveDistillation(FewStepStudent, DistillationMethod):
    generator_first = True  # a round ends after its last generator step
    deterministic = True  # DDIM steps, the sampler the rounds distil

    def __init__(self, **settings):
        s = PDSettings(**settings)
        self.teacher_steps, self.steps, self.round_nimg = s.teacher_steps, s.steps, s.round_kimg * 1000
        self.sigma_data, self.sigma_init = s.sigma_data, s.sigma_init
        self.rounds = (s.teacher_steps // s.steps).bit_length() - 1
        self.fewstep_setup(s, self.student_levels(self.rounds - 1))
        self.needs_real_data = True  # x_0 of the loss is a data image, whatever the states

    def grid(self, round_index):
        """The round's teacher grid: n_r Karras levels from σ_max, then 0."""
        return karras_sigmas(self.teacher_steps >> round_index, sigma_max=self.sigma_init)

    def student_levels(self, round_index):
        """The levels of the round's student: every other level of its teacher's grid."""
        return self.grid(round_index)[:-1:2]

    def make_aux(self, teacher):
        self.teacher = teacher
        return RoundTeacher(copy.deepcopy(teacher).eval().requires_grad_(False))

    def optimizers(self, generator, aux, lr, betas, eps, generator_betas=None):
        params = self.generator_parameters(generator)
        return torch.optim.Adam(params, lr=lr, betas=tuple(generator_betas or betas), eps=eps), None

    def generate(self, generator, z, class_labels=None):
        """One denoising at σ_max (the first step of the student's sampler)."""
        return generator(z * self.sigma_init, torch.full([len(z)], self.sigma_init), class_labels)

    def generator_loss(self, generator, aux, teacher, z, class_labels=None, real=None):
        r, x0 = int(aux.round), real[0]
        states = None
        if self.weights != (1.0, 0.0, 0.0):
            levels = self.student_levels(r)
            states = lambda sigma: self.states(sigma, generator, z, x0, class_labels, levels)  # noqa: E731
        return progressive_loss(generator, aux, x0, self.grid(r), class_labels, self.sigma_data, states).mean()

    @torch.no_grad()
    def update_aux(self, generator, aux, nimg):
        """At a round's end the student becomes the teacher of the next round (the last round never ends)."""
        if int(aux.round) < self.rounds - 1 and nimg >= (int(aux.round) + 1) * self.round_nimg:
            aux.net.load_state_dict(generator.state_dict())
            aux.round += 1
