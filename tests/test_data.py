"""Data sets in EDM's dataset_tool zip format (the 64×64 profiles) load exactly, and bad ones are refused."""

import hashlib
import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import yaml
from PIL import Image

from distillery.data import load_dataset, load_edm_zip

from conftest import ROOT, dump_params


def write_zip(path, images, labels=None, extra=()):
    """A zip as EDM's dataset_tool.py writes it: 00000/img%08d.png and dataset.json."""
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as archive:
        for name, image in zip(names, images):
            buffer = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
            archive.writestr(name, buffer.getvalue())
        for name, data in extra:
            archive.writestr(name, data)
        meta = {"labels": None if labels is None else [[n, int(c)] for n, c in zip(names, labels)]}
        archive.writestr("dataset.json", json.dumps(meta))
    return path


def random_images(n, resolution=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, [n, 3, resolution, resolution], dtype=np.uint8)


def test_images_and_labels_load_bit_exact_in_name_order(tmp_path):
    images, labels = random_images(1203), np.arange(1203) % 7
    got, got_labels = load_edm_zip(write_zip(tmp_path / "d.zip", images, labels), 8)
    assert got.dtype == np.uint8 and np.array_equal(got, images)  # 1203 images span two folders
    assert np.array_equal(got_labels, labels)


def test_an_unlabelled_zip_gives_class_zero(tmp_path):
    _, labels = load_edm_zip(write_zip(tmp_path / "d.zip", random_images(5)), 8)
    assert labels.tolist() == [0] * 5


def test_a_wrong_size_or_a_missing_label_is_refused_naming_the_file(tmp_path):
    small = Image.fromarray(np.zeros([4, 4, 3], dtype=np.uint8))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    path = write_zip(tmp_path / "d.zip", random_images(3), extra=[("00000/img00000099.png", buffer.getvalue())])
    with pytest.raises(ValueError, match=r"00000/img00000099.png is RGB 4×4, expected RGB 8×8"):
        load_edm_zip(path, 8)
    labelled = write_zip(
        tmp_path / "l.zip", random_images(3), labels=[1, 2, 3], extra=[("00000/img00000099.png", buffer.getvalue())]
    )
    with pytest.raises(ValueError, match=r"no label for 00000/img00000099.png"):
        load_edm_zip(labelled, 8)


def run_data_stage(tmp_path, data):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"] = data
    raw["evaluation"]["feature_extractor"] = "inception-v3-compat"  # the digits classifier measures digits only
    dump_params(tmp_path / "params.yaml", raw)
    env = {
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run([sys.executable, "-m", "stages.data"], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_the_data_stage_reads_a_pinned_zip_and_refuses_other_bytes(tmp_path):
    images, labels = random_images(20), np.arange(20) % 3
    path = write_zip(tmp_path / "d.zip", images, labels)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run_data_stage(tmp_path, {"source": "edm-zip", "path": str(path), "sha256": "0" * 64, "resolution": 8})
    assert result.returncode != 0 and f"has sha256 {digest}" in result.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())  # nothing half-written
    result = run_data_stage(tmp_path, {"source": "edm-zip", "path": str(path), "sha256": digest, "resolution": 8})
    assert result.returncode == 0, result.stderr
    got, got_labels, num_classes = load_dataset(tmp_path / "data" / "dataset.npz", keep_uint8=True)
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels) and num_classes == 3
    assert json.loads((tmp_path / "metrics" / "data.json").read_text())["sha256"] == digest
