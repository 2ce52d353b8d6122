"""Stage `reference_stats`: feature statistics of the real data for FID (and its features for KID), or EDM's
published statistics (`evaluation.reference: edm-npz`)."""

import numpy as np
import torch

from pipeline.io import atomic_path, write_json
from pipeline.pins import fetch

from distillery.data import load_dataset
from distillery.metrics import extract_features, fid_statistics, load_stats_npz, save_stats_npz, to_uint8

from stages.common import feature_net
from stages.paths import DATASET, REFERENCE_FEATURES, REFERENCE_STATS, metrics
from stages.skeleton import StageFailed, run_stage


def import_edm_npz(params, run):
    """EDM's published statistics (`mu`, `sigma`); KID needs features they do not carry, so it is skipped."""
    with fetch(params.evaluation.reference_download) as (path, digest):  # a first-use pin once the file loaded
        try:
            stats = load_stats_npz(path)
        except (ValueError, KeyError, OSError) as e:  # not an npz, pickled object arrays, no mu/sigma
            url = params.evaluation.reference_download.url
            raise StageFailed(f"{path} ({url}) is not an EDM statistics npz: {e}") from None
        dim = stats["mu"].shape[0]
        if stats["mu"].shape != (dim,) or stats["sigma"].shape != (dim, dim):
            raise StageFailed(
                f"{path}: expected mu [D] and sigma [D, D], got {stats['mu'].shape} and {stats['sigma'].shape}"
            )
    with atomic_path(REFERENCE_STATS) as tmp:
        save_stats_npz(tmp, stats)
    with atomic_path(REFERENCE_FEATURES) as tmp:
        np.savez(tmp, features=np.zeros((0, dim), dtype=np.float32))
    write_json(
        metrics("reference_stats"),
        {"source": params.evaluation.reference_download.url, "sha256": digest, "feature_dim": dim, "num_images": None},
    )
    run.log_metrics({"feature_dim": dim})


def from_data(params, run):
    images, _, _ = load_dataset(DATASET)
    net = feature_net()
    # the real images take the same uint8 round trip as generated ones
    feats = extract_features(to_uint8(torch.from_numpy(images)), net, batch_size=params.evaluation.batch)
    with atomic_path(REFERENCE_STATS) as tmp:
        save_stats_npz(tmp, fid_statistics(feats[net.fid_key]))
    with atomic_path(REFERENCE_FEATURES) as tmp:
        np.savez(tmp, features=feats[net.fid_key])
    info = {"num_images": len(images), "feature_dim": int(feats[net.fid_key].shape[1])}
    write_json(metrics("reference_stats"), info)
    run.log_metrics(info)


def run(params, args, run):
    if params.evaluation.reference == "edm-npz":
        import_edm_npz(params, run)
    else:
        from_data(params, run)


if __name__ == "__main__":
    run_stage("reference_stats", run, doc=__doc__)
