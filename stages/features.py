"""Stage `features`: the FID/IS/KID feature network every later stage reads (models/features): the toy's digits
classifier trained on the digits, or torch-fidelity's Inception-v3 from its pinned weights file.

It is an evaluation network only: no training loss anywhere reads it. Its identity (extractor name and weights
sha256) is in models/features/extractor.json, so a new extractor reruns exactly the stages that compute features.
"""

import contextlib
import urllib.error

import torch

from pipeline.io import atomic_path, write_json
from pipeline.pins import fetch, file_sha256
from pipeline.runtime import seed_everything

from distillery.data import load_dataset
from distillery.download import ChecksumMismatch
from distillery.extractors import import_inception_weights, write_info
from distillery.features import WEIGHTS_FILE, save_digits_net, train_digits_classifier
from distillery.registry import DIGITS, INCEPTION

from stages.paths import DATASET, FEATURES_DIR, metrics
from stages.skeleton import StageFailed, run_stage


def digits_classifier(params, run):
    f = params.features
    images, labels, num_classes = load_dataset(DATASET)
    if num_classes < 2:
        raise StageFailed(f"{DATASET} has {num_classes} class: a classifier of it would measure nothing")
    seed_everything(params.seed)
    net, info = train_digits_classifier(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        seed=params.seed,
        epochs=f.epochs,
        batch_size=f.batch,
        lr=f.lr,
    )
    with atomic_path(FEATURES_DIR, is_dir=True) as tmp:
        save_digits_net(net, tmp)
        identity = write_info(tmp, DIGITS, file_sha256(tmp / WEIGHTS_FILE), feature_dim=net.config["feature_dim"])
    write_json(metrics("features"), {**identity, **info})
    run.log_metrics(info)


def inception_weights(spec, stack):
    """The local path of the pinned weights file: downloaded (`url`) or given (`path`), checked against the pin; a
    download is a `fetch` entered on `stack`, whose end is when the weights were imported."""
    if spec.path is not None:
        digest = file_sha256(spec.path)
        if digest != spec.sha256:
            raise StageFailed(
                f"{spec.path} has sha256 {digest}, but evaluation.feature_weights.sha256 pins {spec.sha256}"
            )
        return spec.path
    try:
        return stack.enter_context(fetch(spec))[0]
    except (urllib.error.URLError, OSError, ChecksumMismatch) as e:
        raise StageFailed(
            f"cannot fetch the Inception weights {spec.url} (sha256 {spec.sha256}): {e}\n"
            f"Without internet access, copy that file onto this machine and set\n"
            f"  evaluation.feature_weights: {{path: <the file>, sha256: {spec.sha256}}}\n"
            f"in params.yaml."
        ) from None


def inception(params, run):
    spec = params.evaluation.weights()
    with contextlib.ExitStack() as stack, atomic_path(FEATURES_DIR, is_dir=True) as tmp:
        try:
            import_inception_weights(inception_weights(spec, stack), tmp)
        except ValueError as e:
            raise StageFailed(str(e)) from None
        identity = write_info(tmp, INCEPTION, spec.sha256, source=spec.url or spec.path, feature_dim=2048)  # pool3
    write_json(metrics("features"), identity)
    run.log_metrics({"feature_dim": identity["feature_dim"]})


def run(params, args, run):
    if params.evaluation.feature_extractor == DIGITS:
        digits_classifier(params, run)
    else:
        inception(params, run)


if __name__ == "__main__":
    run_stage("features", run, doc=__doc__)
