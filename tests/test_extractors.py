"""The Inception-v3 extractor built from weights we read ourselves: the same features as torch-fidelity's own
loading of the same file, and foreign files refused without running anything."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch_fidelity.utils import create_feature_extractor

from distillery.extractors import INCEPTION, INCEPTION_FILE, FeatureNet, import_inception_weights, write_info
from distillery.metrics import extract_features
from distillery.registry import INCEPTION_SHA256, INCEPTION_URL

from toys import write_random_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("inception") / "weights.pth", seed=0)


@pytest.fixture(scope="module")
def features_dir(weights, tmp_path_factory):
    directory = tmp_path_factory.mktemp("features")
    import_inception_weights(weights, directory)
    write_info(directory, INCEPTION, "weights-sha256", feature_dim=2048)
    return directory


def test_url_and_pin_are_torch_fidelitys_release_file():
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    assert INCEPTION_URL == tf_inception.URL_INCEPTION_V3
    # torch.hub's convention: the file name carries the first digits of the file's sha256
    assert INCEPTION_SHA256.startswith(INCEPTION_URL.rsplit("-", 1)[1].split(".")[0])


def test_stored_weights_equal_the_file(weights, features_dir):
    original = torch.load(weights, weights_only=True)
    stored = load_file(str(features_dir / INCEPTION_FILE))
    assert stored.keys() == original.keys()
    assert all(torch.equal(stored[k], v) for k, v in original.items())


def test_features_equal_torch_fidelitys_loading_of_the_same_file(weights, features_dir):
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = extract_features(images, FeatureNet.load(features_dir), batch_size=6)  # one batch, as theirs
    # torch-fidelity unpickles the path itself here: acceptable for the file this test wrote, never in the pipeline
    theirs = create_feature_extractor(
        INCEPTION, ["2048", "logits_unbiased"], cuda=False, feature_extractor_weights_path=str(weights)
    )
    with torch.no_grad():
        expected = dict(zip(["2048", "logits_unbiased"], theirs(images)))
    for key in ("2048", "logits_unbiased"):
        np.testing.assert_array_equal(ours[key], expected[key].numpy(), err_msg=key)
    assert ours["2048"].std() > 1e-3  # random, but not degenerate: FIDs of these features are not all zero


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": Exploit(marker)}, path)  # the format of the real file, with a payload
    with pytest.raises(ValueError, match="not torch-fidelity's Inception-v3 weights file"):
        import_inception_weights(path, tmp_path)
    assert not marker.exists()
    assert not (tmp_path / INCEPTION_FILE).exists()


def test_other_weights_are_refused(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)
    with pytest.raises(ValueError, match="Missing key"):
        import_inception_weights(path, tmp_path)
