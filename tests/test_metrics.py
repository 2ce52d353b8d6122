"""The toy evaluation network (DigitsNet) and the torch-fidelity FID/IS/KID path on sklearn's 8x8 digits."""

import importlib
import json
import os

import numpy as np
import pytest
import torch
import torch_fidelity
from sklearn.datasets import load_digits

import distillery.extractors
from distillery.extractors import DIGITS, INCEPTION, FeatureNet, write_info
from distillery.features import CONFIG_FILE, WEIGHTS_FILE, load_digits_net, save_digits_net, train_digits_classifier
from distillery.metrics import (
    UInt8Images,
    extract_features,
    fid_from_statistics,
    fid_statistics,
    inception_score,
    kid,
    load_stats_npz,
    precision_recall,
    save_stats_npz,
    to_uint8,
)

N_REFERENCE = 1437  # the rest (360 digits) is never seen by the classifier


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    reference, heldout = order[:N_REFERENCE], order[N_REFERENCE:]
    return dict(reference=images[reference], reference_labels=labels[reference], heldout=images[heldout])


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory):
    net, metrics = train_digits_classifier(digits["reference"], digits["reference_labels"], seed=0)
    directory = str(tmp_path_factory.mktemp("digits_net"))
    save_digits_net(net, directory)
    write_info(directory, DIGITS, "digits-weights-sha256", feature_dim=64)
    return dict(net=net, metrics=metrics, directory=directory, feature_net=FeatureNet.load(directory))


@pytest.fixture(scope="module")
def image_sets(digits):
    noise = torch.rand(len(digits["heldout"]), 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return dict(reference=to_uint8(digits["reference"]), heldout=to_uint8(digits["heldout"]), noise=to_uint8(noise))


@pytest.fixture(scope="module")
def features(image_sets, classifier):
    return {name: extract_features(images, classifier["feature_net"]) for name, images in image_sets.items()}


def test_to_uint8_truncates_like_edm():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0])
    # 0.5 -> 191.75 must truncate to 191 (rounding would give 192).
    assert to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]
    assert to_uint8(x).dtype == torch.uint8


def test_feature_net_defaults_come_from_the_extractor(classifier):
    digits_net = classifier["feature_net"]
    assert (digits_net.extractor, digits_net.weights_sha256, digits_net.feature_dim) == (
        DIGITS,
        "digits-weights-sha256",
        64,
    )
    assert (digits_net.fid_key, digits_net.isc_key) == ("features", "logits_unbiased")
    inception = FeatureNet(INCEPTION, "unused", "unused", 2048)
    assert (inception.fid_key, inception.isc_key) == ("2048", "logits_unbiased")


def test_registration_survives_reimport(image_sets, features, classifier):
    # `features` were computed through torch-fidelity's registry before the reload
    reloaded = importlib.reload(distillery.extractors)  # must not trip torch-fidelity's duplicate-name check
    registered = torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY[DIGITS]
    assert issubclass(registered, torch_fidelity.FeatureExtractorBase)
    assert (registered.__module__, registered.__qualname__) == ("distillery.extractors", "DigitsFeatureExtractor")
    # a reloaded FeatureNet still gives a working DigitsNet extractor with the same features
    again = extract_features(image_sets["heldout"], reloaded.FeatureNet.load(classifier["directory"]))
    assert again.keys() == features["heldout"].keys() == {"features", "logits_unbiased"}
    for key, value in features["heldout"].items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_classifier_heldout_accuracy(classifier):
    assert classifier["metrics"]["n_heldout"] == round(0.2 * N_REFERENCE)
    assert classifier["metrics"]["heldout_accuracy"] >= 0.85


def test_save_load_digits_net(classifier, digits):
    directory = classifier["directory"]
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        assert json.load(f) == classifier["net"].config
    x = digits["heldout"]
    expected = classifier["net"](x)
    for path in (directory, os.path.join(directory, WEIGHTS_FILE)):
        loaded = load_digits_net(path)
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), expected))


def test_extract_features_shapes_and_dtype_check(features, digits, classifier):
    assert features["heldout"]["features"].shape == (len(digits["heldout"]), 64)
    assert features["heldout"]["logits_unbiased"].shape == (len(digits["heldout"]), 10)
    with pytest.raises(ValueError):
        extract_features(digits["heldout"], classifier["feature_net"])


