"""Progressive distillation's target on the analytic Gaussian-mixture teacher: one student DDIM step with the target
lands exactly where two teacher steps land, and the teacher itself is not a zero-loss student."""

import torch

from distillery.analytic import GaussianMixture
from distillery.edm import karras_sigmas
from distillery.progressive import ddim_step, progressive_loss, two_step_target

from toys import F64

MIXTURE = GaussianMixture(
    torch.tensor([[1.0, -1.0], [-0.5, 0.5]], dtype=F64), torch.tensor([0.2, 0.3], dtype=F64), torch.tensor([0.4, 0.6])
)


def test_one_step_with_the_target_equals_two_teacher_steps():
    x = 3 * torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    for sigma, mid, nxt in [(5.0, 2.0, 0.7), (0.7, 0.2, 0.0)]:
        target = two_step_target(MIXTURE, x, sigma, mid, nxt)
        mid_state = ddim_step(x, MIXTURE(x, sigma), sigma, mid)
        two = ddim_step(mid_state, MIXTURE(mid_state, mid), mid, nxt)
        torch.testing.assert_close(ddim_step(x, target, sigma, nxt), two, rtol=0, atol=1e-12)


def test_the_loss_vanishes_only_for_the_two_step_student():
    grid = torch.cat([karras_sigmas(4)[:-1], torch.zeros(1, dtype=F64)])  # 4 teacher steps → a 2-step student
    x0 = MIXTURE.sample(512, torch.Generator().manual_seed(1))

    def perfect(x, sigma, labels=None):  # the denoiser whose single step replaces two teacher steps
        s = sigma.flatten()[0].item()
        k = [round(v, 12) for v in grid.tolist()].index(round(s, 12))
        return two_step_target(MIXTURE, x, sigma, grid[k + 1].item(), grid[k + 2].item())

    torch.manual_seed(2)
    assert progressive_loss(perfect, MIXTURE, x0[:1].expand(1, 2), grid).item() < 1e-20
    torch.manual_seed(2)
    assert progressive_loss(MIXTURE, MIXTURE, x0, grid).mean() > 1e-4
