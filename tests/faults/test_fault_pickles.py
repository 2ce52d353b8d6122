"""A malicious pickle at every path the params can name — downloads (teacher, data set, Inception weights, reference
statistics) and local files (data set, Inception weights): each stage refuses it with a clear error, no code in it
runs (a marker file would prove it), its hash is not pinned, and no output appears."""

import hashlib
import io
import json
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch
import yaml
from faults.faultkit import env
from test_download import serving

from conftest import ROOT, dump_params

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


class Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plain_pickle(marker):
    return pickle.dumps({"ema": Payload(marker)})


def torch_file(marker):
    buffer = io.BytesIO()
    torch.save({"conv.weight": torch.zeros(1), "extra": Payload(marker)}, buffer)
    return buffer.getvalue()


def npz_with_object_array(marker):
    buffer = io.BytesIO()
    np.savez(buffer, mu=np.array([Payload(marker)], dtype=object), sigma=np.eye(1))
    return buffer.getvalue()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def micro():
    return yaml.safe_load((ROOT / "profiles" / "micro.yaml").read_text())


def inception_profile():
    return yaml.safe_load((ROOT / "profiles" / "cifar10-uncond.yaml").read_text())


def teacher_url(params, url, data):
    params["teacher"].update(source="url", download={"url": url})  # no pin: trust on first use
    return "teacher"


def data_url(params, url, data):
    params["data"] = {"source": "edm-zip", "download": {"url": url}, "resolution": 8}
    return "data"


def data_path(params, path, data):
    params["data"] = {"source": "edm-zip", "path": str(path), "sha256": sha256(data), "resolution": 8}
    return "data"


def weights_path(params, path, data):
    params["evaluation"]["feature_weights"] = {"path": str(path), "sha256": sha256(data)}
    return "features"


def weights_url(params, url, data):
    params["evaluation"]["feature_weights"] = {"url": url, "sha256": sha256(data)}
    return "features"


def reference_url(params, url, data):
    params["evaluation"].update(reference="edm-npz", reference_download={"url": url})
    return "reference_stats"


CASES = {
    "teacher.download": (micro, teacher_url, plain_pickle, "url"),
    "data.download": (micro, data_url, plain_pickle, "url"),
    "data.path": (micro, data_path, plain_pickle, "path"),
    "evaluation.feature_weights.path": (inception_profile, weights_path, torch_file, "path"),
    "evaluation.feature_weights.url": (inception_profile, weights_url, torch_file, "url"),
    "evaluation.reference_download": (inception_profile, reference_url, npz_with_object_array, "url"),
}


@pytest.mark.parametrize("key", CASES)
def test_a_malicious_file_is_refused_and_never_runs(key, tmp_path, ledger):
    profile, configure, payload, where = CASES[key]
    project = tmp_path / "project"
    project.mkdir()
    marker = tmp_path / "code_was_executed"
    data = payload(marker)
    params = profile()
    with ledger.fault():
        with serving(data) as httpd:
            if where == "url":
                stage = configure(params, httpd.url, data)
            else:
                (project / "inputs").mkdir()
                (project / "inputs" / "evil.bin").write_bytes(data)
                stage = configure(params, "inputs/evil.bin", data)
            dump_params(project / "params.yaml", params)
            before = sorted(p.relative_to(project) for p in project.rglob("*"))
            result = subprocess.run(
                [str(ROOT / ".venv" / "bin" / "python"), "-m", f"stages.{stage}"],
                cwd=project,
                env=env({"HOME": str(project), "PYTHONPATH": str(ROOT)}),
                capture_output=True,
                text=True,
            )
        assert not marker.exists(), f"{key}: the pickle's code ran"
        assert result.returncode in (1, 2), f"{key}: exit {result.returncode}\n{result.stderr}"
        assert "Traceback" not in result.stderr, f"{key}: not a clear error:\n{result.stderr}"
        lock = project / "downloads.lock.json"
        assert not lock.exists() or json.loads(lock.read_text()) == {}, f"{key}: its hash was pinned"
        outputs = [
            p.relative_to(project)
            for p in project.rglob("*")
            if p.relative_to(project) not in before
            and p.is_file()
            and p.parts[len(project.parts)] not in {"downloads", "mlruns", ".dvc"}
            and p.name not in {"mlflow.db", ".distillery.lock"}
        ]
        assert outputs == [], f"{key}: wrote {outputs}"
