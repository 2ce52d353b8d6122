"""Data sets as one array file: images float32 in [-1, 1], NCHW, with integer labels."""

import numpy as np


def load_digits_dataset():
    """scikit-learn's bundled 8×8 digits (1797 images, values 0–16, 10 classes), scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    return images, digits.target.astype(np.int64)


def save_dataset(path, images, labels, num_classes):
    np.savez(path, images=images, labels=labels, num_classes=np.int64(num_classes))


def load_dataset(path):
    with np.load(path, allow_pickle=False) as f:
        return f["images"], f["labels"], int(f["num_classes"])
