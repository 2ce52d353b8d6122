"""The schema of params.yaml: one place for defaults and validation.

Every stage and every CLI command loads params through `load_params`, so a bad key, type or
value is refused before any compute, with the offending key named.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, SequenceNode

from pipeline.preference_params import PreferenceParams

from distillery.registry import (
    DIGITS,
    EXTRACTORS,
    INCEPTION,
    INCEPTION_SHA256,
    INCEPTION_URL,
    METHODS,
    FewStepSettings,
    LogSigmaMean,
    LogSigmaStd,
    Weight,
)

Fraction = Annotated[float, Field(ge=0, lt=1)]

# Every number has an upper bound: what a profile could ever need, with a wide margin, so that a typo (1e12 kimg, a
# batch of 10⁹) is refused before any compute rather than running for years or failing to allocate. The error
# names the bound; docs/methods.md has the published settings the margins are taken from.
KIMG_MAX = 1e7  # 10 G images: 4× EDM's ImageNet-64 teacher (2.5 Gimg), 10× SiD's ImageNet-64 run (1 Gimg)
BATCH_MAX = 65536  # 8× the largest published batch (SiD on ImageNet-64: 8192)
LR_MAX = 1e4  # far above any rate that trains: the fault tests run 10 and 1e3 on purpose, to see divergence caught
SAMPLES_MAX = 10**6  # images in one sample set: 20× FID's 50,000 (12 GB of uint8 at 64×64 RGB)
SEED_MAX = 2**31 - 1  # training seeds its shard streams with seed·1,000,003 + k: stays within torch's 64 bits
RESOLUTION_MAX = 1024  # 16× the largest profile's 64×64 images
CHANNELS_MAX = 1024  # 5× ADM's ImageNet-64 width (192)

Kimg = Annotated[float, Field(gt=0, le=KIMG_MAX)]
KimgOrZero = Annotated[float, Field(ge=0, le=KIMG_MAX)]
Duration = Annotated[float, Field(ge=0.001, le=KIMG_MAX)]  # at least one image: below it a run would train no step
Batch = Annotated[int, Field(gt=0, le=BATCH_MAX)]
Rate = Annotated[float, Field(gt=0, le=LR_MAX)]
Samples = Annotated[int, Field(ge=2, le=SAMPLES_MAX)]  # FID's covariance and KID's pairs need two samples
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Keep = Annotated[int, Field(ge=1, le=100)]  # checkpoints on disk: each is a full training state
Steps = Annotated[int, Field(ge=0, le=10**7)]  # a count of training steps: 10⁷ steps of batch 1000 are 10 Gimg

MethodName = Literal[tuple(METHODS)]
FewStepName = Literal[tuple(name for name, m in METHODS.items() if issubclass(m.settings, FewStepSettings))]


class Section(BaseModel):
    # no inf or nan anywhere, whatever a field's bounds (inf passes `gt=0`): they would fail only while running
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
PathText = Annotated[str, Field(pattern=r"^[^\x00]+$")]  # a file name the OS takes: not empty, no NUL


def absolute(value):
    if not Path(value).is_absolute():
        raise ValueError("must be an absolute path: a folder outside the repository (relative paths are inside it)")
    return value


DataRoot = Annotated[PathText, AfterValidator(absolute)]


class Download(Section):
    """A file fetched over HTTP(S), verified against `sha256`. Without a pin, the first download records
    its hash in downloads.lock.json and later runs verify against it."""

    url: Annotated[str, Field(pattern=r"^https?://\S+$")]
    sha256: Sha256 | None = None


class DataParams(Section):
    """sklearn-digits: bundled 8×8 digits; cifar10: torchvision's download; edm-zip: a data set zip in the format of
    EDM's dataset_tool.py (FFHQ, AFHQv2, ImageNet at 64×64), from `path` or a pinned `download`."""

    source: Literal["sklearn-digits", "cifar10", "edm-zip"] = "sklearn-digits"
    path: PathText | None = None  # inside the repository or under a `data_roots` entry (PATHS)
    sha256: Sha256 | None = None  # pin for `path`: checked on read, and a new pin reruns the DAG (DVC sees params only)
    download: Download | None = None
    resolution: Annotated[int, Field(gt=0, le=RESOLUTION_MAX)] | None = None  # edm-zip: checked when the zip is read

    @model_validator(mode="after")
    def zip_given(self):
        if self.source == "edm-zip" and (self.path is None) == (self.download is None):
            raise ValueError("data.source edm-zip needs exactly one of data.path or data.download")
        if self.source == "edm-zip" and self.resolution is None:
            raise ValueError("data.resolution is required when data.source is edm-zip")
        return self

    def shape(self):
        """(resolution, channels) of the images, known before the data are read."""
        return {"sklearn-digits": (8, 1), "cifar10": (32, 3)}.get(self.source, (self.resolution, 3))


