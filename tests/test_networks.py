"""Our EDM networks carry the official parameter names and shapes, and EDMPrecond obeys EDM Table 1."""

import re
from pathlib import Path

import pytest
import torch

from distillery.networks import build_network, edm_config, edm_scalings

from toys import tiny_edm

KEYS_FILE = Path(__file__).parent / "data" / "edm_checkpoint_keys.txt"


def official_sections():
    """{checkpoint name: (ordered [(key, shape)], parameter count)} from the reference listing."""
    sections, name = {}, None
    for line in KEYS_FILE.read_text().splitlines():
        header = re.match(r"# (edm-\S+) .*: (\d+) tensors, (\d+) parameters", line)
        if header:
            name = header.group(1)
            sections[name] = ([], int(header.group(3)))
        elif line and not line.startswith("#") and name:
            key, shape = line.split("\t")
            sections[name][0].append((key, tuple(int(s) for s in re.findall(r"\d+", shape))))
    return sections


OFFICIAL = official_sections()


def state_shapes(net):
    return [(k, tuple(v.shape)) for k, v in net.state_dict().items()]


@pytest.mark.parametrize("name,label_dim", [("edm-cifar10-32x32-uncond-vp", 0), ("edm-cifar10-32x32-cond-vp", 10)])
def test_cifar10_ddpmpp_names_and_shapes_equal_official(name, label_dim):
    keys, n_params = OFFICIAL[name]
    net = build_network(edm_config("ddpmpp", 32, 3, label_dim=label_dim))
    assert sorted(state_shapes(net)) == sorted(keys)
    assert sum(p.numel() for p in net.parameters()) == n_params


@pytest.mark.parametrize("label_dim,n_params", [(0, 56_397_827), (10, 56_400_643)])
def test_cifar10_ncsnpp_parameter_count_equals_official(label_dim, n_params):
    # docs/methods.md §1.4: counts of edm-cifar10-32x32-{uncond,cond}-ve.pkl
    net = build_network(edm_config("ncsnpp", 32, 3, label_dim=label_dim))
    assert sum(p.numel() for p in net.parameters()) == n_params
    assert "model.map_noise.freqs" in net.state_dict()
    assert "model.enc.16x16_aux_residual.weight" in net.state_dict()


def test_scalings_match_edm_anchors():
    # docs/methods.md §1.1 numerical anchors
    sigma = torch.tensor([2.5, 80.0, 1.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma)
    torch.testing.assert_close(c_skip, torch.tensor([0.03846, 3.9e-5, 0.2], dtype=torch.float64), atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(c_out, torch.tensor([0.49029, 0.49999, 0.4472], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(c_in, torch.tensor([0.39223, 0.0125, 0.8944], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(c_noise, torch.tensor([0.22907, 1.0955, 0.0], dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,label_dim", [("ddpmpp", 0), ("ncsnpp", 0), ("ddpmpp", 10)])
def test_denoiser_is_edm_eq7_around_the_inner_network(arch, label_dim):
    # D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise), EDM eq. 7 with Table 1 at σ_data = 0.5, against the inner UNet
    # called directly. Random weights: the zero-initialised output convolution would leave F ≈ 0, D ≈ c_skip·x.
    net = tiny_edm(arch, label_dim=label_dim, model_channels=16, perturb=0.1).eval()
    torch.manual_seed(1)
    x = torch.randn(5, 1, 8, 8)
    sigma = torch.tensor([0.2, 0.5, 1.0, 2.5, 40.0])
    labels = torch.eye(10)[[1, 2, 3, 4, 5]] if label_dim else None
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out = 0.25 / (s**2 + 0.25), 0.5 * s / (s**2 + 0.25).sqrt()
    c_in, c_noise = 1 / (s**2 + 0.25).sqrt(), sigma.log() / 4
    with torch.no_grad():
        F_x = net.model(c_in * x, c_noise, class_labels=labels)
        # the network term is a sizeable part of D at every σ, so a wrong c_out, c_in or c_noise shows
        assert ((c_out * F_x).flatten(1).norm(dim=1) > 0.05 * (c_skip * x).flatten(1).norm(dim=1)).all()
        assert (F_x.flatten(1).std(dim=1) > 0.1).all()
        torch.testing.assert_close(net(x, sigma, labels), c_skip * x + c_out * F_x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
def test_denoiser_is_preconditioned_identity_at_small_sigma(arch):
    # c_skip → 1 and c_out → 0 as σ → 0: D(x; σ) ≈ x whatever the inner network says (random weights, F ≠ 0)
    net = tiny_edm(arch, model_channels=16, perturb=0.1).eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(net(x, torch.full([4], 1e-4)), x, atol=1e-3, rtol=0)


def test_denoiser_output_depends_on_sigma_and_label_and_is_per_sample():
    net = tiny_edm("ddpmpp", label_dim=10, model_channels=16).eval()
    x = torch.randn(3, 1, 8, 8)
    labels = torch.eye(10)[[1, 2, 3]]
    out = net(x, torch.full([3], 1.0), labels)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert not torch.allclose(out, net(x, torch.full([3], 2.0), labels))
    # the batch dimension never mixes samples
    torch.testing.assert_close(net(x[1:2], torch.full([1], 1.0), labels[1:2]), out[1:2], atol=1e-5, rtol=1e-5)
