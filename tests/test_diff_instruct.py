import copy
import math

import torch

from distillery.methods.diff_instruct import DiffInstruct, same_dropout_pair, train_mode

from toys import F64, AffineGenerator, MLPDenoiser, assert_step_moves_toward_teacher, gaussian, tiny_distill, tiny_edm


class FixedSamples(torch.nn.Module):
    """A 'generator' whose samples x_g are its own parameter, so d loss / d x_g is a parameter gradient."""

    def __init__(self, x):
        super().__init__()
        self.x = torch.nn.Parameter(x.clone())

    def forward(self, x, sigma, class_labels=None):
        return self.x


def test_a_descent_step_moves_the_mean_toward_the_teacher_and_a_flipped_sign_does_not():
    torch.manual_seed(0)
    mu_p = torch.tensor([1.0, -0.5, 0.3, 0.8], dtype=F64)
    generator, teacher = AffineGenerator([0.0, 0.5, -0.4, 0.2], -0.5), gaussian(mu_p, 1.0)
    fake = gaussian(generator.mu.detach(), generator.log_s.detach().exp())  # the generator's exact denoiser
    z = torch.randn(4096, 4, dtype=F64)
    loss = DiffInstruct().generator_loss(generator, fake, teacher, z)
    assert_step_moves_toward_teacher(generator, loss, mu_p)


def test_the_gradient_on_each_sample_is_fake_minus_teacher_denoiser_and_no_network_is_trained():
    torch.manual_seed(0)
    generator = FixedSamples(torch.randn(16, 5, dtype=F64))
    teacher, fake = MLPDenoiser(5, seed=1).eval(), MLPDenoiser(5, seed=2).eval()
    method = DiffInstruct(loss_scale_g=2.0)
    z = torch.randn(16, 5, dtype=F64)
    torch.manual_seed(3)
    method.generator_loss(generator, fake, teacher, z).backward()
    # Both nets ran once, in train mode (the §3.4 quirk), and are back in eval mode.
    assert teacher.modes == fake.modes == [True]
    assert not teacher.training and not fake.training
    # Neither denoiser is differentiated: their parameters, all trainable here, received nothing.
    assert all(p.grad is None for p in [*teacher.parameters(), *fake.parameters()])
    # Same random stream as the method: ln sigma ~ N(P_mean, P_std^2) first, then the noise.
    torch.manual_seed(3)
    sigma = (torch.randn(16, dtype=F64) * 1.2 - 1.2).exp().reshape(16, 1)
    x_g = generator.x.detach()
    x_t = x_g + sigma * torch.randn_like(x_g)
    with torch.no_grad():
        expected = fake(x_t, sigma) - teacher(x_t, sigma)  # D_psi - D_phi, the reverse-KL direction
    assert torch.allclose(generator.x.grad, 2.0 / 16 * expected, rtol=1e-12, atol=0)
    assert not torch.allclose(generator.x.grad, -2.0 / 16 * expected, rtol=0.5)


def test_teacher_and_fake_with_equal_weights_draw_the_same_dropout_masks():
    # perturbed weights: at initialisation the convolution right after each dropout is zero, which would make
    # dropout invisible in the output
    teacher = tiny_edm(dropout=0.5, perturb=0.1).eval()
    fake = copy.deepcopy(teacher)
    torch.manual_seed(1)
    x_t, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 0.5, 1.0, 3.0]).reshape(4, 1, 1, 1)
    with torch.no_grad():
        d_teacher, d_fake = same_dropout_pair(teacher, fake, x_t, sigma)
        assert torch.equal(d_fake - d_teacher, torch.zeros_like(d_teacher))
        assert not teacher.training and not fake.training
        # Dropout was active (the outputs are not the eval-mode ones) ...
        assert not torch.allclose(d_teacher, teacher(x_t, sigma), atol=1e-4)
        # ... so with independent masks the two copies would disagree.
        with train_mode(teacher, fake):
            assert not torch.allclose(teacher(x_t, sigma), fake(x_t, sigma), atol=1e-4)


def test_a_generator_step_against_an_equal_fake_is_exactly_zero_with_dropout_on():
    teacher = tiny_edm(dropout=0.5, perturb=0.1).eval().requires_grad_(False)
    generator, fake = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).train()
    torch.manual_seed(1)
    loss = DiffInstruct().generator_loss(generator, fake, teacher, torch.randn(8, 1, 8, 8))
    loss.backward()
    assert loss.item() == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in generator.parameters() if p.grad is not None)


def test_non_finite_samples_are_dropped():
    torch.manual_seed(0)
    generator, teacher, fake = AffineGenerator([0.1, -0.2, 0.3], -0.2), MLPDenoiser(3, seed=1), MLPDenoiser(3, seed=2)
    z = torch.randn(16, 3, dtype=F64)
    z[3, 1] = float("nan")
    loss = DiffInstruct().generator_loss(generator, fake, teacher, z)
    loss.backward()
    assert loss.isfinite() and loss != 0
    assert generator.mu.grad.isfinite().all()


def test_distill_runs_diff_instruct_on_a_tiny_edm_network():
    teacher = tiny_edm(dropout=0.5, perturb=0.1).eval().requires_grad_(False)
    torch.manual_seed(2)
    generator, losses = tiny_distill(DiffInstruct(), teacher)
    assert len(losses) == 5
    assert all(math.isfinite(value) for logs in losses for value in logs.values())
    assert any(not torch.equal(p, q) for p, q in zip(generator.parameters(), teacher.parameters()))
    assert not teacher.training
