"""Blind paired items for a preference study: the same seeds (and labels or prompts) from two systems,
a seeded left/right per item, opaque item IDs, attention checks, and the key that unblinds the votes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COMPARISON, IDENTICAL, BROKEN = "comparison", "identical", "broken"
BROKEN_SIDE = "(broken image)"  # the key's name for a broken side; run names cannot contain parentheses
CHOICES = ("left", "right", "tie")


@dataclass(frozen=True)
class SampleSet:
    images: np.ndarray  # uint8 [N, C, H, W]
    seeds: np.ndarray  # int64 [N]
    prompts: list[str] | None  # text shown with each image (class name or prompt); None when unconditional


def label_text(label: int, label_names) -> str:
    if not label_names:
        return f"class {label}"
    if not 0 <= label < len(label_names):
        raise ValueError(f"label {label} has no entry in label_names ({len(label_names)} names)")
    return label_names[label]


def load_samples(path, label_names=()) -> SampleSet:
    """A sample set saved by the pipeline: `images`, `seeds` and optionally `labels` (class indices) or
    `prompts` (strings, for text-conditional generators)."""
    with np.load(path, allow_pickle=False) as f:
        images, seeds = f["images"], f["seeds"]
        labels = f["labels"] if "labels" in f.files else None
        prompts = [str(p) for p in f["prompts"]] if "prompts" in f.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{path}: images must be uint8 [N, 1 or 3, H, W], got {images.dtype} {images.shape}")
    if seeds.shape != (len(images),) or len(np.unique(seeds)) != len(seeds):
        raise ValueError(f"{path}: seeds must be {len(images)} distinct integers, one per image")
    if prompts is None and labels is not None:
        prompts = [label_text(int(label), label_names) for label in labels]
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"{path}: {len(prompts)} labels or prompts for {len(images)} images")
    return SampleSet(images, seeds.astype(np.int64), prompts)


@dataclass(frozen=True)
class Item:
    id: str
    kind: str  # COMPARISON, IDENTICAL or BROKEN
    seed: int
    prompt: str  # "" when unconditional
    left_system: str
    right_system: str
    left: np.ndarray  # uint8 [C, H, W]
    right: np.ndarray

    @property
    def expected(self) -> str | None:
        """The only attentive answer to an attention check; None for a real comparison."""
        if self.kind == IDENTICAL:
            return "tie"
        if self.kind == BROKEN:
            return "right" if self.left_system == BROKEN_SIDE else "left"
        return None


@dataclass(frozen=True)
class Study:
    study_id: str
    a: str
    b: str
    items: list[Item]  # in the order participants see them

    def key(self) -> dict:
        """The sealed key: which system is on which side of every item. Never handed to participants."""
        return {
            "study": self.study_id,
            "systems": [self.a, self.b],
            "items": [
                {
                    "id": i.id,
                    "kind": i.kind,
                    "seed": i.seed,
                    "left": i.left_system,
                    "right": i.right_system,
                    "expected": i.expected,
                }
                for i in self.items
            ],
        }


def _aligned(a_set: SampleSet, b_set: SampleSet, a: str, b: str):
    """Indices into both sets of every seed they share, checking that the two sides show the same condition."""
    if a_set.images.shape[1:] != b_set.images.shape[1:]:
        raise ValueError(f"{a} and {b} images differ in shape: {a_set.images.shape[1:]} vs {b_set.images.shape[1:]}")
    if (a_set.prompts is None) != (b_set.prompts is None):
        raise ValueError(f"only one of {a} and {b} has labels or prompts: the pairs would not be like for like")
    b_index = {int(s): i for i, s in enumerate(b_set.seeds)}
    pairs = sorted((int(s), i, b_index[int(s)]) for i, s in enumerate(a_set.seeds) if int(s) in b_index)
    if a_set.prompts is not None:
        for seed, i, j in pairs:
            if a_set.prompts[i] != b_set.prompts[j]:
                raise ValueError(f"seed {seed}: {a} has {a_set.prompts[i]!r} but {b} has {b_set.prompts[j]!r}")
    return pairs


def build_study(
    a: str, a_set: SampleSet, b: str, b_set: SampleSet, items: int, attention_checks: int, seed: int
) -> Study:
    """`items` comparisons on seeds shared by both systems plus `attention_checks` checks (alternately a
    broken image against a real one, and one image against itself), shuffled; all draws from one seeded stream."""
    pairs = _aligned(a_set, b_set, a, b)
    needed = items + attention_checks
    if needed > len(pairs):
        raise ValueError(
            f"{a} and {b} share {len(pairs)} seeds; {items} items + {attention_checks} attention checks need {needed}"
        )
    # the pair's names enter the seed: two pairs of one study get independent sides and IDs
    rng = np.random.default_rng(np.random.SeedSequence([seed, *f"{a}\0{b}".encode()]))
    chosen = [pairs[k] for k in rng.choice(len(pairs), size=needed, replace=False)]
    study_id = f"{int(rng.integers(2**40)):010x}"
    ids = [f"{int(x):010x}" for x in rng.choice(2**40, size=needed, replace=False)]
    shape = a_set.images.shape[1:]

    built = []
    for n, (s, i, j) in enumerate(chosen):
        prompt = a_set.prompts[i] if a_set.prompts is not None else ""
        images = {a: a_set.images[i], b: b_set.images[j]}
        if n < items:
            kind, sides = COMPARISON, [a, b]
        elif (n - items) % 2 == 0:
            kind, sides = BROKEN, [BROKEN_SIDE, (a, b)[rng.integers(2)]]
            images[BROKEN_SIDE] = rng.integers(0, 256, size=shape, dtype=np.uint8)  # uniform noise
        else:
            kind = IDENTICAL
            sides = [(a, b)[rng.integers(2)]] * 2
        if rng.integers(2):
            sides.reverse()
        left, right = sides
        built.append(Item(ids[n], kind, s, prompt, left, right, images[left], images[right]))
    order = rng.permutation(needed)
    return Study(study_id, a, b, [built[k] for k in order])


@dataclass(frozen=True)
class KeyItem:
    kind: str
    left: str
    right: str
    expected: str | None


@dataclass(frozen=True)
class StudyKey:
    study: str
    systems: tuple[str, str]
    items: dict[str, KeyItem]

    @classmethod
    def from_dict(cls, key: dict) -> StudyKey:
        items = {i["id"]: KeyItem(i["kind"], i["left"], i["right"], i["expected"]) for i in key["items"]}
        return cls(key["study"], tuple(key["systems"]), items)

    def chosen(self, item: str, choice: str) -> str | None:
        """The system a vote prefers, None for a tie."""
        entry = self.items[item]
        return {"left": entry.left, "right": entry.right, "tie": None}[choice]
