"""Artifacts shared by several stages, and how to open them."""

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


def feature_net():
    return FeatureNet(extractor="distillery-digits", weights_path=FEATURES_DIR)


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
