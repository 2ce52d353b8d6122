"""DhariwalUNet (ADM) carries the official ImageNet-64 parameter names and shapes, and runs on tiny shapes."""

import re
from pathlib import Path

import pytest
import torch

from distillery.checkpoint import load_network, save_network
from distillery.networks import build_network, edm_config

from toys import seeded_network

KEYS_FILE = Path(__file__).parent / "data" / "edm_checkpoint_keys.txt"
SECTION = "edm-imagenet-64x64-cond-adm"

# Constructor kwargs of the official ImageNet-64 checkpoint (EDM train.py --arch=adm --fp16, no augmentation).
IMAGENET_ADM = dict(
    img_resolution=64,
    img_channels=3,
    label_dim=1000,
    use_fp16=True,
    model_type="DhariwalUNet",
    model_channels=192,
    channel_mult=[1, 2, 3, 4],
    dropout=0.1,
)


def official_section(name):
    """([(key, shape)] in file order, parameter count) of one section of the reference listing."""
    keys, n_params, inside = [], None, False
    for line in KEYS_FILE.read_text().splitlines():
        header = re.match(r"# (edm-\S+) .*: (\d+) tensors, (\d+) parameters", line)
        if header:
            inside = header.group(1) == name
            if inside:
                n_tensors, n_params = int(header.group(2)), int(header.group(3))
        elif inside and line and not line.startswith("#"):
            key, shape = line.split("\t")
            keys.append((key, tuple(int(s) for s in re.findall(r"\d+", shape))))
    assert len(keys) == n_tensors
    return keys, n_params


def test_imagenet_adm_names_shapes_and_count_equal_official():
    keys, n_params = official_section(SECTION)
    assert n_params == 295_899_267
    # the meta device gives names and shapes without allocating or initialising 296M weights
    with torch.device("meta"):
        net = build_network(IMAGENET_ADM)
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == keys
    assert sum(p.numel() for p in net.parameters()) == n_params
    assert net.use_fp16 and type(net.model).__name__ == "DhariwalUNet"
    # the `adm` architecture preset of the profiles gives the same network
    with torch.device("meta"):
        preset = build_network(edm_config("adm", 64, 3, label_dim=1000, use_fp16=True))
    assert [(k, tuple(v.shape)) for k, v in preset.state_dict().items()] == keys


def tiny_adm(label_dim=5, augment_dim=9):
    config = dict(
        img_resolution=16,
        img_channels=3,
        label_dim=label_dim,
        model_type="DhariwalUNet",
        model_channels=32,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        augment_dim=augment_dim,
        dropout=0.0,
    )
    # ADM zero-initialises its output conv (D would be c_skip·x); random weights make F visible
    return seeded_network(config, perturb=0.1).eval(), config


def test_tiny_adm_forward_shape_and_conditioning():
    net, _ = tiny_adm()
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.5, 1.0, 4.0])
    labels = torch.eye(5)[[0, 2, 4]]
    with torch.no_grad():
        out = net(x, sigma, labels)
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert not torch.allclose(out, net(x, sigma, torch.eye(5)[[1, 1, 1]]))
        assert not torch.allclose(out, net(x, sigma, labels, augment_labels=torch.randn(3, 9)))
        # the batch dimension never mixes samples
        torch.testing.assert_close(net(x[1:2], sigma[1:2], labels[1:2]), out[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("label_dim", [0, 5])
def test_tiny_adm_round_trips_through_the_network_format(tmp_path, label_dim):
    net, config = tiny_adm(label_dim=label_dim, augment_dim=0)
    save_network(tmp_path, net, config)
    loaded = load_network(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    labels = torch.eye(label_dim)[[0, 3]] if label_dim else None
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([0.2, 3.0]), labels), net(x, torch.tensor([0.2, 3.0]), labels))
