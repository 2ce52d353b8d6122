"""Stage `reference_stats`: feature statistics of the real data for FID (and its features for KID)."""

import numpy as np
import torch

from pipeline.io import atomic_path, write_json
from pipeline.params import load_params_or_exit
from pipeline.tracking import stage_run

from distillery.data import load_dataset
from distillery.metrics import extract_features, fid_statistics, save_stats_npz, to_uint8

from stages.common import REFERENCE_FEATURES, REFERENCE_STATS, feature_net
from stages.data import DATASET


def main():
    params = load_params_or_exit()
    images, _, _ = load_dataset(DATASET)
    net = feature_net()
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
