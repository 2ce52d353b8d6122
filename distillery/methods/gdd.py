"""GDD and GDD-I: GAN distillation at distribution level (Zheng & Yang), docs/methods.md §3.3.

The generator starts from the teacher and is evaluated once at σ = 80; training is a pure
non-saturating GAN against real images, so the teacher is never evaluated. At σ = 80 GDD's
consistency-style preconditioning equals EDM's to within ~1e-5 (§3.3), so the EDMPrecond generator
is used as it is. GDD's generator has no augment map and no dropout: it is called without augment
labels, and `generator_dropout = 0` tells the stage to switch the teacher copy's dropout off.
"""

import torch
from torch.nn import functional as F

from distillery.discriminators import ProjectedDiscriminator, TeacherEncoderDiscriminator
from distillery.methods.base import DistillationMethod, frozen
from distillery.registry import GDDSettings


def generator_gan_loss(logits):
    # §3.3 generator (non-saturating): Σ_heads mean softplus(−D(x_g))
    return sum(F.softplus(-l).mean() for l in logits)


def discriminator_gan_loss(fake_logits, real_logits):
    # §3.3 discriminator: Σ_heads [mean softplus(D(x_g)) + mean softplus(−D(x_real))]
    return sum(F.softplus(l).mean() for l in fake_logits) + sum(F.softplus(-l).mean() for l in real_logits)


def r1_penalty(real_logits, x_real, gamma):
    """(γ/2)·‖∇_x Σ D(x_real)‖² per image, averaged over the batch; `x_real` must require grad."""
    # §3.3 R1: gradient of the sum of every logit of every head, kept in the graph (double backward)
    (grad,) = torch.autograd.grad(sum(l.sum() for l in real_logits), x_real, create_graph=True)
    return gamma / 2 * grad.square().flatten(1).sum(1).mean()


def gdd_i_frozen(name):
    # §3.3 GDD-I (--freeze=1): frozen iff the name holds one of {block, up, down, in} and one of {conv, proj}
    return any(s in name for s in ("block", "up", "down", "in")) and any(s in name for s in ("conv", "proj"))


def gdd_i_trainable(named_parameters):
    """The (name, parameter) pairs GDD-I's optimiser updates."""
    return [(name, p) for name, p in named_parameters if not gdd_i_frozen(name)]


class GDD(DistillationMethod):
    """x_g = G(80z; 80) trained as a GAN generator; the auxiliary network is the discriminator.

    discriminator: "teacher_encoder" (offline: heads on a frozen teacher-encoder copy evaluated at
    `encoder_sigma`) or "projected" (GDD's: frozen ImageNet `backbones` with `backbone_weights`,
    inputs upsampled to `resolution`). R1 (γ = r1_gamma) on real images every `r1_interval` steps.
    d_lr_scale: D lr / G lr before the lazy-regularisation correction (1 for CIFAR-10, §3.3).
    """

    needs_teacher = False
    needs_real_data = True
    generator_first = True
    generator_dropout = 0.0

    def __init__(self, **settings):
        s = GDDSettings(**settings)
        self.sigma_init = s.sigma_init
        self.discriminator = s.discriminator
        self.backbones = tuple(s.backbones)
        self.backbone_weights = s.backbone_weights
        self.resolution = s.resolution
        self.proj_channels = s.proj_channels
        self.head_channels = s.head_channels
        self.cmap_dim = s.cmap_dim
        self.encoder_sigma = s.encoder_sigma
        self.r1_gamma = s.r1_gamma
        self.r1_interval = s.r1_interval
        self.d_lr_scale = s.d_lr_scale

    def make_aux(self, teacher):
        """The discriminator, on the teacher's device (the teacher gives its encoder, or only its label_dim)."""
        if self.discriminator == "teacher_encoder":
            disc = TeacherEncoderDiscriminator(
                teacher, sigma=self.encoder_sigma, channels=self.head_channels, cmap_dim=self.cmap_dim
            )
        else:
            disc = ProjectedDiscriminator(
                label_dim=teacher.label_dim,
                backbones=self.backbones,
                weights=self.backbone_weights,
                resolution=self.resolution,
                proj_channels=self.proj_channels,
                cmap_dim=self.cmap_dim,
            )
        return disc.to(next(teacher.parameters()).device)

    def optimizers(self, generator, aux, lr, betas, eps, generator_betas=None):
        """G: Adam(lr, generator_betas or betas, eps). D: StyleGAN2's lazy-regularisation correction with
        k = r1_interval/(r1_interval + 1): lr·d_lr_scale·k and β^k (GDD's (0, 0.99) give (0, 0.99^(16/17)), §3.3)."""
        k = self.r1_interval / (self.r1_interval + 1)
        opt_g = torch.optim.Adam(
            self.generator_parameters(generator), lr=lr, betas=tuple(generator_betas or betas), eps=eps
        )
        opt_d = torch.optim.Adam(
            [p for p in aux.parameters() if p.requires_grad],
            lr=lr * self.d_lr_scale * k,
            betas=tuple(b**k for b in betas),
            eps=eps,
        )
        return opt_g, opt_d

    def regularizer_due(self, step):
        # §3.3 lazy R1, as GDD's loop: an extra D step in iterations 16, 32, … counted from 0 (not in the first)
        return self.r1_gamma > 0 and step > 0 and step % self.r1_interval == 0

    def generator_loss(self, generator, aux, teacher, z, class_labels=None, real=None):
        """Non-saturating loss of x_g; gradients reach G through the discriminator's input only."""
        x_g = self.generate(generator, z, class_labels)
        with frozen(aux, keep_mode=True):  # as in GDD, D's batch norm keeps using batch statistics here
            return generator_gan_loss(aux(x_g, class_labels))

    def aux_loss(self, generator, aux, z, class_labels=None, real=None):
        """Discriminator loss on detached x_g and the real batch."""
        if real is None:
            raise ValueError("GDD trains against real images: call distill(..., real_images=...)")
        with torch.no_grad():
            x_g = self.generate(generator, z, class_labels)
        x_real, c_real = real
        x_real = x_real.to(device=x_g.device, dtype=x_g.dtype)
        c_real = None if c_real is None else c_real.to(x_g.device)
        return discriminator_gan_loss(aux(x_g, class_labels), aux(x_real, c_real))

    def regularizer_loss(self, aux, class_labels=None, real=None):
        """The lazy R1 step on the D step's real batch, with gradient gain r1_interval (§3.3); the D optimiser's
        lr·k and β^k (k = r1_interval/(r1_interval+1)) correct for these extra steps."""
        x_real, c_real = real
        x_real = x_real.detach().requires_grad_(True)
        return self.r1_interval * r1_penalty(aux(x_real, c_real), x_real, self.r1_gamma)


class GDDI(GDD):
    """GDD-I: GDD with most generator convolutions frozen (§3.3); ~84 % of CIFAR-10 NCSN++ parameters."""

    def generator_parameters(self, generator):
        return [p for _, p in gdd_i_trainable(generator.named_parameters())]
