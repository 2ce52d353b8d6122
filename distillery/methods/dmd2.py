"""DMD2 (Yin et al., NeurIPS 2024; tianweiy/DMD2), docs/methods.md §3.5.

Both losses draw σ from a Karras grid of `num_train_timesteps` levels (σ_min 0.002 … σ_max 80).
- Generator (distribution matching): at x_t = x_g + σε, with σ uniform over the grid's levels between
  min_step_percent and max_step_percent, the per-sample direction g = (D_ψ(x_t) − D_φ(x_t)) / mean|x_g − D_φ(x_t)|,
  taken without gradient, enters the loss ½·mean((x_g − sg(x_g − g))²): its gradient on x_g is g / numel.
- Fake score: σ uniform over every level of the grid, weight σ⁻² + σ_data⁻² (Karras), mean over elements.
- K steps (backward simulation): per batch one level k is drawn; the state x_k comes from running the student from
  pure noise for k steps without gradient (re-noised with fresh noise at σ_k), and G's sample is x̂ = G(x_k; σ_k).
- DDIL (§3.6): each sample's x_k comes instead from the forward-diffused data, the teacher's ODE rollout or the
  student's rollout, with probabilities ∝ `ddil`; `reflect` clips every x̂ of the rollouts to the data range.
- GAN (`gan`): a classifier head on the fake score's bottleneck sees real and generated images, each noised at a
  σ index uniform over the grid's lowest `gan_max_step_percent` (diffusion GAN); the fake score and head add
  gan_weight_d·mean(softplus(ℓ_fake) + softplus(−ℓ_real)), the generator gan_weight_g·mean(softplus(−ℓ(x_g))).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from distillery.edm import broadcast_per_sample, karras_sigmas
from distillery.fewstep import FewStepStudent, student_sigmas
from distillery.methods.base import FakeScoreMethod, finite_rows, frozen
from distillery.registry import DMD2Settings


def distribution_matching_loss(x_g, d_teacher, d_fake):
    """½·mean((x_g − sg(x_g − g))²) with g = (D_ψ − D_φ) / mean|x_g − D_φ| per sample (§3.5)."""
    with torch.no_grad():
        p_real = x_g - d_teacher
        grad = (d_fake - d_teacher) / p_real.abs().mean(dim=tuple(range(1, x_g.ndim)), keepdim=True)
        grad = torch.nan_to_num(grad)
    return 0.5 * torch.nn.functional.mse_loss(x_g, (x_g - grad).detach())


class GANHead(nn.Module):
    """DMD2's classifier branch: conv 4×4 stride 2, GroupNorm, SiLU, a conv down to 1×1, GroupNorm, SiLU, 1×1 conv to
    one logit. On ADM's 8×8 bottleneck (ImageNet-64) the second conv is the reference's 4×4 stride 4; on a smaller
    bottleneck its kernel is the size left after the first conv."""

    def __init__(self, channels, size):
        super().__init__()
        if size < 2:
            raise ValueError(f"the GAN head needs a bottleneck of at least 2×2, got {size}×{size}")
        groups, rest = math.gcd(32, channels), size // 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 4, stride=2, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, rest, stride=rest),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, features):
        return self.body(features).flatten()


class FakeScoreWithHead(nn.Module):
    """The fake score D_φ (called as a denoiser) with DMD2's GAN head on the output of its UNet's last encoder
    block, both trained by the fake-score optimiser."""

    def __init__(self, fake):
        super().__init__()
        self.fake = fake
        last = [block for name, block in fake.model.enc.items() if "aux" not in name][-1]
        self._features = None
        last.register_forward_hook(self._keep)  # a bound method: a deep copy hooks into its own copy
        shape = [1, fake.img_channels, fake.img_resolution, fake.img_resolution]
        labels = torch.zeros([1, fake.label_dim]) if fake.label_dim else None
        with torch.no_grad():
            fake(torch.zeros(shape), torch.ones([1]), labels)
        self.head = GANHead(self._features.shape[1], self._features.shape[-1])

    def _keep(self, module, args, output):
        self._features = output

    def forward(self, x, sigma, class_labels=None):
        return self.fake(x, sigma, class_labels)

    def logits(self, images, sigma, class_labels=None):
        """One logit per image, from the fake net's bottleneck at x = images + σ·ε (the full forward pass, whose
        output is unused, keeps one path for every UNet)."""
        self.fake(images + sigma * torch.randn_like(images), sigma.flatten(), class_labels)
        return self.head(self._features)


class DMD2(FewStepStudent, FakeScoreMethod):
    """DMD2's generator loss and its fake-score loss on the Karras grid; per iteration G first (when due), then
    the fake score, as the reference loop."""

    generator_first = True
    base_source = "student"  # backward simulation

    def __init__(self, **settings):
        s = DMD2Settings(**settings)
        self.sigma_init, self.sigma_data = s.sigma_init, s.sigma_data
        self.augment = None
        self.generator_every = s.fake_updates
        # ascending, as the reference indexes it: level t = 0 is σ_min
        self.grid = karras_sigmas(s.num_train_timesteps)[:-1].flip(0)
        self.min_step = int(s.min_step_percent * s.num_train_timesteps)
        self.max_step = int(s.max_step_percent * s.num_train_timesteps)
        self.fewstep_setup(s, student_sigmas(s.steps, s.num_train_timesteps, sigma_max=s.sigma_init))
        self.gan, self.gan_weight_g, self.gan_weight_d = s.gan, s.gan_weight_g, s.gan_weight_d
        self.gan_max_step = max(1, int(s.gan_max_step_percent * s.num_train_timesteps))
        self.needs_real_data = self.needs_real_data or s.gan

    def make_aux(self, teacher):
        self.teacher = teacher  # DDIL's teacher states roll the teacher out
        fake = super().make_aux(teacher)
        return FakeScoreWithHead(fake) if self.gan else fake

    def gan_logits(self, aux, images, class_labels):
        return aux.logits(images, self.sigmas(0, self.gan_max_step, images), class_labels)

    def generate(self, generator, z, class_labels=None, real=None):
        """x̂ = G(x_k; σ_k) at one level k per batch, x_k by backward simulation (§3.5) or from DDIL's mixture
        (§3.6); k = 0 is the one-step path."""
        k = int(torch.randint(len(self.levels), [1]))
        x_k = self.states(self.levels[k], generator, z, None if real is None else real[0], class_labels)
        sigma = torch.full([z.shape[0]], float(self.levels[k]), dtype=z.dtype, device=z.device)
        return generator(x_k, broadcast_per_sample(sigma, z), class_labels)

    def sigmas(self, low, high, like):
        t = torch.randint(low, high, [like.shape[0]], device=like.device)
        return broadcast_per_sample(self.grid.to(like.device, like.dtype)[t], like)

    def generator_loss(self, generator, aux, teacher, z, class_labels=None, real=None):
        x_g = self.generate(generator, z, class_labels, real)
        keep = broadcast_per_sample(finite_rows(x_g), x_g)
        x_g = torch.where(keep, x_g, 0)
        with torch.no_grad():
            sigma = self.sigmas(self.min_step, min(self.max_step + 1, len(self.grid)), x_g)
            x_t = x_g + sigma * torch.randn_like(x_g)
            with frozen(teacher), frozen(aux):
                d_teacher, d_fake = teacher(x_t, sigma, class_labels), aux(x_t, sigma, class_labels)
        loss = distribution_matching_loss(x_g, d_teacher, d_fake)
        if self.gan:
            with frozen(aux):  # the head's gradient reaches G through the fake net's input only
                loss = loss + self.gan_weight_g * F.softplus(-self.gan_logits(aux, x_g, class_labels)).mean()
        return loss

    def aux_loss(self, generator, aux, z, class_labels=None, real=None):
        # the reference trains the fake score on the samples of G in train mode (its loop never switches to eval)
        with torch.no_grad():
            x_g = self.generate(generator, z, class_labels, real)
        keep = finite_rows(x_g)
        x_g, class_labels = x_g[keep], None if class_labels is None else class_labels[keep]
        if isinstance(aux, torch.nn.Module):
            aux.train()
        sigma = self.sigmas(0, len(self.grid), x_g)
        denoised = aux(x_g + sigma * torch.randn_like(x_g), sigma, class_labels)
        weight = sigma**-2 + self.sigma_data**-2  # Karras weighting
        loss = (weight * (denoised - x_g) ** 2).mean()
        if self.gan:
            real_images, real_labels = real
            on_real = self.gan_logits(aux, real_images, real_labels)
            on_fake = self.gan_logits(aux, x_g, class_labels)
            loss = loss + self.gan_weight_d * (F.softplus(on_fake) + F.softplus(-on_real)).mean()
        return loss
