"""Non-leaking geometric augmentation: EDM (Karras et al. 2022) Appendix; docs/methods.md §3.1 (SiD's fake-score
loss uses it).

`AugmentPipe.edm(p)` is EDM's `train.py --augment=p` (xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
translate_frac=1). Its labels [N, 9] equal the official pipe's (NVlabs/edm training/augment.py), column by column:
xflip bit, yflip bit, w_s, cos θ - 1, sin θ, w_a·cos r, w_a·sin r, w_x, w_y; with w ~ N(0, 1) scaling by
2^(w_s·scale_std), θ ~ U(±π·rotate_frac_max) rotating counter-clockwise on screen, w_a stretching by
2^(w_a·aniso_std) along the direction r ~ U(±π) (r = 0 with probability 1 - aniso_rotate_prob) and by the inverse
across it, and translating by (w_x·W, w_y·H)·translate_frac_std pixels. Only kinds with a multiplier > 0 get
columns, in that order. Each kind is enabled per sample with probability multiplier·p; a disabled kind's labels
are 0, an enabled flip flips on a fair coin (so xflip=1e8 flips half of all images, yflip=1 a fraction p/2).
Random numbers come from the global torch RNG in the official order, so a seed gives the official parameters.
Unlike the official pipe, p == 0 returns the input itself and draws nothing; colour transforms and integer
rotation/translation are left out (EDM's configurations do not use them).

Resampling, the official scheme written anew: one inverse affine map per sample about the image centre, reflect
padding, 2x upsampling with the sym6 wavelet filter, bilinear sampling on a 2x grid, 2x downsampling with the same
filter, at the official sample positions. Differences: one symmetric margin per axis, from all source points of
the 2x grid (official: per side, from the image corners plus 6 px); the 2x output grid is the 2W - 2 + 12 samples
that the downsampling reads (official: 2W + 12, two unread); the upsampled image keeps the filter tails at its
ends. Outputs agree within 4e-5; they differ more (up to 0.03 at p = 1) only where a margin hits the reflect
limit of size - 1 px (rare, extreme draws): both read zeros beyond the padded image, cut at different places.
"""

import math

import torch
import torch.nn.functional as F

# Orthonormal sym6 low-pass filter (sum √2, unit energy, orthogonal to its even shifts): PyWavelets'
# Wavelet('sym6').dec_lo. Upsampling then downsampling with it is the identity (perfect reconstruction).
SYM6 = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)


def rotation(theta):
    """[N, 2, 2] matrices rotating by theta [N] counter-clockwise as seen on screen (y points down)."""
    c, s = theta.cos(), theta.sin()
    return torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)