class NetworkParams(Section):
    arch: Literal["ddpmpp", "ncsnpp", "adm"] = "ddpmpp"  # SongUNet DDPM++ / NCSN++, or DhariwalUNet (ImageNet-64)
    model_channels: Annotated[int, Field(gt=0, le=CHANNELS_MAX)] = 32
    # per level; EDM and ADM use at most 4, and 1024 px (RESOLUTION_MAX) can halve only 10 times
    channel_mult: list[Annotated[int, Field(gt=0, le=16)]] = Field(default=[1, 2], min_length=1, max_length=11)
    channel_mult_emb: Annotated[int, Field(gt=0, le=16)] = 4  # EDM and ADM: 4
    num_blocks: Annotated[int, Field(gt=0, le=16)] = 2  # per level; EDM: 4, ADM: 3
    attn_resolutions: list[Annotated[int, Field(gt=0, le=RESOLUTION_MAX)]] = [4]
    dropout: Fraction = 0.0
    augment_dim: Annotated[int, Field(ge=0, le=9)] = 0  # EDM's augment labels: 9
    label_conditional: bool = False

    def check_shape(self, resolution, images):
        """Refuse a network the image size cannot go through: each level after the first halves it. `images` says
        where the resolution comes from (the data params)."""
        levels = [resolution >> i for i in range(len(self.channel_mult))]
        if resolution % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(
                f"teacher.network.channel_mult has {len(self.channel_mult)} levels: the resolution {resolution} "
                f"({images}) must be divisible by 2^{len(self.channel_mult) - 1} (use at most "
                f"{(resolution & -resolution).bit_length()} levels)"
            )
        stray = sorted(set(self.attn_resolutions) - set(levels))
        if stray:
            raise ValueError(
                f"teacher.network.attn_resolutions {stray} match no level of this {resolution}×{resolution} network "
                f"(levels {levels} of teacher.network.channel_mult {self.channel_mult} on the images of {images}): "
                f"no attention would be built there"
            )


class TeacherParams(Section):
    source: Literal["train", "url"] = "train"  # url: an official EDM pickle, converted without running its code
    download: Download | None = None
    network: NetworkParams = NetworkParams()
    batch: Batch = 128
    lr: Rate = 1e-3
    lr_rampup_kimg: KimgOrZero = 5
    duration_kimg: Duration = 100
    ema_halflife_kimg: Kimg = 5
    ema_rampup_ratio: Annotated[float, Field(ge=0, le=1)] = 0.05
    checkpoint_kimg: Kimg = 20
    checkpoint_keep: Keep = 2  # the newest checkpoints kept on disk (an older one is the fallback)
    P_mean: LogSigmaMean = -1.2
    P_std: LogSigmaStd = 1.2
    # EDM's non-leaking augmentation of the training images (train.py --augment; 0.12 on CIFAR-10): its 9 labels
    # condition the network's augment map (network.augment_dim 9)
    augment_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    # steps with a NaN/Inf loss or gradient tolerated before the run stops as diverged (docs/methods.md §3.12)
    nonfinite_limit: Steps = 10

    @model_validator(mode="after")
    def download_given(self):
        if self.source == "url" and self.download is None:
            raise ValueError("teacher.download (url, sha256) is required when teacher.source is url")
        return self

    @model_validator(mode="after")
    def augmentation_matches_network(self):
        if self.source != "train":
            return self
        dim, p = self.network.augment_dim, self.augment_p
        if dim not in (0, 9):
            raise ValueError(f"teacher.network.augment_dim must be 0 or 9 (EDM's augment labels), got {dim}")
        if dim and not p:
            raise ValueError(
                "teacher.network.augment_dim 9 with teacher.augment_p 0: the augment map would never train; "
                "set teacher.augment_p (EDM: 0.12 on CIFAR-10) or augment_dim 0"
            )
        if p and not dim:
            raise ValueError("teacher.augment_p > 0 needs teacher.network.augment_dim 9 (the augment labels)")
        return self


