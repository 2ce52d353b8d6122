"""What the reference training loops (NVlabs/edm, mingyuanzhou/SiD, pkulwj1994/diff_instruct, Zyriix/GDD) do
besides their losses: network modes per update, where class labels come from, the order of random draws, and
what becomes of non-finite gradients (docs/methods.md §3)."""

import copy

import pytest
import torch

from distillery.augment import AugmentPipe
from distillery.edm import edm_loss
from distillery.methods.diff_instruct import DiffInstruct
from distillery.methods.gdd import GDD
from distillery.methods.sid import SiD
from distillery.methods.sim import SIM
from distillery.training import TrainingData, distill, sanitize_grads

from toys import tiny_edm, tiny_run


def record_calls(net):
    """[(training, class_labels, output)] of every forward call of `net`."""
    calls = []
    net.register_forward_hook(lambda module, args, out: calls.append((module.training, args[2], out.detach())))
    return calls


@pytest.mark.parametrize("method_class", [SiD, SIM, DiffInstruct])
def test_fake_score_samples_come_from_the_eval_mode_generator(method_class):
    # SiD's and Diff-Instruct's loops switch G to eval (no dropout) to make the fake score's samples
    method = method_class()
    # a zero-initialised output conv would hide dropout: every weight is redrawn
    teacher = tiny_edm(dropout=0.5, perturb=0.3, redraw=True).eval().requires_grad_(False)
    generator, fake = method.make_generator(teacher).train(), method.make_aux(teacher)
    calls = record_calls(generator)
    z = torch.randn(6, 1, 8, 8)
    method.aux_loss(generator, fake, z).backward()
    ((training, _, samples),) = calls
    expected = method.generate(copy.deepcopy(generator).eval(), z)
    assert not training and torch.equal(samples, expected)
    assert generator.training  # and its mode is restored
    assert not torch.allclose(method.generate(generator, z), expected)  # dropout does change the samples


@pytest.mark.parametrize("method_class", [SiD, SIM, DiffInstruct])
def test_the_generator_loss_runs_the_generator_with_dropout(method_class):
    method = method_class()
    teacher = tiny_edm(dropout=0.5, perturb=0.3, redraw=True).eval().requires_grad_(False)
    generator, fake = method.make_generator(teacher), method.make_aux(teacher)
    calls = record_calls(generator)
    distill(method, teacher, generator, fake, tiny_run(duration_kimg=0.016))
    # two iterations, each a fake-score update and then a generator update
    assert [training for training, _, _ in calls] == [False, True, False, True]


@pytest.mark.parametrize("method", [GDD(), SiD()], ids=["gdd", "sid"])
def test_conditional_runs_generate_with_the_labels_of_the_data_set(method):
    # GDD's loop feeds the real batch's labels to G, SiD's draws its labels from the data set: here every image
    # is of class 2, so no other label may reach the generator
    teacher = tiny_edm(label_dim=3, dropout=0.5, perturb=0.3, redraw=True).eval().requires_grad_(False)
    generator, aux = method.make_generator(teacher), method.make_aux(teacher)
    calls = record_calls(generator)
    data = TrainingData(
        images=torch.rand(16, 1, 8, 8) * 2 - 1 if method.needs_real_data else None, labels=torch.full([16], 2)
    )
    distill(
        method,
        teacher if method.needs_teacher else None,
        generator,
        aux,
        tiny_run(duration_kimg=0.016),
        data=data,
        label_dim=3,
    )
    labels = torch.cat([c for _, c, _ in calls])
    assert len(calls) == 4 and torch.equal(labels, torch.eye(3)[torch.full([len(labels)], 2)])


def test_infinite_gradients_become_plus_minus_1e5_and_nan_zero():
    layer = torch.nn.Linear(2, 2)
    layer.weight.grad = torch.tensor([[float("inf"), -float("inf")], [float("nan"), 0.25]])
    sanitize_grads(layer)
    assert layer.weight.grad.tolist() == [[1e5, -1e5], [0.0, 0.25]]


def test_edm_loss_draws_sigma_then_the_augmentation_then_the_noise():
    # EDMLoss, SiD's and Diff-Instruct's fake-score losses: σ, augment, ε, in this order from one RNG
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    pipe = AugmentPipe.edm(1.0)
    seen = {}

    def net(x, sigma, class_labels=None, augment_labels=None):
        seen.update(x=x, sigma=sigma, augment_labels=augment_labels)
        return x

    torch.manual_seed(3)
    edm_loss(net, images, augment_pipe=pipe)
    torch.manual_seed(3)
    sigma = (torch.randn([4]) * 1.2 - 1.2).exp().reshape(4, 1, 1, 1)
    y, augment_labels = pipe(images)
    expected = y + torch.randn_like(y) * sigma
    assert torch.equal(seen["sigma"], sigma) and torch.equal(seen["augment_labels"], augment_labels)
    assert torch.equal(seen["x"], expected)