def resample(images, A_inv, t):
    """out(p) = images(A_inv[n] @ (p - t[n])) per sample n, p in pixels from the image centre."""
    N, C, H, W = images.shape
    f = torch.tensor(SYM6, dtype=images.dtype, device=images.device)
    K = len(f)
    size = torch.tensor([W, H], dtype=A_inv.dtype, device=A_inv.device)
    # 2x sample j of a row stands for pixel (j - 5)/2, where the official pipe puts it (sym6's centre of mass
    # is tap 5.1, so both pivot 0.05 px off the image centre); the output's 2x grid spans every downsampling tap.
    px = (torch.arange(2 * W - 2 + K, device=A_inv.device) - 5) / 2 - (W - 1) / 2
    py = (torch.arange(2 * H - 2 + K, device=A_inv.device) - 5) / 2 - (H - 1) / 2
    p = torch.stack(torch.meshgrid(px, py, indexing="xy"), -1)  # [Hu, Wu, (x, y)]
    q = (p - t[:, None, None]) @ A_inv[:, None].transpose(2, 3)  # source pixels from the centre [N, Hu, Wu, 2]
    # Pad so that every source point keeps the upsampling filter's reach ((K - 1)/4 px) and a bilinear
    # neighbour on real or reflected pixels; reflect padding allows at most size - 1.
    margin = (q.abs().amax((0, 1, 2)) - (size - 1) / 2 + (K - 1) / 4 + 1).ceil().clamp(min=0)
    margin = torch.minimum(margin, size - 1)
    mx, my = [int(m) for m in margin.tolist()]
    x = F.pad(images, [mx, mx, my, my], mode="reflect").reshape(N * C, 1, H + 2 * my, W + 2 * mx)
    # Zero insertion and filtering, one axis at a time: y[m] = sum_n x[n] f[m - 2n].
    x = F.conv_transpose2d(x, f.view(1, 1, 1, K), stride=(1, 2))
    x = F.conv_transpose2d(x, f.view(1, 1, K, 1), stride=(2, 1))
    up_size = torch.tensor([x.shape[3], x.shape[2]], dtype=A_inv.dtype, device=A_inv.device)
    index = 2 * (q + (size - 1) / 2 + margin) + 5  # source pixel -> 2x sample of the padded image
    grid = (2 * index / (up_size - 1) - 1).to(images.dtype)  # align_corners=True: first/last sample at ∓1
    x = F.grid_sample(x.reshape(N, C, *x.shape[2:]), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    # Filtering and decimation, the adjoint of the upsampling: z[n] = sum_m u[m] f[m - 2n].
    x = F.conv2d(x.reshape(N * C, 1, *x.shape[2:]), f.view(1, 1, 1, K), stride=(1, 2))
    x = F.conv2d(x, f.view(1, 1, K, 1), stride=(2, 1))
    return x.reshape(N, C, H, W)


def augment_geometric(
    images, xflip=None, yflip=None, scale=None, rotate=None, aniso=None, aniso_angle=None, translate=None
):
    """Apply explicit per-sample transforms to NCHW images; None leaves that transform out.

    xflip, yflip: [N] 0/1 (mirror the width / height axis, applied first, exactly); scale: [N] isotropic
    factor; rotate: [N] angle θ in radians, counter-clockwise on screen; aniso: [N] factor a, stretching by a
    along the direction at angle aniso_angle [N] (counter-clockwise on screen, default 0 = the x axis) and by
    1/a across it; translate: [N, 2] pixels (x right, y down). Geometric order as in the official pipe:
    scale, then rotate, then aniso, then translate, all about the image centre.
    """
    N = images.shape[0]
    if xflip is not None:
        images = torch.where(xflip.view(N, 1, 1, 1).bool(), images.flip(3), images)
    if yflip is not None:
        images = torch.where(yflip.view(N, 1, 1, 1).bool(), images.flip(2), images)
    if scale is None and rotate is None and aniso is None and translate is None:
        return images
    A_inv = torch.eye(2, device=images.device).expand(N, 2, 2)
    if scale is not None:
        A_inv = A_inv / scale.view(N, 1, 1)
    if rotate is not None:
        A_inv = A_inv @ rotation(-rotate)
    if aniso is not None:
        r = torch.zeros_like(aniso) if aniso_angle is None else aniso_angle
        stretch_inv = torch.diag_embed(torch.stack([1 / aniso, aniso], -1))
        A_inv = A_inv @ rotation(r) @ stretch_inv @ rotation(-r)
    t = torch.zeros(N, 2, device=images.device) if translate is None else translate
    return resample(images, A_inv, t)


class AugmentPipe:
    """The geometric part of EDM's AugmentPipe; `pipe(images)` -> (augmented images, labels [N, label_dim])."""

    def __init__(
        self,
        p=1.0,
        xflip=0,
        yflip=0,
        scale=0,
        rotate_frac=0,
        aniso=0,
        translate_frac=0,
        scale_std=0.2,
        rotate_frac_max=1,
        aniso_std=0.2,
        aniso_rotate_prob=0.5,
        translate_frac_std=0.125,
    ):
        self.p = float(p)
        self.xflip, self.yflip, self.scale = float(xflip), float(yflip), float(scale)
        self.rotate_frac, self.aniso, self.translate_frac = float(rotate_frac), float(aniso), float(translate_frac)
        self.scale_std, self.rotate_frac_max = float(scale_std), float(rotate_frac_max)
        self.aniso_std, self.aniso_rotate_prob = float(aniso_std), float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)

    @classmethod
    def edm(cls, p):
        """EDM's train.py --augment=p (0.12 on CIFAR-10, 0.15 on FFHQ/AFHQv2-64): label_dim 9."""
        return cls(p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

    @property
    def label_dim(self):
        kinds = [
            (self.xflip, 1),
            (self.yflip, 1),
            (self.scale, 1),
            (self.rotate_frac, 2),
            (self.aniso, 2),
            (self.translate_frac, 2),
        ]
        return sum(width for multiplier, width in kinds if multiplier > 0)

    def __call__(self, images):
        N, _, H, W = images.shape
        device = images.device
        if self.p == 0:
            return images, torch.zeros(N, self.label_dim, device=device)

        def gate(multiplier, w):
            # Keep a sample's draw with probability multiplier·p, else 0 (drawn after w, as officially).
            return torch.where(torch.rand(N, device=device) < multiplier * self.p, w, 0)

        params, labels = {}, []
        if self.xflip > 0:
            params["xflip"] = gate(self.xflip, torch.randint(2, [N], device=device))
            labels.append(params["xflip"])
        if self.yflip > 0:
            params["yflip"] = gate(self.yflip, torch.randint(2, [N], device=device))
            labels.append(params["yflip"])
        if self.scale > 0:
            w = gate(self.scale, torch.randn(N, device=device))
            params["scale"] = torch.exp2(w * self.scale_std)
            labels.append(w)
        if self.rotate_frac > 0:
            theta = (torch.rand(N, device=device) * 2 - 1) * (math.pi * self.rotate_frac_max)
            theta = gate(self.rotate_frac, theta)
            params["rotate"] = theta
            labels += [theta.cos() - 1, theta.sin()]
        if self.aniso > 0:
            w = torch.randn(N, device=device)
            r = (torch.rand(N, device=device) * 2 - 1) * math.pi
            w = gate(self.aniso, w)
            # The official pipe stretches along the pixel axes (r = 0) half of the time.
            r = torch.where(torch.rand(N, device=device) < self.aniso_rotate_prob, r, 0)
            params["aniso"], params["aniso_angle"] = torch.exp2(w * self.aniso_std), r
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = gate(self.translate_frac, torch.randn(2, N, device=device))
            params["translate"] = torch.stack(
                [w[0] * (W * self.translate_frac_std), w[1] * (H * self.translate_frac_std)], -1
            )
            labels += [w[0], w[1]]
        labels = torch.stack([label.float() for label in labels], 1) if labels else torch.zeros(N, 0, device=device)
        return augment_geometric(images, **params), labels