class FeaturesParams(Section):
    epochs: Annotated[int, Field(gt=0, le=10000)] = 30  # the digits classifier converges in 30
    batch: Batch = 64
    lr: Rate = 2e-3


class FeatureWeights(Section):
    """The Inception weights file, pinned: downloaded from `url` or read from a local `path` (a copy of the
    download, for machines offline), either way checked against `sha256` before it is read."""

    url: Annotated[str, Field(pattern=r"^https?://\S+$")] | None = None
    path: PathText | None = None  # inside the repository or under a `data_roots` entry (PATHS)
    sha256: Sha256

    @model_validator(mode="after")
    def one_source(self):
        if (self.url is None) == (self.path is None):
            raise ValueError("give exactly one of url or path")
        if self.path is not None and not Path(self.path).is_file():
            raise ValueError(f"path {self.path!r}: no such file (relative paths are from the repository root)")
        return self


# torch-fidelity's release of the TF Inception-v3 weights, pinned (distillery/extractors.py)
INCEPTION_WEIGHTS = FeatureWeights(url=INCEPTION_URL, sha256=INCEPTION_SHA256)


class EvaluationParams(Section):
    # FID features: the toy digits classifier (sklearn-digits only), or torch-fidelity's Inception port with
    # pinned weights (`feature_weights`; unset: torch-fidelity's release file); the reference is the data set's
    # own statistics or a published EDM npz of Inception statistics (`reference_download`)
    feature_extractor: Literal[EXTRACTORS] = DIGITS
    feature_weights: FeatureWeights | None = None
    reference: Literal["data", "edm-npz"] = "data"
    reference_download: Download | None = None
    num_samples: Samples = 2000
    # docs/methods.md §2.1: trial k uses seeds [k·N, (k+1)·N); EDM reports the min of 3, SiD the mean ± std of 10
    fid_trials: Annotated[int, Field(gt=0, le=100)] = 1
    fid_aggregate: Literal["min", "mean"] = "min"
    batch: Batch = 500
    teacher_steps: Annotated[int, Field(ge=2, le=1000)] = 18  # EDM: 18 (CIFAR-10), 40 (64×64), 256 (stochastic)
    kid_subset_size: Samples = 500  # cut to the set sizes when larger
    kid_subsets: Annotated[int, Field(gt=0, le=10000)] = 50  # torch-fidelity's default: 100
    is_splits: Annotated[int, Field(gt=0, le=1000)] = 10  # the IS protocol: 10
    grid_size: Annotated[int, Field(gt=0, le=64)] = 8  # a grid_size × grid_size tile of samples

    @model_validator(mode="after")
    def reference_download_given(self):
        if self.reference == "edm-npz" and self.reference_download is None:
            raise ValueError("evaluation.reference_download is required when evaluation.reference is edm-npz")
        if self.reference == "edm-npz" and self.feature_extractor != INCEPTION:
            raise ValueError(f"evaluation.reference edm-npz holds Inception statistics: it needs {INCEPTION} features")
        if self.feature_extractor == DIGITS and self.feature_weights is not None:
            raise ValueError(f"evaluation.feature_weights is for {INCEPTION}; {DIGITS} is trained by the pipeline")
        if self.is_splits > self.num_samples:
            raise ValueError(
                f"evaluation.is_splits {self.is_splits} is more than evaluation.num_samples {self.num_samples}: "
                f"each Inception Score split needs images"
            )
        return self

    def weights(self):
        """The pinned Inception weights: `feature_weights`, or torch-fidelity's release file."""
        return self.feature_weights or INCEPTION_WEIGHTS


