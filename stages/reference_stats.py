"""Stage `reference_stats`: feature statistics of the real data for FID (and its features for KID)."""

import numpy as np
import torch

from pipeline.io import atomic_path, write_json
from pipeline.params import load_params_or_exit
from pipeline.pins import fetch
from pipeline.tracking import stage_run

from distillery.data import load_dataset
from distillery.metrics import extract_features, fid_statistics, load_stats_npz, save_stats_npz, to_uint8

from stages.common import REFERENCE_FEATURES, REFERENCE_STATS, feature_net
from stages.data import DATASET


def import_edm_npz(params):
    """EDM's published statistics (`mu`, `sigma`); KID needs features they do not carry, so it is skipped."""
    path, digest = fetch(params.evaluation.reference_download)
    stats = load_stats_npz(path)
    dim = stats["mu"].shape[0]
    if stats["mu"].shape != (dim,) or stats["sigma"].shape != (dim, dim):
        raise SystemExit(f"{path}: expected mu [D] and sigma [D, D], got {stats['mu'].shape} and {stats['sigma'].shape}")
    with atomic_path(REFERENCE_STATS) as tmp:
        save_stats_npz(tmp, stats)
    with atomic_path(REFERENCE_FEATURES) as tmp:
        np.savez(tmp, features=np.zeros((0, dim), dtype=np.float32))
    write_json("metrics/reference_stats.json", {"source": params.evaluation.reference_download.url,
                                                "sha256": digest, "feature_dim": dim, "num_images": None})


def main():
    params = load_params_or_exit()
    if params.evaluation.reference == "edm-npz":
        return import_edm_npz(params)
    images, _, _ = load_dataset(DATASET)
    net = feature_net(params)
    with stage_run("reference_stats", params.model_dump()) as run:
        # the real images take the same uint8 round trip as generated ones
        feats = extract_features(to_uint8(torch.from_numpy(images)), net, batch_size=params.evaluation.batch)
        with atomic_path(REFERENCE_STATS) as tmp:
            save_stats_npz(tmp, fid_statistics(feats[net.fid_key]))
        with atomic_path(REFERENCE_FEATURES) as tmp:
            np.savez(tmp, features=feats[net.fid_key])
        info = {"num_images": len(images), "feature_dim": int(feats[net.fid_key].shape[1])}
        write_json("metrics/reference_stats.json", info)
        run.log_metrics(info)


if __name__ == "__main__":
    main()
