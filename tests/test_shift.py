"""The covariate-shift diagnostic measures what it says: a student trained on its own states (DMD2's backward
simulation) is at sampling-noise distance from them, while training states from data unlike its rollouts are far;
the numbers repeat bit for bit."""

import pytest
import torch
from sklearn.datasets import load_digits

from distillery.extractors import DIGITS, FeatureNet, write_info
from distillery.features import save_digits_net, train_digits_classifier
from distillery.registry import METHODS
from distillery.shift import covariate_shift

from toys import tiny_edm


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    net, _ = train_digits_classifier(images, torch.tensor(data.target), seed=0, epochs=3)
    directory = str(tmp_path_factory.mktemp("digits_net"))
    save_digits_net(net, directory)
    write_info(directory, DIGITS, "digits-weights-sha256", feature_dim=64)
    return FeatureNet.load(directory)


def shift(name, features, real, ddil=None):
    method = METHODS[name].build(steps=2, ddil=ddil, rollout_steps=2)
    student = tiny_edm(perturb=0.1).eval()
    return covariate_shift(method, student, student, real, None, features, num_states=300, seed=0, batch=150)


def test_own_states_are_near_and_foreign_data_states_far(features):
    # real images far from anything the student's rollout reaches at σ_1 ≈ 2.5: a constant +1 image
    real = torch.ones(50, 1, 8, 8)
    own = shift("dmd2", features, real)
    data = shift("cd", features, real)
    assert [row["level"] for row in own] == [1] and own[0]["sigma"] == data[0]["sigma"]
    assert data[0]["fd"] > 10 * own[0]["fd"]
    # DDIL's mixture, half of it the student's own states, sits in between
    mixed = shift("cd", features, real, ddil=(1, 0, 1))
    assert own[0]["fd"] < mixed[0]["fd"] < data[0]["fd"]
    assert shift("cd", features, real) == data  # same seed, same bits


def test_a_one_step_student_has_no_intermediate_state(features):
    method = METHODS["dmd2"].build(steps=1)
    student = tiny_edm().eval()
    assert covariate_shift(method, student, student, torch.zeros(4, 1, 8, 8), None, features, 10) == []
