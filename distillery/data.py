"""Data sets as one array file: images NCHW with integer labels, read back as float32 in [-1, 1]."""

import numpy as np


def load_digits_dataset():
    """scikit-learn's bundled 8×8 digits (1797 images, values 0–16, 10 classes), scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    return images, digits.target.astype(np.int64)


def load_cifar10_dataset(root):
    """CIFAR-10's 50,000 training images as uint8 NCHW (the set EDM's statistics are computed on),
    downloaded by torchvision into `root` on first use."""
    from torchvision.datasets import CIFAR10

    train = CIFAR10(root=str(root), train=True, download=True)
    return np.ascontiguousarray(train.data.transpose(0, 3, 1, 2)), np.asarray(train.targets, dtype=np.int64)


def save_dataset(path, images, labels, num_classes):
    """float32 images are stored as they are; uint8 ones (real photographs) stay uint8: 4× smaller."""
    np.savez(path, images=images, labels=labels, num_classes=np.int64(num_classes))


def load_dataset(path):
    with np.load(path, allow_pickle=False) as f:
        images = f["images"]
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 127.5 - 1
        return images, f["labels"], int(f["num_classes"])
