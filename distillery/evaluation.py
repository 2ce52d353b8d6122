"""Sample-set metrics: FID, IS, KID against the data, and rel-FID against the teacher's samples."""

import numpy as np

from distillery.metrics import (
    extract_features,
    fid_from_statistics,
    fid_statistics,
    inception_score,
    kid,
    precision_recall,
)


def image_set_metrics(
    images_uint8,
    feature_net,
    reference_stats,
    reference_features,
    *,
    kid_subset_size,
    kid_subsets,
    is_splits,
    teacher_stats=None,
    batch_size=500,
):
    """Metrics of one uint8 image set; returns (metrics dict, FID statistics of the set)."""
    feats = extract_features(images_uint8, feature_net, batch_size=batch_size)
    stats = fid_statistics(feats[feature_net.fid_key])
    is_mean, is_std = inception_score(feats[feature_net.isc_key], splits=is_splits)
    metrics = {
        "fid": fid_from_statistics(stats, reference_stats),
        "is": is_mean,
        "is_std": is_std,
        "kid": None,
        "kid_std": None,
        "precision": None,
        "recall": None,
        "num_samples": len(images_uint8),
    }
    if len(reference_features):  # published reference statistics come without features: no KID then
        # torch-fidelity refuses subsets larger than either set: small sets use all their samples
        subset = min(kid_subset_size, len(images_uint8), len(reference_features))
        metrics["kid"], metrics["kid_std"] = kid(
            feats[feature_net.fid_key], reference_features, subset_size=subset, subsets=kid_subsets
        )
        metrics["kid_subset_size"] = subset
        # diversity beside quality (DDIL's claim): improved precision / recall, k = 3, in the same feature space
        metrics["precision"], metrics["recall"] = precision_recall(feats[feature_net.fid_key], reference_features)
    if teacher_stats is not None:
        metrics["rel_fid"] = fid_from_statistics(stats, teacher_stats)
    return metrics, stats


def fid_only(images_uint8, feature_net, reference_stats, batch_size=500):
    feats = extract_features(images_uint8, feature_net, batch_size=batch_size)
    return fid_from_statistics(fid_statistics(feats[feature_net.fid_key]), reference_stats)


def aggregate_fids(values, how):
    """One FID from independent trials (docs/methods.md §2.1): EDM's minimum, or SiD's mean with its spread
    (standard deviation over trials, ddof = 1; 0 for a single trial)."""
    values = [float(v) for v in values]
    fid = min(values) if how == "min" else float(np.mean(values))
    return {"fid": fid, "fid_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "fid_trials": values}
