"""The FID/IS/KID feature networks, as torch-fidelity extractors built from a features directory.

A features directory (the `features` stage's output) holds `extractor.json` — the extractor's name and the sha256
of the weights it was made from, i.e. its identity — and the weights as safetensors:
- `distillery-digits`: the toy's digits classifier (distillery/features.py), trained by the pipeline;
- `inception-v3-compat`: torch-fidelity's port of TF Inception-v3 (2015-12-05), from a pinned weights file.
torch-fidelity would fetch its Inception weights through torch.hub without a pin, or unpickle a given path with
`weights_only=False`; here they are read once with `weights_only=True`, checked against the architecture, stored as
safetensors, and the extractor module is handed to torch-fidelity ready-made.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file, save_file
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from distillery.features import load_digits_net
from distillery.registry import DIGITS, EXTRACTORS, INCEPTION

INCEPTION_FILE = "inception.safetensors"
INFO_FILE = "extractor.json"


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity view of a saved DigitsNet: uint8 NCHW in, "features" and "logits_unbiased" out."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        vassert(
            feature_extractor_weights_path is not None,
            f"{name} needs feature_extractor_weights_path (a save_digits_net directory or its weights file)",
        )
        self.net = load_digits_net(feature_extractor_weights_path)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        # Inverse of to_uint8 up to truncation; this is how EDM feeds uint8 data to its networks.
        features, logits = self.net(x.to(torch.float32) / 127.5 - 1)
        outputs = dict(features=features, logits_unbiased=logits)
        return tuple(outputs[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False


# Re-imports (e.g. importlib.reload) must not trip torch-fidelity's duplicate-name check.
if DIGITS not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(DIGITS, DigitsFeatureExtractor)


def inception_from_state_dict(state_dict, features_list):
    """torch-fidelity's Inception module with `state_dict` as its weights (strict: every key, every shape)."""
    # its constructor reads the weights through this module-level function: it gets ours, and no network
    with mock.patch.object(tf_inception, "load_state_dict_from_url", return_value=state_dict):
        return tf_inception.FeatureExtractorInceptionV3(INCEPTION, list(features_list))


def import_inception_weights(path, directory):
    """Read torch-fidelity's weights file `path` (tensors only) and store it in `directory` as safetensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        inception_from_state_dict(state, ["2048"])
    except Exception as e:  # a foreign pickle, a truncated file, other keys or shapes: all refused the same way
        raise ValueError(f"{path} is not torch-fidelity's Inception-v3 weights file: {e}") from None
    save_file({k: v.contiguous() for k, v in state.items()}, str(Path(directory) / INCEPTION_FILE))


def write_info(directory, extractor, weights_sha256, **info):
    info = {"extractor": extractor, "weights_sha256": weights_sha256, **info}
    (Path(directory) / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


@dataclass
class FeatureNet:
    """The extractor of a features directory and which of its features feed FID/KID and IS."""

    extractor: str
    directory: str
    weights_sha256: str
    feature_dim: int
    fid_key: str = ""
    isc_key: str = ""
    modules: dict = field(default_factory=dict, repr=False)  # built once per feature list and device

    def __post_init__(self):
        vassert(self.extractor in EXTRACTORS, f"unknown feature extractor {self.extractor!r} (known: {EXTRACTORS})")
        cls = FEATURE_EXTRACTORS_REGISTRY[self.extractor]
        self.fid_key = self.fid_key or cls.get_default_feature_layer_for_metric("fid")
        self.isc_key = self.isc_key or cls.get_default_feature_layer_for_metric("isc")

    @classmethod
    def load(cls, directory):
        info = json.loads((Path(directory) / INFO_FILE).read_text())
        return cls(info["extractor"], str(directory), info["weights_sha256"], info["feature_dim"])

    def module(self, features_list, cuda=False):
        key = (tuple(features_list), cuda)
        if key not in self.modules:
            if self.extractor == DIGITS:
                net = DigitsFeatureExtractor(DIGITS, list(features_list), self.directory)
            else:
                net = inception_from_state_dict(load_file(str(Path(self.directory) / INCEPTION_FILE)), features_list)
            self.modules[key] = net.cuda() if cuda else net
        return self.modules[key]
