"""Consistency distillation as a training method: its EMA target follows the generator (θ⁻ ← μθ⁻ + (1−μ)θ) and is
never trained by a loss, the run is deterministic, and the one-step sample is f_θ(σ_max·z, σ_max)."""

import torch

from distillery.consistency import ConsistencyFunction
from distillery.methods.cd import ConsistencyDistillation
from distillery.training import TrainingData, distill

from toys import tiny_edm, tiny_run


def run(method, teacher, data):
    generator, aux = method.make_generator(teacher), method.make_aux(teacher)
    torch.manual_seed(0)
    losses = []
    result = distill(method, teacher, generator, aux, tiny_run(), data=data, on_progress=lambda n, l: losses.append(l))
    return generator, aux, result, losses


def test_the_target_is_the_ema_of_the_generator_and_runs_repeat_bit_for_bit():
    teacher = tiny_edm(perturb=0.05).eval()
    data = TrainingData(images=torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    method = ConsistencyDistillation(distance="pseudo_huber", target_ema=0.5)
    generator, aux, result, losses = run(method, teacher, data)
    assert [sorted(step) for step in losses] == [["loss_g"]] * 5  # no auxiliary loss
    moved = [k for k, v in generator.state_dict().items() if not torch.equal(v, teacher.state_dict()[k])]
    assert moved
    for k in moved:  # the target lies strictly between the teacher it started from and the generator
        t, g, a = teacher.state_dict()[k], generator.state_dict()[k], aux.state_dict()[k]
        assert not torch.equal(a, t) and not torch.equal(a, g)
    again = run(ConsistencyDistillation(distance="pseudo_huber", target_ema=0.5), teacher, data)[2]
    assert all(torch.equal(v, again.ema.state_dict()[k]) for k, v in result.ema.state_dict().items())


def test_the_one_step_sample_is_the_consistency_function_at_sigma_max():
    net = tiny_edm(perturb=0.1).eval()
    z = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = ConsistencyFunction(net)(z * 80.0, torch.full([2], 80.0))
        assert torch.equal(ConsistencyDistillation().generate(net, z), expected)
