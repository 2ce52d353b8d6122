"""DMD2 on the analytic Gaussian teacher: the distribution-matching step moves the generator toward the teacher
(the sign-flipped loss does not), its gradient per sample is (D_ψ − D_φ)/(numel·mean|x_g − D_φ|), and the fake-score
loss is minimised by the generator's exact denoiser."""

import pytest
import torch

from distillery.methods.dmd2 import DMD2, distribution_matching_loss
from distillery.sampling import one_step

from toys import F64, AffineGenerator, assert_step_moves_toward_teacher, gaussian, tiny_distill, tiny_edm


def test_one_step_moves_the_generator_toward_the_teacher():
    torch.manual_seed(0)
    mu_p = torch.tensor([1.0, -0.5, 0.25, 0.0], dtype=F64)
    teacher = gaussian(mu_p, 0.5)
    generator = AffineGenerator(torch.zeros(4, dtype=F64), -1.5)  # std 0.22, narrower than the teacher
    fake = gaussian(generator.mu.detach(), generator.log_s.detach().exp())  # the generator's exact denoiser
    loss = DMD2().generator_loss(generator, fake, teacher, torch.randn(4096, 4, dtype=F64))
    assert_step_moves_toward_teacher(generator, loss, mu_p)


def test_the_gradient_is_the_normalised_fake_minus_teacher_denoiser():
    gen = torch.Generator().manual_seed(0)
    x_g = torch.randn(3, 2, 4, dtype=F64, generator=gen).requires_grad_(True)
    d_teacher, d_fake = (torch.randn(3, 2, 4, dtype=F64, generator=gen) for _ in range(2))
    distribution_matching_loss(x_g, d_teacher, d_fake).backward()
    expected = (d_fake - d_teacher) / (x_g - d_teacher).abs().mean((1, 2), keepdim=True) / x_g.numel()
    torch.testing.assert_close(x_g.grad, expected.detach())


