"""Discriminators for GAN distillation (GDD, ALGORITHMS.md §3.3).

Both return a list of logit tensors, one per head, each [B, n] (patch logits, flattened):

- `ProjectedDiscriminator`: GDD's own design (Projected GAN / StyleGAN-XL): frozen ImageNet feature
  networks, frozen random projections, small trainable heads. For the profiles with pretrained
  torchvision weights.
- `TeacherEncoderDiscriminator`: trainable heads on a frozen copy of the teacher UNet's encoder (the
  SiDA / DMD2 design, not GDD's). For offline profiles (the toy), where no ImageNet network exists.

Neither uses the evaluation feature network.
"""

import copy
import math

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from distillery.networks import UNetBlock, edm_scalings


def freeze(module):
    return module.eval().requires_grad_(False)


class PatchHead(nn.Module):
    """Trainable head on one feature map: 3×3 conv, GroupNorm, LeakyReLU, 1×1 conv; patch logits [B, H·W].

    With labels it is a projection discriminator: the 1×1 conv gives `cmap_dim` channels whose inner
    product with a learnt class embedding (scaled by 1/√cmap_dim) is the logit.
    """

    def __init__(self, in_channels, channels=64, label_dim=0, cmap_dim=64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.GroupNorm(math.gcd(channels, 8), channels),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, cmap_dim if label_dim else 1, 1),
        )
        self.embed = nn.Linear(label_dim, cmap_dim, bias=False) if label_dim else None

    def forward(self, x, class_labels=None):
        h = self.body(x)
        if self.embed is not None:
            cmap = self.embed(class_labels.to(h.dtype))
            h = (h * cmap[:, :, None, None]).sum(1) / math.sqrt(cmap.shape[1])
        return h.flatten(1)


class TeacherEncoderDiscriminator(nn.Module):
    """Heads on every resolution of a frozen copy of the teacher's SongUNet encoder and embedding MLP.

    The encoder sees the image as the teacher would at the fixed noise level `sigma` (input scaled by
    c_in(σ), embedding of c_noise(σ), class labels through the teacher's label map); no noise is added,
    so D is deterministic. One head per encoder resolution, on the last feature map of that resolution.
    """

    def __init__(self, teacher, sigma=0.2, channels=64, cmap_dim=64):
        super().__init__()
        unet = teacher.model
        self.sigma = float(sigma)
        self.sigma_data = teacher.sigma_data
        parts = {name: getattr(unet, name) for name in ("map_noise", "map_label", "map_layer0", "map_layer1", "enc")}
        self.encoder = freeze(copy.deepcopy(nn.ModuleDict({k: v for k, v in parts.items() if v is not None})))
        widths = {}
        for name, block in unet.enc.items():
            if "aux" not in name:
                widths[name.split("_")[0]] = block.out_channels
        self.heads = nn.ModuleDict({res: PatchHead(c, channels, teacher.label_dim, cmap_dim)
                                    for res, c in widths.items()})

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # frozen: dropout stays off
        return self

    def embedding(self, sigma, class_labels):
        """SongUNet's noise/label embedding, as in its forward pass."""
        enc = self.encoder
        _, _, _, c_noise = edm_scalings(sigma, self.sigma_data)
        emb = enc.map_noise(c_noise)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # SongUNet's sin/cos swap
        if "map_label" in enc:
            emb = emb + enc.map_label(class_labels.to(emb.dtype) * math.sqrt(enc.map_label.in_features))
        return F.silu(enc.map_layer1(F.silu(enc.map_layer0(emb))))

    def encode(self, x, emb):
        """SongUNet's encoder pass (with its skip/residual auxiliary paths); the last feature map per resolution."""
        features, aux = {}, x
        for name, block in self.encoder.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = x + block(aux)
            elif "aux_residual" in name:
                x = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            features[name.split("_")[0]] = x
        return features

    def forward(self, x, class_labels=None):
        sigma = torch.full([x.shape[0]], self.sigma, dtype=x.dtype, device=x.device)
        c_in = edm_scalings(sigma, self.sigma_data)[2]
        features = self.encode(c_in.reshape(-1, 1, 1, 1) * x, self.embedding(sigma, class_labels))
        return [head(features[res], class_labels) for res, head in self.heads.items()]


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# torchvision constructor, ends of the four stages of its `features` (strides 4, 8, 16, 32), their widths.
# EfficientNet-B0 stands in for GDD's EfficientNet-lite0 (timm, not in torchvision): same stage widths
# 24/40/112/320 and strides, but with squeeze-excitation and SiLU where lite0 has neither SE nor SiLU (ReLU6).
BACKBONES = {
    "vgg16_bn": (torchvision.models.vgg16_bn, (14, 24, 34, 44), (128, 256, 512, 512)),  # after max-pools 2–5
    "efficientnet_b0": (torchvision.models.efficientnet_b0, (3, 4, 6, 8), (24, 40, 112, 320)),
}