# a learning rate as written: DVC names a run's stages after this text (distill@sid-3e-4)
DECIMAL = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def positive_decimal(value):
    """A learning rate: a string holding a positive decimal or scientific number ("3e-4", "0.0003"), ≤ LR_MAX."""
    if not re.fullmatch(DECIMAL, value):
        raise ValueError('expected a number written as a decimal string, like "3e-4" or "0.0003"')
    if not float(value) > 0:
        raise ValueError("must be > 0")
    if not float(value) <= LR_MAX:  # also "1e999", which float() reads as inf
        raise ValueError(f"must be ≤ {LR_MAX:g}")
    return value


# strict: a YAML number is refused (parse_params says how to write it), never turned into text
LearningRate = Annotated[str, Field(strict=True), AfterValidator(positive_decimal)]


def unique(values):
    if len(set(values)) != len(values):
        raise ValueError(f"entries must be unique, got {values}")
    return values


def unique_rates(values):
    unique([float(v) for v in values])
    return values


class MethodRates(Section):
    """One method's learning rates, in place of its study's `lrs`."""

    lrs: list[LearningRate] = Field(min_length=1)

    _unique = field_validator("lrs")(unique_rates)


def methods_of_study(per_method, info):
    """A `per_method` entry must name a method of the study it overrides."""
    methods = info.data.get("methods")
    stray = [m for m in per_method if methods is not None and m not in methods]
    if stray:
        raise ValueError(
            f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} not in methods ({', '.join(methods)}): "
            f"per_method gives a method of the study its own lrs"
        )
    return per_method


class StudyParams(Section):
    methods: list[MethodName] = Field(default=["sid"], min_length=1)
    # kept as written: DVC names the stages after the text (distill@sid-1e-4)
    lrs: list[LearningRate] = Field(default=["1e-4", "3e-5"], min_length=1)
    per_method: dict[MethodName, MethodRates] = {}  # a method's own lrs, in place of `lrs`

    _unique = field_validator("methods")(unique)
    _unique_lrs = field_validator("lrs")(unique_rates)
    _per_method = field_validator("per_method")(methods_of_study)

    def lrs_of(self, method):
        """The learning rates `method` is studied at: its own `per_method` list, or `lrs`."""
        return self.per_method[method].lrs if method in self.per_method else self.lrs


class FewStepParams(Section):
    """The few-step study (docs/methods.md §3.6, §3.8): one run per method × lr × K × variant. `plain` trains on the
    method's own states (DMD2: backward simulation; CD, PD: the forward-diffused data); `ddil` on DDIL's mixture
    ∝ `ddil` (β_data, β_teacher, β_student), reflected when `reflect`. Empty `methods`: no few-step runs."""

    methods: list[FewStepName] = []
    lrs: list[LearningRate] = Field(default=["1e-4"], min_length=1)
    per_method: dict[FewStepName, MethodRates] = {}  # a method's own lrs, in place of `lrs`
    # K: DMD2 and CD publish up to 4; more student steps than a teacher sampler takes would gain nothing
    steps: list[Annotated[int, Field(gt=0, le=1000)]] = Field(default=[1, 2, 4], min_length=1)
    variants: list[Literal["plain", "ddil"]] = Field(default=["plain", "ddil"], min_length=1)
    ddil: tuple[Weight, Weight, Weight] = (1.0, 1.0, 1.0)  # unpublished: equal weights are ours
    reflect: bool = True

    _unique = field_validator("methods", "steps", "variants")(unique)
    _unique_lrs = field_validator("lrs")(unique_rates)
    _per_method = field_validator("per_method")(methods_of_study)

    lrs_of = StudyParams.lrs_of

    @field_validator("ddil")
    @classmethod
    def some_weight(cls, values):
        if not sum(values) > 0:
            raise ValueError(f"the weights must not all be 0, got {values}")
        return values