def test_fake_score_loss_is_lowest_for_the_exact_denoiser_of_the_samples():
    generator = AffineGenerator(torch.tensor([0.5, -0.5], dtype=F64), scale=0.3)
    exact, wrong = gaussian(generator.mu.detach(), 0.3), gaussian(torch.zeros(2, dtype=F64), 0.3)
    z = torch.randn(20000, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    losses = []
    for fake in (exact, wrong):
        torch.manual_seed(2)
        losses.append(DMD2().aux_loss(generator, fake, z).item())
    assert losses[0] < losses[1]


def test_one_step_dmd2_generates_as_the_one_step_path():
    net = tiny_edm(perturb=0.1).eval()
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(DMD2().generate(net, z), one_step(net, 80.0)(z, None))


def test_backward_simulation_runs_the_student_k_steps_from_noise():
    calls = []

    def student(x, sigma, labels=None):
        calls.append(float(sigma.flatten()[0]))
        return 0.5 * x

    method = DMD2(steps=4)
    z = torch.randn(2, 3)
    for seed in range(20):
        torch.manual_seed(seed)
        calls.clear()
        k = int(torch.randint(4, [1]))
        torch.manual_seed(seed)
        method.generate(student, z)
        assert calls == pytest.approx(method.levels[: k + 1].tolist(), rel=1e-6)  # k rollout steps, then G at σ_k


def test_the_generator_is_updated_once_per_fake_updates_iterations_and_first():
    class Recording(DMD2):
        def __init__(self, **settings):
            super().__init__(**settings)
            self.calls = []

        def generator_loss(self, *args, **kwargs):
            self.calls.append("g")
            return super().generator_loss(*args, **kwargs)

        def aux_loss(self, *args, **kwargs):
            self.calls.append("fake")
            return super().aux_loss(*args, **kwargs)

    method = Recording(fake_updates=3)
    _, losses = tiny_distill(method, tiny_edm())  # 5 iterations
    assert method.calls == ["g", "fake", "fake", "fake", "g", "fake", "fake"]
    assert [sorted(step) for step in losses] == [["loss_aux", "loss_g"], ["loss_aux"], ["loss_aux"]] + [
        ["loss_aux", "loss_g"],
        ["loss_aux"],
    ]


@pytest.mark.parametrize("ddil", [None, (1.0, 1.0, 1.0)])
def test_k_step_dmd2_trains_deterministically_with_and_without_ddil(ddil):
    from distillery.training import TrainingData, distill

    from toys import tiny_run

    teacher = tiny_edm(perturb=0.05).eval()
    data = TrainingData(images=torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    runs = []
    for _ in range(2):
        method = DMD2(steps=4, fake_updates=2, ddil=ddil, reflect=True, rollout_steps=2)
        generator = method.make_generator(teacher)
        torch.manual_seed(0)
        result = distill(method, teacher, generator, method.make_aux(teacher), tiny_run(), data=data)
        runs.append(result.ema.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert all(v.isfinite().all() for v in runs[0].values())
    assert any(not torch.equal(runs[0][k], teacher.state_dict()[k]) for k in runs[0])


def test_the_fake_score_sees_samples_of_the_generator_in_train_mode():
    modes = []

    class Recorder(torch.nn.Module):
        def forward(self, x, sigma, labels=None):
            modes.append(self.training)
            return 0.5 * x

    generator = Recorder().train()
    fake = gaussian(torch.zeros(4, dtype=F64), 1.0)
    DMD2().aux_loss(generator, fake, torch.randn(8, 4, dtype=F64))
    assert modes == [True]


def test_the_gan_head_reads_the_fake_scores_bottleneck_and_trains_with_it():
    import copy

    from distillery.methods.dmd2 import FakeScoreWithHead

    teacher = tiny_edm(perturb=0.05).eval()
    method = DMD2(gan=True, gan_weight_d=1.0, gan_weight_g=1.0)
    aux = method.make_aux(teacher)
    assert isinstance(aux, FakeScoreWithHead) and method.needs_real_data
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(aux(x, torch.full([4], 2.0)), teacher(x, torch.full([4], 2.0)))  # still the denoiser
    # the fake-score loss now holds the classification loss: it reaches the head and the fake net's encoder
    z, real = torch.randn(6, 1, 8, 8), torch.rand(6, 1, 8, 8) * 2 - 1
    torch.manual_seed(0)
    method.aux_loss(method.make_generator(teacher), aux, z, None, (real, None)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aux.head.parameters())
    # the generator's loss gains the non-saturating term, whose gradient flows through the frozen fake net
    generator = method.make_generator(teacher)
    torch.manual_seed(1)
    with_gan = method.generator_loss(generator, aux, teacher, z)
    torch.manual_seed(1)
    plain = DMD2().generator_loss(generator, aux.fake, teacher, z)
    assert with_gan > plain
    aux.zero_grad(set_to_none=True)
    with_gan.backward()
    assert all(p.grad is None for p in aux.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    # a deep copy (resume, checkpoints) reads its own bottleneck
    twin = copy.deepcopy(aux)
    with torch.no_grad():
        torch.manual_seed(2)
        a = aux.logits(x, torch.full([4, 1, 1, 1], 1.0))
        torch.manual_seed(2)
        b = twin.logits(x, torch.full([4, 1, 1, 1], 1.0))
    assert torch.equal(a, b) and twin._features is not aux._features


def test_dmd2_with_the_gan_trains_deterministically():
    from distillery.training import TrainingData, distill

    from toys import tiny_run

    teacher = tiny_edm(perturb=0.05).eval()
    data = TrainingData(images=torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    runs = []
    for _ in range(2):
        method = DMD2(steps=2, fake_updates=2, gan=True)
        torch.manual_seed(0)
        result = distill(
            method, teacher, method.make_generator(teacher), method.make_aux(teacher), tiny_run(), data=data
        )
        runs.append(result.ema.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
