"""Every distillation method, registered once: its key in params.yaml, its display name, its settings
(the one place their defaults live) and its class; and the names of the FID feature extractors.

Torch-free, so that the params schema can read it without importing a network; the class is imported
when a run builds the method. Equations and sources of each setting: docs/methods.md §3.
"""

import math
from importlib import import_module
from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

Probability = Annotated[float, Field(ge=0, le=1)]
TMax = Annotated[float, Field(gt=0, le=1000)]
# Upper bounds, as for every number of params.yaml (pipeline/params.py): what a profile could ever need, with a wide
# margin, so that a typo is refused before any compute. The published values are in docs/methods.md §3.
Sigma = Annotated[float, Field(gt=0, le=1000)]  # a noise level: EDM's σ_max is 80
LogSigmaMean = Annotated[float, Field(ge=-10, le=10)]  # ln σ: e^±10 spans σ from 5e-5 to 2e4 (EDM: −1.2)
LogSigmaStd = Annotated[float, Field(gt=0, le=10)]  # EDM: 1.2
Scale = Annotated[float, Field(gt=0, le=1e6)]  # a loss or lr factor: SiD's loss_scale_g is 100
Weight = Annotated[float, Field(ge=0, le=1e6)]  # a loss weight or mixture weight (DMD2: 3e-3, 1e-2)
Steps = Annotated[int, Field(ge=1, le=1000)]  # sampling or rollout steps: EDM's samplers take 18–256
Channels = Annotated[int, Field(gt=0, le=4096)]  # the projected discriminator's widths: 64

# the projected discriminator's feature networks (distillery.discriminators.BACKBONES)
BACKBONES = ("vgg16_bn", "efficientnet_b0", "tf_efficientnet_lite0", "deit_base_distilled_patch16_224")

# the FID/IS/KID feature networks (distillery.extractors): the toy's digits classifier, torch-fidelity's Inception
DIGITS = "distillery-digits"
INCEPTION = "inception-v3-compat"
EXTRACTORS = (DIGITS, INCEPTION)
# torch-fidelity's release file of the TF Inception-v3 weights; the name carries the first 8 hex digits of the
# sha256 (torch.hub's convention)
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no inf or nan, as every section of params


class SiDSettings(Settings):
    """docs/methods.md §3.1."""

    alpha: Annotated[float, Field(ge=-10, le=10)] = 1.2  # SiD: 1.0 and 1.2
    sigma_init: Sigma = 2.5
    t_max: TMax = 800
    sigma_data: Sigma = 0.5
    P_mean: LogSigmaMean = -1.2
    P_std: LogSigmaStd = 1.2
    loss_scale_g: Scale = 100
    augment_p: Probability = 0.0  # EDM's augmentation of the fake-score loss (needs augment_dim 9)


class SIMSettings(Settings):
    """docs/methods.md §3.2. c and the time weighting w(σ) = σ^weight_power are not published for CIFAR-10:
    c = 0.4 puts the pseudo-Huber switch near σ ≈ 1 on the 8×8 toy (see distillery/methods/sim.py)."""

    sigma_init: Sigma = 2.5
    c: Annotated[float, Field(ge=0, le=1000)] = 0.4  # SIM: 2.8 at 32×32 and 64×64
    t_max: TMax = 800
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    sigma_data: Sigma = 0.5
    P_mean: LogSigmaMean = -1.2
    P_std: LogSigmaStd = 1.2
    loss_scale_g: Scale = 1
    weight_power: Annotated[float, Field(ge=0, le=10)] = 2  # σ^10 already spans 50 decades over EDM's σ range
    augment_p: Probability = 0.0

    @model_validator(mode="after")
    def huber_constant_positive(self):
        # d′(y) = y/√(‖y‖² + c²) is 0/0 at y = 0 when c = 0, and y is exactly 0 while the fake net equals the teacher
        if self.distance == "pseudo_huber" and not self.c > 0:
            raise ValueError(f"c must be positive for the pseudo-Huber distance, got {self.c}")
        return self


class DiffInstructSettings(Settings):
    """docs/methods.md §3.4 (σ_init = 1.0 as in the reference CIFAR-10 command)."""

    sigma_init: Sigma = 1.0
    sigma_data: Sigma = 0.5
    P_mean: LogSigmaMean = -1.2
    P_std: LogSigmaStd = 1.2
    loss_scale_g: Scale = 1
    augment_p: Probability = 0.0


class GDDSettings(Settings):
    """docs/methods.md §3.3. `teacher_encoder` is the offline discriminator (frozen teacher encoder + heads);
    `projected` is the paper's projected discriminator on ImageNet backbones (weights via torchvision / timm)."""

    discriminator: Literal["teacher_encoder", "projected"] = "teacher_encoder"
    # projected: GDD's CIFAR-10 pair; at 64×64 GDD uses [deit_base_distilled_patch16_224, tf_efficientnet_lite0]
    backbones: list[Literal[BACKBONES]] = Field(default=["vgg16_bn", "tf_efficientnet_lite0"], min_length=1)
    backbone_weights: Literal["DEFAULT"] | None = "DEFAULT"  # None: random backbones (timing, tests)
    resolution: Annotated[int, Field(gt=0, le=1024)] = 224  # the projected discriminator's input size
    proj_channels: Channels = 64
    head_channels: Channels = 64
    cmap_dim: Channels = 64
    sigma_init: Sigma = 80
    r1_gamma: Weight = 1e-4
    r1_interval: Annotated[int, Field(gt=0, le=10000)] = 16  # an R1 step every 16 iterations
    d_lr_scale: Scale = 1.0  # D lr / G lr before the lazy-regularisation correction
    encoder_sigma: Sigma = 0.2