class Run(NamedTuple):
    """One distillation run: `name` is its DVC matrix suffix (distill@sid-3e-4, distill_fewstep@cd-1e-4-2-ddil)."""

    method: str
    lr: float
    name: str
    lr_text: str  # as written in params.yaml
    steps: int | None = None  # few-step runs: K and the training states' variant
    variant: str | None = None


Betas = tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]]
AdamEps = Annotated[float, Field(gt=0, le=1)]  # published: 1e-8; above 1 it would swamp every gradient


class MethodTraining(Section):
    """One method's departures from the common `distill` settings (docs/methods.md §3: GDD's 5 Mimg, SiD's
    ImageNet-64 batch 8192 and 2 Mimg EMA, SiD's FFHQ-64 generator β₁ = 0.9); unset keys keep the common value."""

    batch: Batch | None = None
    shards: Batch | None = None
    duration_kimg: Duration | None = None
    adam_betas: Betas | None = None
    generator_adam_betas: Betas | None = None  # the generator's own betas where they differ from the auxiliary net's
    adam_eps: AdamEps | None = None
    ema_halflife_kimg: Kimg | None = None
    ema_rampup_ratio: Annotated[float, Field(ge=0, le=1)] | None = None


class DistillParams(Section):
    batch: Batch = 128
    shards: Batch = 1  # micro-batches of the global batch, each with its own RNG stream (DDP ranks share them)
    duration_kimg: Duration = 80
    adam_betas: Betas = (0.0, 0.999)
    generator_adam_betas: Betas | None = None  # None: the generator uses adam_betas too
    adam_eps: AdamEps = 1e-8
    ema_halflife_kimg: Kimg = 2
    ema_rampup_ratio: Annotated[float, Field(ge=0, le=1)] = 0.05
    checkpoint_kimg: Kimg = 5
    checkpoint_keep: Keep = 2  # the newest checkpoints kept on disk (an older one is the fallback)
    monitor_kimg: Kimg = 2
    monitor_samples: Samples = 500
    # steps with a NaN/Inf loss or gradient tolerated before a run stops as diverged (docs/methods.md §3.12)
    nonfinite_limit: Steps = 10
    per_method: dict[MethodName, MethodTraining] = {}

    def for_method(self, method) -> DistillParams:
        """The settings `method` trains with: the common ones, overridden by `per_method[method]`."""
        overrides = self.per_method.get(method, MethodTraining()).model_dump(exclude_none=True)
        return DistillParams.model_validate({**self.model_dump(), **overrides, "per_method": {}})

    @model_validator(mode="after")
    def shards_divide_batch(self):
        for method, override in {None: MethodTraining(), **self.per_method}.items():
            batch, shards = override.batch or self.batch, override.shards or self.shards
            if batch % shards:
                own = f"distill.per_method.{method}"
                batch_key = f"{own}.batch" if override.batch else "distill.batch"
                shards_key = f"{own}.shards" if override.shards else "distill.shards"
                runs = f" ({method}'s runs)" if method else ""
                raise ValueError(f"{batch_key} {batch} is not divisible by {shards_key} {shards}{runs}")
        return self


class ReportParams(Section):
    # final FID above this × best FID marks a run diverged (any factor beyond 10⁶ would never mark one)
    diverged_factor: Annotated[float, Field(gt=1, le=1e6)] = 3.0


# one section per registered method, named by its key (sid, sim, …), holding its settings
MethodSections = create_model(
    "MethodSections", __base__=Section, **{name: (m.settings, m.settings()) for name, m in METHODS.items()}
)


