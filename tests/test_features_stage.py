"""The `features` stage's Inception branch refuses what it cannot vouch for, before writing anything, with an
error that says what to do: an unreachable download names the URL, the pin and the key to set; a local file
that is not the pinned one is refused naming both hashes."""

import socket
import subprocess
import sys

import yaml

from distillery.registry import INCEPTION_SHA256

from conftest import ROOT, dump_params


def stage(project, params):
    dump_params(project / "params.yaml", params)
    for link in ("stages", "distillery", "pipeline"):
        (project / link).symlink_to(ROOT / link)
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": str(project)}
    return subprocess.run(
        [sys.executable, "-m", "stages.features"], cwd=project, capture_output=True, text=True, env=env
    )


def cifar_params(**weights):
    params = yaml.safe_load((ROOT / "profiles" / "cifar10-uncond.yaml").read_text())
    params["evaluation"]["feature_weights"] = weights
    return params


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_unreachable_weights_name_the_url_the_pin_and_the_key(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/weights-inception-2015-12-05-6726825d.pth"
    result = stage(tmp_path, cifar_params(url=url, sha256=INCEPTION_SHA256))
    assert result.returncode == 1
    assert f"cannot fetch the Inception weights {url} (sha256 {INCEPTION_SHA256})" in result.stderr
    assert f"evaluation.feature_weights: {{path: <the file>, sha256: {INCEPTION_SHA256}}}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "features").exists()


def test_a_local_file_that_is_not_the_pinned_one_is_refused(tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"not the weights")
    result = stage(tmp_path, cifar_params(path="weights.pth", sha256=INCEPTION_SHA256))
    assert result.returncode == 1
    assert f"but evaluation.feature_weights.sha256 pins {INCEPTION_SHA256}" in result.stderr
    assert not (tmp_path / "models" / "features").exists()