class FewStepSettings(Settings):
    """What every K-step student has (docs/methods.md §3.8, §3.6); in the `fewstep` study `steps`, `ddil` and
    `reflect` come from the run (its K and variant)."""

    steps: Steps = 1  # K: the student's sampling steps
    # DDIL: the training states' mixture ∝ (β_data, β_teacher, β_student); None: the method's own states only
    ddil: tuple[Weight, Weight, Weight] | None = None
    reflect: bool = False  # clip the x̂ of rollouts and sampling to the data range [-1, 1]
    rollout_steps: Steps = 8  # Heun steps of the teacher's rollouts (DDIL's teacher states)

    @model_validator(mode="after")
    def ddil_has_weight(self):
        if self.ddil is not None and not sum(self.ddil) > 0:
            raise ValueError(f"ddil weights must not all be 0, got {self.ddil}")
        return self


class DMD2Settings(FewStepSettings):
    """docs/methods.md §3.5 (tianweiy/DMD2, EDM ImageNet-64 setting)."""

    sigma_init: Sigma = 80.0  # DMD2's conditioning_sigma: G(80·z; 80)
    sigma_data: Sigma = 0.5
    # the Karras grid both losses draw σ from (DMD2: 1000)
    num_train_timesteps: Annotated[int, Field(gt=1, le=100_000)] = 1000
    min_step_percent: Annotated[float, Field(ge=0, lt=1)] = 0.02  # the distribution-matching loss's σ range
    max_step_percent: Annotated[float, Field(gt=0, le=1)] = 0.98
    # fake-score updates per generator update (dfake_gen_update_ratio; DMD2: 5)
    fake_updates: Annotated[int, Field(ge=1, le=1000)] = 5
    # the GAN classifier on the fake score's bottleneck against real data (DMD2's ImageNet-64 run; off: its ablation)
    gan: bool = False
    gan_weight_g: Weight = 3e-3  # gen_cls_loss_weight
    gan_weight_d: Weight = 1e-2  # cls_loss_weight
    gan_max_step_percent: Annotated[float, Field(gt=0, le=1)] = 1.0  # diffusion GAN: σ index uniform below this


class CDSettings(FewStepSettings):
    """docs/methods.md §3.9 (Song et al. 2023, CIFAR-10: N = 18 levels, EMA target μ = 0.95)."""

    sigma_min: Sigma = 0.002
    sigma_max: Sigma = 80.0
    sigma_data: Sigma = 0.5
    rho: Annotated[float, Field(gt=0, le=100)] = 7.0  # EDM's schedule: 7
    # the discretisation σ_1 < … < σ_N of the teacher's ODE (CM: 18; iCT grows it to 1281)
    num_levels: Annotated[int, Field(ge=2, le=100_000)] = 18
    distance: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: Annotated[float, Field(gt=0, le=1000)] | None = None  # None: 0.00054·√d (iCT)
    target_ema: Annotated[float, Field(ge=0, lt=1)] = 0.95


class PDSettings(FewStepSettings):
    """docs/methods.md §3.10: rounds from `teacher_steps` DDIM steps down to `steps`, `round_kimg` each."""

    teacher_steps: Annotated[int, Field(ge=2, le=65536)] = 16  # PD starts from 1024 (ImageNet) or 8192 (CIFAR-10)
    round_kimg: Annotated[float, Field(gt=0, le=1e7)] = 10  # params.py's KIMG_MAX: 10 G images
    sigma_data: Sigma = 0.5
    sigma_init: Sigma = 80.0  # σ_max of the Karras grids

    @model_validator(mode="after")
    def halving_reaches_steps(self):
        ratio = self.teacher_steps / self.steps
        if ratio < 2 or ratio != 2 ** round(math.log2(ratio)):
            raise ValueError(f"teacher_steps / steps must be a power of 2 ≥ 2, got {self.teacher_steps}/{self.steps}")
        return self


class Method(NamedTuple):
    name: str  # the key in params.yaml (study.methods, its settings section)
    display: str  # the name in tables and figures
    settings: type[Settings]
    target: str  # "module:Class"

    def load(self):
        module, cls = self.target.split(":")
        return getattr(import_module(module), cls)

    def build(self, settings: Settings | None = None, **overrides):
        """The method object from settings (defaults when None), with optional overrides; the class validates them."""
        return self.load()(**{**(settings.model_dump() if settings else {}), **overrides})


METHODS = {
    m.name: m
    for m in [
        Method("sid", "SiD", SiDSettings, "distillery.methods.sid:SiD"),
        Method("sim", "SIM", SIMSettings, "distillery.methods.sim:SIM"),
        Method("diff_instruct", "Diff-Instruct", DiffInstructSettings, "distillery.methods.diff_instruct:DiffInstruct"),
        Method("gdd", "GDD", GDDSettings, "distillery.methods.gdd:GDD"),
        Method("gdd_i", "GDD-I", GDDSettings, "distillery.methods.gdd:GDDI"),
        Method("dmd2", "DMD2", DMD2Settings, "distillery.methods.dmd2:DMD2"),
        Method("cd", "CD", CDSettings, "distillery.methods.cd:ConsistencyDistillation"),
        Method("pd", "PD", PDSettings, "distillery.methods.pd:ProgressiveDistillation"),
    ]
}
