"""Data sets as one array file: images NCHW with integer labels, read back as float32 in [-1, 1] (or kept uint8)."""

import io
import json
import zipfile

import numpy as np
from PIL import Image


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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_edm_zip(path, resolution):
    """A data set zip as written by EDM's dataset_tool.py: RGB images (any folder layout, read in sorted name
    order) and `dataset.json` = {"labels": [[name, class], ...] or null}. Returns uint8 NCHW images and int64
    labels (all 0 without labels). Every image must be `resolution`² RGB; the first that is not is named."""
    with zipfile.ZipFile(path) as archive:
        names = sorted(n for n in archive.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"{path}: no images in the zip")
        meta = json.loads(archive.read("dataset.json")) if "dataset.json" in archive.namelist() else {}
        labels = meta.get("labels")
        if labels is not None:
            by_name = dict(labels)
            missing = [n for n in names if n not in by_name]
            if missing:
                raise ValueError(
                    f"{path}: dataset.json has no label for {missing[0]} ({len(missing)} images unlabelled)"
                )
            labels = np.asarray([by_name[n] for n in names], dtype=np.int64)
        images = np.empty([len(names), 3, resolution, resolution], dtype=np.uint8)
        for i, name in enumerate(names):
            with Image.open(io.BytesIO(archive.read(name))) as image:
                if image.mode != "RGB" or image.size != (resolution, resolution):
                    raise ValueError(
                        f"{path}: {name} is {image.mode} {image.size[0]}×{image.size[1]}, "
                        f"expected RGB {resolution}×{resolution}"
                    )
                images[i] = np.asarray(image).transpose(2, 0, 1)
    return images, labels if labels is not None else np.zeros(len(names), dtype=np.int64)


def save_dataset(path, images, labels, num_classes):
    """float32 images are stored as they are; uint8 ones (real photographs) stay uint8: 4× smaller."""
    np.savez(path, images=images, labels=labels, num_classes=np.int64(num_classes))


def load_dataset(path, keep_uint8=False):
    """(images, labels, num_classes). With keep_uint8, uint8 images stay uint8 for the caller to convert per
    batch: ImageNet-64 takes 16 GB as uint8, 63 GB as float32."""
    with np.load(path, allow_pickle=False) as f:
        images = f["images"]
        if images.dtype == np.uint8 and not keep_uint8:
            images = images.astype(np.float32) / 127.5 - 1
        return images, f["labels"], int(f["num_classes"])


def load_labels(path):
    """The class indices of a data set file, without reading its images."""
    with np.load(path, allow_pickle=False) as f:
        return f["labels"]