class Params(MethodSections):
    # names the MLflow experiment (distillery-<profile>) and the report
    profile: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)] = "toy"
    seed: Seed = 0
    # folders outside the repository that params may name read-only inputs in (a data set on a shared disk): PATHS
    data_roots: list[DataRoot] = []
    data: DataParams = DataParams()
    teacher: TeacherParams = TeacherParams()
    features: FeaturesParams = FeaturesParams()
    evaluation: EvaluationParams = EvaluationParams()
    study: StudyParams = StudyParams()
    fewstep: FewStepParams = FewStepParams()
    distill: DistillParams = DistillParams()
    report: ReportParams = ReportParams()
    preference: PreferenceParams = PreferenceParams()

    @model_validator(mode="after")
    def network_fits_images(self):
        d = self.data
        images = f"data.source {d.source}" if d.resolution is None else f"data.resolution {d.resolution}"
        self.teacher.network.check_shape(d.shape()[0], images)
        return self

    @model_validator(mode="after")
    def extractor_fits_data(self):
        e = self.evaluation
        if e.feature_extractor == DIGITS and self.data.source != "sklearn-digits":
            raise ValueError(
                f"evaluation.feature_extractor {DIGITS} is a classifier of scikit-learn's digits and measures "
                f"nothing on {self.data.source} images; choose {INCEPTION} (choices: {', '.join(EXTRACTORS)})"
            )
        channels = self.data.shape()[1]
        if e.feature_extractor == INCEPTION and channels != 3:
            raise ValueError(
                f"evaluation.feature_extractor {INCEPTION} needs RGB images, and {self.data.source} has "
                f"{channels} channel"
            )
        return self

    @model_validator(mode="after")
    def augmentation_has_labels(self):
        # the augment labels feed the teacher's map_augment: EDM's 9-label layout (distillery/augment.py)
        for m in self.study.methods:
            if getattr(getattr(self, m), "augment_p", 0) > 0 and self.teacher.network.augment_dim != 9:
                raise ValueError(
                    f"{m}.augment_p > 0 needs a teacher with EDM's augment labels "
                    f"(teacher.network.augment_dim 9, got {self.teacher.network.augment_dim})"
                )
        return self

    @model_validator(mode="after")
    def fewstep_settings_valid(self):
        # every K × variant must make a valid method (PD: teacher_steps / K a power of 2) before any run starts
        for run in self.runs():
            if run.steps is not None:
                try:
                    METHODS[run.method].settings(**self.settings(run))
                except ValidationError as e:
                    raise ValueError(
                        f"fewstep.steps: run {run.name} is refused by the {run.method} section: "
                        f"{e.errors()[0]['msg'].removeprefix('Value error, ')}"
                    ) from None
        return self

    @model_validator(mode="after")
    def preference_items_have_seeds(self):
        # a study's items and checks are drawn from the seeds both sample sets hold: num_samples per run
        p, n = self.preference, self.evaluation.num_samples
        if p.items + p.attention_checks > n:
            raise ValueError(
                f"preference.items {p.items} + preference.attention_checks {p.attention_checks} need as many seeds, "
                f"but each sample set holds evaluation.num_samples {n}"
            )
        return self

    def settings(self, run):
        """The method settings of `run`: its section, with a few-step run's K and variant."""
        settings = getattr(self, run.method).model_dump()
        if run.steps is not None:
            ddil = run.variant == "ddil"
            settings.update(
                steps=run.steps, ddil=self.fewstep.ddil if ddil else None, reflect=ddil and self.fewstep.reflect
            )
        return settings

    def method(self, run):
        """The method object of `run` (a Run or a method's name), built from its settings."""
        if isinstance(run, str):
            return METHODS[run].build(getattr(self, run))
        return METHODS[run.method].build(**self.settings(run))

    def runs(self):
        """Every distillation run: each study method × its lrs, then each few-step method × its lrs × K × variant."""
        s, f = self.study, self.fewstep
        study = [Run(m, float(lr), f"{m}-{lr}", lr) for m in s.methods for lr in s.lrs_of(m)]
        fewstep = [
            Run(m, float(lr), f"{m}-{lr}-{k}-{v}", lr, k, v)
            for m in f.methods
            for lr in f.lrs_of(m)
            for k in f.steps
            for v in f.variants
        ]
        return study + fewstep


class ParamsError(Exception):
    pass


def invalid(source, lines):
    """The one error of a refused params file: a header, then one line per problem naming its dotted key (a
    character of a value that would break or hide the line, a control character, is shown escaped)."""
    lines = ["".join(c if c.isprintable() else repr(c)[1:-1] for c in line) for line in lines]
    return ParamsError("\n".join([f"{source}: invalid parameters", *lines]))


