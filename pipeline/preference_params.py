"""The `preference` section of params.yaml: blind A/B studies between pairs of generators, and their analysis.

Self-contained (no import from pipeline.params) so that pipeline.params can import it without a cycle.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# a run name becomes a file name (samples/<name>.npz) and part of a folder name
RunName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)]
# counts of items and raters: a study of 10⁵ items is far beyond what people rate (profiles: 6 to 200)
Count = Annotated[int, Field(ge=0, le=100_000)]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
# a file or folder, relative to the repository root; pipeline.params.PATHS keeps each inside the repository
PathText = Annotated[str, Field(pattern=r"^[^\x00]+$")]  # not empty, no NUL


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no inf or nan, as every section of params


class PreferencePair(_Section):
    a: RunName = "teacher"
    b: RunName = "sid-1e-4"

    @model_validator(mode="after")
    def different_systems(self):
        if self.a == self.b:
            raise ValueError(f"a and b must be different runs, got {self.a!r} twice")
        return self

    @property
    def name(self) -> str:
        """The folder name of the pair's study: <output_dir>/<a>-vs-<b>."""
        return f"{self.a}-vs-{self.b}"


class PreferenceParams(_Section):
    items: Annotated[int, Field(gt=0, le=100_000)] = 40  # compared seeds per pair
    attention_checks: Count = 4  # identical pairs and broken images, mixed in
    seed: Seed = 0  # item choice, order, sides and opaque IDs
    pairs: list[PreferencePair] = Field(default_factory=lambda: [PreferencePair()], min_length=1)
    question: Annotated[str, Field(min_length=1, max_length=500)] = "Which image looks more like a handwritten digit?"
    label_names: list[str] = []  # class index → text shown as the item's prompt
    image_px: Annotated[int, Field(ge=16, le=1024)] = 160  # on-screen size; pixels are upscaled, never smoothed
    samples_dir: PathText = "samples"  # <samples_dir>/<run>.npz: images, seeds[, labels]
    output_dir: PathText = "preference"  # <output_dir>/<a>-vs-<b>/{study/, key.json}
    votes_dir: PathText = "votes/preference"  # returned vote files, any of the three formats
    max_failed_checks: Count = 0  # a rater with more wrong attention checks is dropped
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    # Bradley–Terry resamples: 2000 gives stable 95 % intervals; 10⁶ would take hours
    bootstrap: Annotated[int, Field(ge=100, le=1_000_000)] = 2000
    bootstrap_unit: Literal["rater", "item"] = "rater"  # votes of one rater (or item) are resampled together
    # virtual ties per compared pair: finite scores (beyond 10⁶ the ties would drown every vote)
    bradley_terry_prior: Annotated[float, Field(gt=0, le=1e6)] = 1.0

    @field_validator("pairs")
    @classmethod
    def unique_pairs(cls, pairs):
        seen = set()
        for pair in pairs:
            key = frozenset((pair.a, pair.b))
            if key in seen:
                raise ValueError(f"the pair {pair.a} / {pair.b} is listed twice")
            seen.add(key)
        return pairs

    def pair(self, a: str, b: str) -> PreferencePair:
        """The configured pair (a, b); a ValueError names the configured ones when it is not listed."""
        for pair in self.pairs:
            if (pair.a, pair.b) == (a, b):
                return pair
        listed = ", ".join(p.name for p in self.pairs)
        raise ValueError(f"no preference pair a={a!r}, b={b!r} in params (configured: {listed})")
