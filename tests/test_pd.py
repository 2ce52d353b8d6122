"""Progressive distillation as a method: rounds halve the steps from teacher_steps to steps, the student becomes the
next round's teacher at each round's end, and the settings refuse a halving that cannot reach `steps`."""

import pydantic
import pytest
import torch

from distillery.edm import karras_sigmas
from distillery.methods.pd import ProgressiveDistillation
from distillery.training import TrainingData, distill

from toys import tiny_edm, tiny_run


def test_rounds_and_levels():
    method = ProgressiveDistillation(teacher_steps=16, steps=2)
    assert method.rounds == 3  # 16 → 8 → 4 → 2
    assert [len(method.grid(r)) - 1 for r in range(3)] == [16, 8, 4]
    assert method.levels.tolist() == karras_sigmas(4)[:-1:2].tolist()
    with pytest.raises(pydantic.ValidationError, match="power of 2"):
        ProgressiveDistillation(teacher_steps=12, steps=2)


def test_the_student_becomes_the_teacher_at_each_round_end():
    teacher = tiny_edm(perturb=0.05).eval()
    data = TrainingData(images=torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    method = ProgressiveDistillation(teacher_steps=8, steps=2, round_kimg=0.016)  # 2 rounds, 2 iterations each
    generator, aux = method.make_generator(teacher), method.make_aux(teacher)
    torch.manual_seed(0)
    distill(method, teacher, generator, aux, tiny_run(), data=data)  # 5 iterations of 8 images
    assert int(aux.round) == 1  # the last round never ends
    # the round teacher is the student as it was after 16 images: neither the teacher nor the final student
    moved = [k for k, v in generator.state_dict().items() if not torch.equal(v, teacher.state_dict()[k])]
    assert moved and all(not torch.equal(aux.net.state_dict()[k], teacher.state_dict()[k]) for k in moved)
    assert any(not torch.equal(aux.net.state_dict()[k], generator.state_dict()[k]) for k in moved)