def test_metrics_match_torch_fidelity(image_sets, features, classifier):
    heldout, reference = features["heldout"], features["reference"]
    ours_fid = fid_from_statistics(fid_statistics(heldout["features"]), fid_statistics(reference["features"]))
    ours_isc = inception_score(heldout["logits_unbiased"])
    ours_kid = kid(heldout["features"], reference["features"], subsets=20)
    # The weights file path (not the directory) must work as feature_extractor_weights_path too.
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(image_sets["heldout"]),
        input2=UInt8Images(image_sets["reference"]),
        fid=True,
        isc=True,
        kid=True,
        kid_subsets=20,
        kid_subset_size=len(image_sets["heldout"]),
        feature_extractor=DIGITS,
        feature_extractor_weights_path=os.path.join(classifier["directory"], WEIGHTS_FILE),
        cuda=False,
        save_cpu_ram=True,
        cache=False,
        verbose=False,
    )
    assert ours_fid == pytest.approx(theirs[torch_fidelity.KEY_METRIC_FID], rel=1e-6)
    assert ours_isc == pytest.approx(
        (theirs[torch_fidelity.KEY_METRIC_ISC_MEAN], theirs[torch_fidelity.KEY_METRIC_ISC_STD]), rel=1e-6
    )
    assert ours_kid == pytest.approx(
        (theirs[torch_fidelity.KEY_METRIC_KID_MEAN], theirs[torch_fidelity.KEY_METRIC_KID_STD]), rel=1e-6
    )


def test_real_digits_score_well_and_noise_badly(features):
    reference = fid_statistics(features["reference"]["features"])
    fid_real = fid_from_statistics(fid_statistics(features["heldout"]["features"]), reference)
    fid_noise = fid_from_statistics(fid_statistics(features["noise"]["features"]), reference)
    assert 0 < fid_real < 10
    assert fid_noise >= 10 * fid_real
    # One split: 360 images are too few to split without biasing IS down.
    is_real, _ = inception_score(features["heldout"]["logits_unbiased"], splits=1)
    is_noise, _ = inception_score(features["noise"]["logits_unbiased"], splits=1)
    assert 7 <= is_real <= 10
    assert 1 <= is_noise <= 2
    kid_real, kid_real_std = kid(features["heldout"]["features"], features["reference"]["features"], subsets=20)
    kid_noise, _ = kid(features["noise"]["features"], features["reference"]["features"], subsets=20)
    assert kid_noise > 10 * (abs(kid_real) + kid_real_std)


def test_stats_npz_roundtrip_in_edm_layout(features, tmp_path):
    stats = fid_statistics(features["reference"]["features"])
    path = tmp_path / "digits-8x8.npz"
    save_stats_npz(path, stats)
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["mu", "sigma"]
        assert data["mu"].shape == (64,) and data["sigma"].shape == (64, 64)
        assert data["mu"].dtype == data["sigma"].dtype == np.float64
    loaded = load_stats_npz(path)
    assert np.array_equal(loaded["mu"], stats["mu"]) and np.array_equal(loaded["sigma"], stats["sigma"])


def test_training_is_bit_identical_for_a_seed(digits):
    def train(seed):
        return train_digits_classifier(digits["reference"], digits["reference_labels"], seed=seed, epochs=2)

    threads = torch.get_num_threads()
    net_a, metrics_a = train(3)
    assert torch.get_num_threads() == threads
    # Training pins itself to one thread, so the caller's thread count must not change the result.
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        net_b, metrics_b = train(3)
    finally:
        torch.set_num_threads(threads)
    net_c, _ = train(4)
    state_a, state_b, state_c = net_a.state_dict(), net_b.state_dict(), net_c.state_dict()
    assert metrics_a == metrics_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)


def test_precision_recall_separate_quality_from_diversity():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=gen).numpy()
    collapsed = (0.05 * torch.randn(400, 8, generator=gen)).numpy()  # inside the real manifold, little of it
    shifted = (torch.randn(400, 8, generator=gen) + 6).numpy()  # as diverse, elsewhere
    p_c, r_c = precision_recall(collapsed, real)
    p_s, r_s = precision_recall(shifted, real)
    p_r, r_r = precision_recall(torch.randn(400, 8, generator=gen).numpy(), real)
    assert p_c > 0.9 and r_c < 0.1
    assert p_s < 0.05 and r_s < 0.05
    assert p_r > 0.8 and r_r > 0.8
