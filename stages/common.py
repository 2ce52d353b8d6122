"""Artifacts shared by several stages, and how to open them."""

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.io import atomic_path

from distillery.metrics import FeatureNet, load_stats_npz
from distillery.sampling import image_grid

REFERENCE_STATS = "stats/reference.npz"
REFERENCE_FEATURES = "stats/reference_features.npz"
TEACHER_STATS = "stats/teacher.npz"
TEACHER_SAMPLES = "samples/teacher.npz"
FEATURES_DIR = "models/features"
GRIDS = Path("reports/grids")


def feature_net(params):
    """The FID/IS/KID feature network of the profile: the toy digits classifier (trained by the
    `features` stage) or torch-fidelity's Inception port."""
    e = params.evaluation
    if e.feature_extractor == "distillery-digits":
        return FeatureNet(extractor="distillery-digits", weights_path=FEATURES_DIR)
    return FeatureNet(extractor=e.feature_extractor, weights_path=e.feature_weights)


def protocol(params, feature, num_samples, reference_path=REFERENCE_STATS):
    """What an FID number depends on; the report refuses to put FIDs of different protocols in one column."""
    weights = feature.weights_path
    files = sorted(Path(weights).rglob("*")) if weights and Path(weights).is_dir() else [Path(weights)] if weights else []
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.read_bytes())
    return {"extractor": feature.extractor, "weights_sha256": h.hexdigest() if files else "torch-fidelity default",
            "num_samples": num_samples, "seeds": f"0-{num_samples - 1}",
            "reference_sha256": hashlib.sha256(Path(reference_path).read_bytes()).hexdigest()}


def reference():
    """(FID statistics, features) of the real data."""
    with np.load(REFERENCE_FEATURES, allow_pickle=False) as f:
        return load_stats_npz(REFERENCE_STATS), f["features"]


def save_samples(path, images_uint8, seeds, labels=None):
    with atomic_path(path) as tmp:
        arrays = {"images": images_uint8.numpy(), "seeds": np.asarray(seeds, dtype=np.int64)}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        np.savez(tmp, **arrays)


def save_grid(path, images_uint8, rows, scale=4):
    grid = Image.fromarray(image_grid(images_uint8, rows))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