# a check of several keys names the key it is about first: "teacher.network.augment_dim 9 with …"
NAMED = re.compile(r"([A-Za-z_]\w*(?:\.\w+)+):? (.*)", re.DOTALL)


def format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"] if p != "[key]")  # a bad dict key names itself
        msg = e["msg"].removeprefix("Value error, ")
        named = NAMED.fullmatch(msg)
        if named and (not key or named[1].startswith(f"{key}.")):
            key, msg = named[1], named[2]
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        lines.append(f"  {key or '(top level)'}: {msg}{got}")
    return str(invalid(source, lines))


def number_text(number):
    """A number YAML read, as short as `:g` writes it (1e-05 -> 1e-5)."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{number:g}") if isinstance(number, float) else str(number)


def first(values, default):
    return values[0] if isinstance(values, list) and values else default


def learning_rate_lists(raw):
    """(key path, list as read, the runs it names) of every learning-rate list in `raw`: each study's `lrs` and
    `per_method.<method>.lrs`; the runs as `<method>-{}` (study) or `<method>-{}-<K>-<variant>` (fewstep)."""
    for section in ("study", "fewstep"):
        study = raw.get(section)
        if not isinstance(study, dict):
            continue
        suffix = (
            f"-{first(study.get('steps'), 1)}-{first(study.get('variants'), 'plain')}" if section == "fewstep" else ""
        )
        yield (section, "lrs"), study.get("lrs"), f"{first(study.get('methods'), '<method>')}-{{}}{suffix}"
        per_method = study.get("per_method")
        for method, entry in per_method.items() if isinstance(per_method, dict) else []:
            if isinstance(entry, dict):
                yield (section, "per_method", method, "lrs"), entry.get("lrs"), f"{method}-{{}}{suffix}"


def unquoted_learning_rates(raw, written=None):
    """Error lines for learning rates YAML read as numbers: DVC would name their runs after the number
    (sid-0.0001), not after the text (sid-1e-4). `written`: {key path: text} of the numbers as the file writes
    them (load_params reads it from the YAML nodes); without it, a number is shown as `:g` writes it."""
    lines = []
    for path, lrs, runs in learning_rate_lists(raw if isinstance(raw, dict) else {}):
        if not isinstance(lrs, list):
            continue
        numbers = [i for i, v in enumerate(lrs) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not numbers:
            continue
        texts = [((written or {}).get((*path, i)) or number_text(v)) if i in numbers else v for i, v in enumerate(lrs)]
        n = numbers[0]
        lines.append(
            f"  {'.'.join(map(str, path))}: write learning rates quoted, as written: {json.dumps(texts)} (an unquoted "
            f"{texts[n]} is read as the number {lrs[n]} and would name the runs {runs.format(lrs[n])})"
        )
    return lines


def parse_params(raw: dict, source: str = "params.yaml", written=None) -> Params:
    """`raw` checked against the schema (a fragment takes the schema's defaults; load_params reads whole files)."""
    unquoted = unquoted_learning_rates(raw, written)
    if unquoted:
        raise invalid(source, unquoted)
    try:
        return Params.model_validate(raw or {})
    except ValidationError as e:
        raise ParamsError(format_errors(e, source)) from None


def missing_sections(raw):
    """Lines for each top-level key the file lacks: every section a stage reads, and the settings of each method a
    study names. A stage never runs on a default section the file did not choose (a deleted `teacher:` would
    otherwise train the schema's 100-kimg teacher)."""
    lines = [
        f"  {key}: missing section: write it out (every stage reads its params from the file, none from a default)"
        for key in Params.model_fields
        if key not in METHODS and key != "data_roots" and key not in raw
    ]
    for study in ("study", "fewstep"):
        methods = raw.get(study, {}).get("methods") if isinstance(raw.get(study), dict) else None
        named = [m for m in methods if isinstance(m, str) and m in METHODS] if isinstance(methods, list) else []
        for m in dict.fromkeys(named):
            if m not in raw:
                lines.append(f"  {m}: missing section: {study}.methods names {m}, so its settings must be written out")
    return lines


# every params value that names a file or folder, and whether it is only read (an input may also lie under a
# `data_roots` entry) or written to (always inside the repository: a study's folder is replaced whole)
PATHS = {
    ("data", "path"): "input",
    ("evaluation", "feature_weights", "path"): "input",
    ("preference", "samples_dir"): "input",
    ("preference", "output_dir"): "output",
    ("preference", "votes_dir"): "output",
}


def path_problems(params, root):
    """Lines for each path of PATHS outside the repository `root` (and, for inputs, outside every data root), after
    resolving symlinks and `..`; relative paths are from `root`."""
    root = Path(root).resolve()
    roots = [Path(r).resolve() for r in params.data_roots]
    lines = []
    for keys, kind in PATHS.items():
        value = params
        for k in keys:
            value = getattr(value, k) if value is not None else None
        if value is None:
            continue
        where = (root / value).resolve()
        if where.is_relative_to(root) or (kind == "input" and any(where.is_relative_to(r) for r in roots)):
            continue
        allowed = "inside the repository or under a data_roots entry" if kind == "input" else "inside the repository"
        lines.append(f"  {'.'.join(keys)}: {value!r} is {where}, outside {root}: an {kind} path must be {allowed}")
    return lines


def pair_problems(params, root):
    """Lines for preference pairs that name a sample set no stage makes (the teacher's, each run's) and that is not
    in `samples_dir` either (the samples of a run the study no longer has stay usable while they are there)."""
    made = ["teacher", *(run.name for run in params.runs())]
    samples = Path(params.preference.samples_dir)
    return [
        f"  preference.pairs.{i}.{side}: {name!r} names no sample set the DAG makes: the teacher's or a run's of "
        f"study.methods × study.lrs or fewstep.methods × fewstep.lrs × fewstep.steps × fewstep.variants (each "
        f"method's own lrs from per_method): {', '.join(made)}; nor is {samples / name}.npz there"
        for i, pair in enumerate(params.preference.pairs)
        for side, name in (("a", pair.a), ("b", pair.b))
        if name not in made and not (Path(root) / samples / f"{name}.npz").is_file()
    ]


def plain_numbers(node, path=()):
    """{key path: text} of every number the YAML node tree writes unquoted, exactly as written."""
    if isinstance(node, MappingNode):
        return {k: v for key, value in node.value for k, v in plain_numbers(value, (*path, key.value)).items()}
    if isinstance(node, SequenceNode):
        return {k: v for i, item in enumerate(node.value) for k, v in plain_numbers(item, (*path, i)).items()}
    if node is not None and node.tag in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int"):
        return {path: node.value}
    return {}


def load_params(path: str | Path = "params.yaml") -> Params:
    """A whole params file, as every stage and command reads it: each section a stage reads written out, valid under
    the schema, every path inside the repository (the working directory) or a data root, every preference pair a
    pair of sample sets the DAG builds or `samples_dir` holds (check_params).

    Read as DVC does (ruamel, YAML 1.2), so that both accept the same files and see the same types (1e-4 is a
    float): the round-trip parser DVC uses checks the syntax, the safe one gives plain values, and the node tree the
    text of each unquoted number (an unquoted learning rate is refused showing it as written)."""
    path = Path(path)
    try:
        text = path.read_text()
        YAML(typ="rt").load(text)
        written = plain_numbers(YAML(typ="rt").compose(text))
        raw = YAML(typ="safe", pure=True).load(text)
    except (OSError, YAMLError) as e:
        raise ParamsError(f"{path}: cannot read parameters: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return check_params(raw, str(path), written)


def check_params(raw: dict, source: str = "params.yaml", written=None, root=None) -> Params:
    """A whole params file as read (`raw`): its sections, the schema, then its paths and pairs against the repository
    `root` (the working directory by default)."""
    missing = missing_sections(raw)
    if missing:
        raise invalid(source, missing)
    params = parse_params(raw, source, written)
    root = Path.cwd() if root is None else root
    problems = path_problems(params, root) + pair_problems(params, root)
    if problems:
        raise invalid(source, problems)
    return params


def load_params_or_exit(path: str | Path = "params.yaml") -> Params:
    try:
        return load_params(path)
    except ParamsError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
