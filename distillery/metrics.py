"""FID / IS / KID through torch-fidelity, with reference statistics stored in EDM's npz layout.

Images enter as uint8 NCHW (the EDM PNG round trip). The feature network is a `FeatureNet` of
distillery/extractors.py: `inception-v3-compat` for the real profiles, `distillery-digits` for the toy.
"""

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.helpers import vassert
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset


def to_uint8(x):
    """Float images in [-1, 1] -> uint8, truncating as EDM does when it writes PNGs."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


class UInt8Images(Dataset):
    """A uint8 [N, C, H, W] tensor as the Dataset torch-fidelity expects (one CHW image per item)."""

    def __init__(self, images):
        vassert(
            torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4,
            "Expecting images as a uint8 torch.Tensor [N, C, H, W]",
        )
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def extract_features(images_uint8, feature_net, batch_size=256):
    """Run the feature network over uint8 images; returns {feature key: float32 array [N, D]}."""
    cuda = torch.cuda.is_available()
    extractor = feature_net.module(dict.fromkeys([feature_net.fid_key, feature_net.isc_key]), cuda=cuda)
    # save_cpu_ram=True keeps the DataLoader in-process: worker processes only cost time on 2 CPU cores.
    features = get_featuresdict_from_dataset(
        UInt8Images(images_uint8.cpu()), extractor, batch_size, cuda=cuda, save_cpu_ram=not cuda, verbose=False
    )
    return {key: value.numpy() for key, value in features.items()}


def fid_statistics(features):
    """Mean and covariance (n-1) of [N, D] features, returned as float64 arrays (EDM's npz dtype).

    The arithmetic is torch-fidelity's on the features as given (float32 features: float32 mean, float64
    covariance), so FIDs agree with its `calculate_metrics` to ~1e-7 (a float64 mean differs by ~1e-6).
    """
    stats = fid_features_to_statistics(torch.from_numpy(np.asarray(features)))
    return dict(mu=stats["mu"].astype(np.float64), sigma=stats["sigma"].astype(np.float64))


def save_stats_npz(path, stats):
    # A file handle stops np.savez from appending ".npz" to the given path.
    with open(path, "wb") as f:
        np.savez(f, mu=stats["mu"], sigma=stats["sigma"])


def load_stats_npz(path):
    with np.load(path, allow_pickle=False) as data:
        return dict(mu=data["mu"], sigma=data["sigma"])


def fid_from_statistics(stats_a, stats_b):
    return fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID]


def inception_score(logits, splits=10):
    """(mean, std) over splits, with torch-fidelity's fixed shuffle (seed 2020)."""
    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits=splits)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def kid(features_a, features_b, subset_size=1000, subsets=100):
    """(mean, std) of the polynomial-kernel MMD² over random subsets (torch-fidelity's seed 2020)."""
    # torch-fidelity rejects subsets larger than either set; small sets use all their samples.
    subset_size = min(subset_size, len(features_a), len(features_b))
    out = kid_features_to_metric(
        torch.from_numpy(np.asarray(features_a)),
        torch.from_numpy(np.asarray(features_b)),
        kid_subsets=subsets,
        kid_subset_size=subset_size,
        verbose=False,
    )
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def precision_recall(generated, real, neighborhood=3):
    """Improved precision and recall (Kynkäänniemi et al. 2019), torch-fidelity's implementation: the share of
    generated features inside the real k-NN manifold, and of real features inside the generated one."""
    out = prc_features_to_metric(
        torch.from_numpy(np.asarray(generated)),
        torch.from_numpy(np.asarray(real)),
        prc_neighborhood=neighborhood,
        save_cpu_ram=True,
        verbose=False,
    )
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])