def backbone_stats(name, weights):
    """The input mean/std of the torchvision weights (ImageNet's for both backbones), ImageNet's without weights."""
    if weights is None:
        return IMAGENET_MEAN, IMAGENET_STD
    preset = torchvision.models.get_model_weights(name).verify(weights).transforms()
    return tuple(preset.mean), tuple(preset.std)


class FeatureProjector(nn.Module):
    """One frozen backbone cut into four stages, each followed by a frozen random 1×1 cross-channel
    projection to proj_channels·2^i channels; then a top-down cross-scale mix: each map plus the
    (frozen random 1×1-projected, bilinearly upsampled) mix of the next coarser one."""

    def __init__(self, name, weights=None, proj_channels=64):
        super().__init__()
        build, ends, widths = BACKBONES[name]
        features = build(weights=weights).features
        self.stages = nn.ModuleList(features[start:end] for start, end in zip((0,) + ends[:-1], ends))
        mean, std = backbone_stats(name, weights)
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1))
        self.out_channels = [proj_channels * 2 ** i for i in range(len(ends))]
        self.channel_proj = nn.ModuleList(nn.Conv2d(c, o, 1, bias=False) for c, o in zip(widths, self.out_channels))
        self.scale_proj = nn.ModuleList(nn.Conv2d(self.out_channels[i + 1], self.out_channels[i], 1, bias=False)
                                        for i in range(len(ends) - 1))
        for conv in [*self.channel_proj, *self.scale_proj]:
            nn.init.kaiming_normal_(conv.weight)
        freeze(self)

    def forward(self, x):
        """x: RGB in [0, 1]; returns the four mixed maps, finest first."""
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        projected = []
        for stage, proj in zip(self.stages, self.channel_proj):
            x = stage(x)
            projected.append(proj(x))
        mixed = [projected[-1]]
        for i in reversed(range(len(projected) - 1)):
            coarse = F.interpolate(self.scale_proj[i](mixed[0]), size=projected[i].shape[-2:], mode="bilinear",
                                   align_corners=False)
            mixed.insert(0, projected[i] + coarse)
        return mixed


class ProjectedDiscriminator(nn.Module):
    """GDD's Projected-GAN discriminator (§3.3): images in [−1, 1] mapped to [0, 1] (grey-scale repeated
    to RGB), bilinearly upsampled to `resolution` (224 in GDD), fed to frozen backbones with frozen
    random projections; one trainable PatchHead per backbone scale.

    `weights`: torchvision weights name for every backbone ("DEFAULT": ImageNet, fetched by
    torchvision's weights API on first use) or None (random, for tests). Class conditioning uses a
    learnt label embedding per head, where GDD indexes a table of ImageNet class embeddings.
    """

    def __init__(self, label_dim=0, backbones=("vgg16_bn", "efficientnet_b0"), weights="DEFAULT", resolution=224,
                 proj_channels=64, channels=64, cmap_dim=64):
        super().__init__()
        self.resolution = resolution
        self.projectors = nn.ModuleDict({name: FeatureProjector(name, weights, proj_channels) for name in backbones})
        self.heads = nn.ModuleList(PatchHead(c, channels, label_dim, cmap_dim)
                                   for projector in self.projectors.values() for c in projector.out_channels)

    def train(self, mode=True):
        super().train(mode)
        self.projectors.eval()  # frozen: batch-norm statistics fixed, stochastic depth off
        return self

    def forward(self, x, class_labels=None):
        x = (x + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        features = [f for projector in self.projectors.values() for f in projector(x)]
        return [head(f, class_labels) for head, f in zip(self.heads, features)]
