"""Discriminators for GAN distillation (GDD, docs/methods.md §3.3).

Both return a list of logit tensors, one per head, each [B, n] (patch logits, flattened):

- `ProjectedDiscriminator`: GDD's own design (Projected GAN / StyleGAN-XL): frozen ImageNet feature
  networks (torchvision or timm), frozen random projections, small trainable heads. For the profiles
  with pretrained weights.
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
        self.heads = nn.ModuleDict(
            {res: PatchHead(c, channels, teacher.label_dim, cmap_dim) for res, c in widths.items()}
        )

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
TORCHVISION = {
    "vgg16_bn": (torchvision.models.vgg16_bn, (14, 24, 34, 44), (128, 256, 512, 512)),  # after max-pools 2–5
    "efficientnet_b0": (torchvision.models.efficientnet_b0, (3, 4, 6, 8), (24, 40, 112, 320)),
}
# timm models of GDD's discriminator (§3.3): EfficientNet-lite0 (CIFAR-10 and 64×64) and DeiT-base (64×64).
TIMM = ("tf_efficientnet_lite0", "deit_base_distilled_patch16_224")
BACKBONES = (*TORCHVISION, *TIMM)


class TorchvisionBackbone(nn.Module):
    """The four stages of a torchvision CNN; "DEFAULT" weights are ImageNet's, fetched by torchvision."""

    def __init__(self, name, weights=None):
        super().__init__()
        build, ends, self.widths = TORCHVISION[name]
        features = build(weights=weights).features
        self.stages = nn.ModuleList(features[start:end] for start, end in zip((0,) + ends[:-1], ends))
        if weights is None:
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        else:
            preset = torchvision.models.get_model_weights(name).verify(weights).transforms()
            self.mean, self.std = tuple(preset.mean), tuple(preset.std)

    def forward(self, x):
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


class EfficientNetLite0(nn.Module):
    """timm's tf_efficientnet_lite0 cut after its stages at strides 4, 8, 16, 32 (24/40/112/320 channels)."""

    def __init__(self, weights=None):
        super().__init__()
        import timm

        self.net = timm.create_model(
            "tf_efficientnet_lite0", pretrained=weights is not None, features_only=True, out_indices=(1, 2, 3, 4)
        )
        self.widths = tuple(self.net.feature_info.channels())
        self.mean, self.std = self.net.pretrained_cfg["mean"], self.net.pretrained_cfg["std"]

    def forward(self, x):
        return self.net(x)


class DeiTBase(nn.Module):
    """timm's DeiT-base (distilled, patch 16) read out as in Projected GAN's ViT backbone: the patch tokens after
    blocks 3, 6, 9 and 12 as 14×14 maps (class and distillation tokens dropped), brought to four scales
    56/28/14/7 with 96/192/384/768 channels by 1×1 convs and (transposed) convs that are randomly initialised
    and stay frozen with the rest."""

    def __init__(self, weights=None):
        super().__init__()
        import timm

        self.net = timm.create_model("deit_base_distilled_patch16_224", pretrained=weights is not None)
        self.widths = (96, 192, 384, 768)
        dim = self.net.embed_dim
        self.readout = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(dim, 96, 1), nn.ConvTranspose2d(96, 96, 4, stride=4)),
                nn.Sequential(nn.Conv2d(dim, 192, 1), nn.ConvTranspose2d(192, 192, 2, stride=2)),
                nn.Conv2d(dim, 384, 1),
                nn.Sequential(nn.Conv2d(dim, 768, 1), nn.Conv2d(768, 768, 3, stride=2, padding=1)),
            ]
        )
        self.mean, self.std = self.net.pretrained_cfg["mean"], self.net.pretrained_cfg["std"]

    def forward(self, x):
        tokens = self.net.forward_intermediates(x, indices=[2, 5, 8, 11], output_fmt="NCHW", intermediates_only=True)
        return [readout(t) for readout, t in zip(self.readout, tokens)]


def backbone(name, weights):
    """A frozen-to-be feature network with `widths`, `mean`, `std` and forward(x) -> four maps, finest first.
    weights: "DEFAULT" (ImageNet: torchvision's weights API, or timm from the Hugging Face hub) or None."""
    if name in TORCHVISION:
        return TorchvisionBackbone(name, weights)
    return {"tf_efficientnet_lite0": EfficientNetLite0, "deit_base_distilled_patch16_224": DeiTBase}[name](weights)


