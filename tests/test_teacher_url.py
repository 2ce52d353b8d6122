"""The `teacher` stage with an official-format EDM pickle served on 127.0.0.1: downloaded, pinned on
first use (loudly), converted without running its code; changed bytes are refused later."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import yaml
from test_download import serving
from test_edm_pickle import write_official_pickle

from distillery.checkpoint import load_network

from conftest import ROOT, dump_params
from toys import seeded_network, tiny_config

CONFIG = tiny_config()


@pytest.fixture
def served(tmp_path):
    marker = tmp_path / "module_src_was_executed"
    src = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\nraise RuntimeError('ran')\n"
    net = seeded_network(CONFIG, perturb=0.1).eval()
    kwargs = {k: v for k, v in CONFIG.items() if k not in ("img_resolution", "img_channels", "label_dim", "model_type")}
    init_kwargs = dict(img_resolution=8, img_channels=1, label_dim=0, use_fp16=False, model_type="SongUNet", **kwargs)
    write_official_pickle(tmp_path / "teacher.pkl", net, init_kwargs, src)
    with serving((tmp_path / "teacher.pkl").read_bytes()) as httpd:
        yield httpd, net, marker


def run_teacher_stage(project):
    return subprocess.run(
        [sys.executable, "-m", "stages.teacher"],
        cwd=project,
        capture_output=True,
        text=True,
        env={
            "PATH": "/usr/bin:/bin",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HOME": str(project),
            "PYTHONPATH": str(ROOT),
        },
    )


def test_official_teacher_is_pinned_on_first_download_and_refused_when_it_changes(tmp_path, served):
    httpd, net, marker = served
    project = tmp_path / "project"
    project.mkdir()
    params = yaml.safe_load((ROOT / "profiles" / "micro.yaml").read_text())
    params["teacher"].update(source="url", download={"url": httpd.url})
    dump_params(project / "params.yaml", params)

    first = run_teacher_stage(project)
    assert first.returncode == 0, first.stderr
    digest = hashlib.sha256(httpd.payload).hexdigest()
    assert "WARNING: no sha256 pinned" in first.stderr and digest in first.stderr
    assert json.loads((project / "downloads.lock.json").read_text()) == {httpd.url: digest}
    assert not marker.exists()  # the embedded module source never ran
    converted = load_network(project / "models" / "teacher")
    for k, v in net.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v), k
    assert json.loads((project / "models" / "teacher" / "config.json").read_text())["sha256"] == digest

    # the server now hands out other bytes: the recorded pin refuses them and the old teacher stays
    (project / "downloads" / "teacher.pkl").unlink()
    httpd.payload = httpd.payload[:-1] + bytes([httpd.payload[-1] ^ 1])
    second = run_teacher_stage(project)
    assert second.returncode != 0 and "ChecksumMismatch" in second.stderr
    assert not (project / "downloads" / "teacher.pkl").exists()
    assert torch.equal(
        load_network(project / "models" / "teacher").state_dict()["model.map_layer0.weight"],
        net.state_dict()["model.map_layer0.weight"],
    )


def test_edm_reference_statistics_are_imported_from_a_pinned_npz(tmp_path):
    import io

    import numpy as np

    from distillery.metrics import fid_from_statistics, load_stats_npz

    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 16))
    mu, sigma = rng.normal(size=16), a.T @ a / 64
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma)  # EDM's fid-refs layout
    with serving(buffer.getvalue()) as httpd:
        params = yaml.safe_load((ROOT / "profiles" / "cifar10-uncond.yaml").read_text())  # Inception statistics
        params["evaluation"].update(
            reference="edm-npz",
            reference_download={"url": httpd.url, "sha256": hashlib.sha256(httpd.payload).hexdigest()},
        )
        dump_params(tmp_path / "params.yaml", params)
        result = subprocess.run(
            [sys.executable, "-m", "stages.reference_stats"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)},
        )
    assert result.returncode == 0, result.stderr
    stats = load_stats_npz(tmp_path / "stats" / "reference.npz")
    assert np.array_equal(stats["mu"], mu) and np.array_equal(stats["sigma"], sigma)
    assert fid_from_statistics(stats, {"mu": mu, "sigma": sigma}) == pytest.approx(0, abs=1e-6)
    assert np.load(tmp_path / "stats" / "reference_features.npz")["features"].shape == (0, 16)  # no KID from it