class FeatureProjector(nn.Module):
    """One frozen backbone with Projected GAN's frozen random projections (§3.3: proj_type 2, 64 channels,
    "expand"): a 1×1 cross-channel mix (CCM) of each of the four maps to proj_channels·(1, 2, 4, 8), then a
    top-down cross-scale mix (CSM): from the coarsest map up, add the mix from below, upsample ×2 (bilinear,
    corners aligned) and mix by 1×1 to half the channels (not at the finest level). Outputs, finest first:
    proj_channels·(1, 1, 2, 4) channels at 2×, 1×, ½× and ¼× the size of the finest backbone map."""

    def __init__(self, name, weights=None, proj_channels=64):
        super().__init__()
        self.backbone = backbone(name, weights)
        self.register_buffer("mean", torch.tensor(self.backbone.mean).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.backbone.std).reshape(1, 3, 1, 1))
        mixed = [proj_channels * 2**i for i in range(4)]
        self.ccm = nn.ModuleList(nn.Conv2d(c, o, 1) for c, o in zip(self.backbone.widths, mixed))
        self.out_channels = [mixed[0], *mixed[:3]]
        self.csm = nn.ModuleList(nn.Conv2d(c, o, 1) for c, o in zip(mixed, self.out_channels))
        freeze(self)

    def forward(self, x):
        """x: RGB in [0, 1]; returns the four mixed maps, finest first."""
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        channel_mixed = [ccm(f) for ccm, f in zip(self.ccm, self.backbone(x))]
        out, below = [None] * 4, None
        for i in reversed(range(4)):
            h = channel_mixed[i] if below is None else channel_mixed[i] + below
            h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)
            out[i] = below = self.csm[i](h)
        return out


def sn(module):
    return nn.utils.parametrizations.spectral_norm(module)


class MiniDiscriminator(nn.Module):
    """GDD's per-scale discriminator (Projected GAN's SingleDisc): spectrally normalised 4×4 stride-2 convs with
    batch norm and LeakyReLU(0.2) down to 8×8 (or the coarsest map's size), then a 4×4 conv to patch logits.
    Channels follow the input's nominal size (the nearest power of two): 64 at 64, 128 at 32, 256 at 16, 512 at
    8. With labels, the last conv gives cmap_dim channels projected onto a class embedding (/√cmap_dim)."""

    WIDTHS = {1: 2048, 2: 1024, 4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}

    def __init__(self, in_channels, size, end_size, label_dim=0, cmap_dim=64):
        super().__init__()
        size = min(self.WIDTHS, key=lambda s: abs(s - size))
        widths = {**self.WIDTHS, size: in_channels}
        blocks = []
        while size > end_size:
            blocks += [
                sn(nn.Conv2d(widths[size], widths[size // 2], 4, 2, 1)),
                nn.BatchNorm2d(widths[size // 2]),
                nn.LeakyReLU(0.2),
            ]
            size //= 2
        kernel = 4 if end_size >= 8 else max(1, end_size // 2)
        self.main = nn.Sequential(*blocks)
        self.out = sn(nn.Conv2d(widths[end_size], cmap_dim if label_dim else 1, kernel, bias=False))
        self.embed = nn.Sequential(nn.Linear(label_dim, cmap_dim), nn.LeakyReLU(0.2)) if label_dim else None

    def forward(self, x, class_labels=None):
        h = self.out(self.main(x))
        if self.embed is not None:
            cmap = self.embed(class_labels.to(h.dtype))
            h = (h * cmap[:, :, None, None]).sum(1) / math.sqrt(cmap.shape[1])
        return h.flatten(1)


class ProjectedDiscriminator(nn.Module):
    """GDD's Projected-GAN discriminator (§3.3): images in [−1, 1] mapped to [0, 1] (grey-scale repeated
    to RGB), bilinearly resized to `resolution` (224 in GDD), fed to frozen backbones with frozen random
    projections; one trainable MiniDiscriminator per backbone scale, logits [B, patches] each.

    `backbones`: GDD's are VGG16-BN + EfficientNet-lite0 on CIFAR-10 and DeiT-base + EfficientNet-lite0 at
    64×64; `weights`: "DEFAULT" (ImageNet, fetched by torchvision or timm on first use) or None (random, for
    tests). Class conditioning learns its class embedding, where GDD indexes a pretrained table of ImageNet
    class embeddings (reusing ImageNet classes 0–9 for CIFAR-10).
    """

    def __init__(
        self,
        label_dim=0,
        backbones=("vgg16_bn", "tf_efficientnet_lite0"),
        weights="DEFAULT",
        resolution=224,
        proj_channels=64,
        cmap_dim=64,
    ):
        super().__init__()
        self.resolution = resolution
        self.projectors = nn.ModuleDict({name: FeatureProjector(name, weights, proj_channels) for name in backbones})
        with torch.no_grad():  # the heads are sized by the maps of one probe image
            probe = torch.zeros(1, 3, resolution, resolution)
            sizes = {name: [f.shape[-1] for f in projector(probe)] for name, projector in self.projectors.items()}
        self.heads = nn.ModuleList(
            MiniDiscriminator(c, size, end_size=min(8, sizes[name][-1]), label_dim=label_dim, cmap_dim=cmap_dim)
            for name, projector in self.projectors.items()
            for c, size in zip(projector.out_channels, sizes[name])
        )

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
