"""EDM's geometric augmentation pipe (distillery/augment.py): labels, probabilities and geometry."""

import math

import torch
import torch.nn.functional as F

from distillery.augment import AugmentPipe, augment_geometric


def pixel_grid(H, W):
    # Pixel coordinates (x right, y down) from the image centre, float64 for analytic references.
    y, x = torch.meshgrid(
        torch.arange(H, dtype=torch.float64) - (H - 1) / 2,
        torch.arange(W, dtype=torch.float64) - (W - 1) / 2,
        indexing="ij",
    )
    return x, y


def blobs(H=32, W=32):
    # A smooth, asymmetric image: two Gaussian blobs of different height off the centre.
    x, y = pixel_grid(H, W)
    img = torch.exp(-((x - 5) ** 2 + (y + 4) ** 2) / 32) - 0.6 * torch.exp(-((x + 6) ** 2 + (y - 3) ** 2) / 50)
    return img.float()[None, None]


def test_p0_returns_input_and_zero_labels():
    torch.manual_seed(0)
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    out, labels = AugmentPipe.edm(0)(images)
    assert torch.equal(out, images)
    assert labels.shape == (5, 9) and not labels.any()


def test_label_dim_counts_enabled_kinds_only():
    assert AugmentPipe.edm(0.12).label_dim == 9
    assert AugmentPipe(1, xflip=1).label_dim == 1
    assert AugmentPipe(1, rotate_frac=1, translate_frac=1).label_dim == 4
    assert AugmentPipe(1, xflip=1)(torch.zeros(3, 1, 8, 8))[1].shape == (3, 1)


def test_xflip_mirrors_exactly_as_labelled():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 8, 8)
    out, labels = AugmentPipe(1, xflip=1)(images)
    flipped = labels[:, 0] == 1
    assert set(labels[:, 0].tolist()) == {0.0, 1.0}
    assert 0 < flipped.sum() < 64
    assert torch.equal(out[flipped], images[flipped].flip(3))
    assert torch.equal(out[~flipped], images[~flipped])


def test_integer_translation_is_an_exact_shift_with_reflected_borders():
    # Filters with perfect reconstruction make an integer shift exact up to float rounding (tolerance 1e-5), even
    # at the borders, which show reflected pixels; +x moves the content right, +y down.
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    shifts = [(3, -2), (-1, 4)]
    out = augment_geometric(images, translate=torch.tensor(shifts, dtype=torch.float32))
    for n, (tx, ty) in enumerate(shifts):
        padded = F.pad(images[n : n + 1], [abs(tx)] * 2 + [abs(ty)] * 2, mode="reflect")
        expected = padded[..., abs(ty) - ty : abs(ty) - ty + 16, abs(tx) - tx : abs(tx) - tx + 16]
        torch.testing.assert_close(out[n : n + 1], expected, atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_is_rot90_counter_clockwise():
    # The official pipe rotates counter-clockwise on screen for θ > 0 (label sin θ > 0), i.e. like torch.rot90(k=1)
    # on (H, W), about a point 0.05 px off the centre (see the pivot test): tolerance 0.025 here (0.017 seen).
    img = blobs()
    out = augment_geometric(img, rotate=torch.tensor([math.pi / 2]))
    inner = (..., slice(4, -4), slice(4, -4))
    assert (out - torch.rot90(img, 1, dims=(2, 3)))[inner].abs().max() < 0.025
    assert (out - torch.rot90(img, -1, dims=(2, 3)))[inner].abs().max() > 0.3


def test_constant_image_stays_constant():
    # Reflect padding leaves no empty border for scale, rotation, anisotropy and translation together (as long as
    # the footprint needs a margin below the image size, true of typical draws).
    images = torch.full((4, 2, 32, 32), 0.7)
    out = augment_geometric(
        images,
        scale=torch.tensor([0.85, 1.3, 1.0, 0.9]),
        rotate=torch.tensor([0.4, -2.0, 3.0, 1.0]),
        aniso=torch.tensor([1.15, 0.8, 1.3, 1.0]),
        aniso_angle=torch.tensor([0.5, 0.0, -1.0, 2.0]),
        translate=torch.tensor([[1.5, -2.0], [0.0, 3.3], [-4.0, 0.5], [0.0, 0.0]]),
    )
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_isotropic_scale_matches_the_analytic_image():
    # Scaling by s = 2^(w·0.2) enlarges the content: out(p) = img(p / s), compared where p / s lies inside the image
    # (outside, the reflected border shows). Gaussian of std 4 px; tolerance 0.01 (the 2x bilinear step smooths).
    x, y = pixel_grid(32, 32)
    img = torch.exp(-(x**2 + y**2) / 32).float()[None, None].repeat(2, 1, 1, 1)
    s = 2 ** (0.2 * torch.tensor([1.5, -2.0]))
    out = augment_geometric(img, scale=s)
    for n, sn in enumerate(s.tolist()):
        inside = torch.maximum(x.abs(), y.abs()) / sn < 14
        enlarged, shrunk = (torch.exp(-(x**2 + y**2) / (32 * f**2)).float() for f in (sn, 1 / sn))
        assert (out[n, 0] - enlarged)[inside].abs().max() < 0.01
        assert (out[n, 0] - shrunk)[inside].abs().max() > 0.1


def test_pivot_is_the_official_one():
    # Sample positions follow the official pipe, whose transforms pivot about (15.4509, 15.4509) on 32×32 images
    # (measured on NVlabs/edm training/augment.py), 0.049 px off the centre: sym6's centre of mass is tap 5.098, not 5.
    x, y = pixel_grid(32, 32)
    ramps = torch.stack([x, y]).float()[None] + 15.5  # channel 0: pixel column, channel 1: pixel row
    s = 2**0.2
    out = augment_geometric(ramps, scale=torch.tensor([s]))
    pivot = (out - ramps / s) / (1 - 1 / s)  # a scaling about c maps a ramp to (p - c) / s + c
    official = torch.tensor([15.4509, 15.4509])
    torch.testing.assert_close(pivot[0, :, 8:-8, 8:-8].mean((1, 2)), official, atol=2e-3, rtol=0)


def test_anisotropic_stretch_direction():
    # Stretch by a along the direction at angle r (counter-clockwise on screen), by 1/a across it.
    x, y = pixel_grid(32, 32)
    img = torch.exp(-(x**2 + y**2) / 32).float()[None, None]
    a, r = 1.4, math.pi / 4
    out = augment_geometric(img, aniso=torch.tensor([a]), aniso_angle=torch.tensor([r]))
    u = (x * math.cos(r) - y * math.sin(r)) / a  # along r: (cos r, -sin r) in y-down coordinates
    v = (x * math.sin(r) + y * math.cos(r)) * a
    assert (out[0, 0] - torch.exp(-(u**2 + v**2) / 32).float())[4:-4, 4:-4].abs().max() < 0.01
    # The same stretch at -r (clockwise) differs: the direction convention is observable.
    mirrored = augment_geometric(img, aniso=torch.tensor([a]), aniso_angle=torch.tensor([-r]))
    assert (out - mirrored).abs().max() > 0.1


def test_labels_match_the_applied_transform():
    # The labels are the official parameters: w_s (scale 2^(0.2 w_s)), cos θ - 1, sin θ, w_a (stretch 2^(0.2 w_a)
    # along x here), w_x, w_y in units of 0.125 × image size. Rebuilding the transform from them reproduces it.
    torch.manual_seed(1)
    images = torch.rand(8, 3, 16, 12) * 2 - 1
    pipe = AugmentPipe(1, xflip=1, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1, aniso_rotate_prob=0)
    out, labels = pipe(images)
    assert not labels[:, 6].any()
    rebuilt = augment_geometric(
        images,
        xflip=labels[:, 0],
        yflip=labels[:, 1],
        scale=2 ** (0.2 * labels[:, 2]),
        rotate=torch.atan2(labels[:, 4], labels[:, 3] + 1),
        aniso=2 ** (0.2 * labels[:, 5]),
        translate=labels[:, 7:9] * 0.125 * torch.tensor([12, 16]),
    )
    torch.testing.assert_close(out, rebuilt, atol=1e-4, rtol=0)


def test_official_labels_for_a_seed():
    # Labels of NVlabs/edm training/augment.py (commit 008a4e5) for torch.manual_seed(6), p = 0.5, the EDM
    # configuration, four 1×8×8 images: same random draws in the same order give the same labels.
    official = torch.tensor(
        [
            [0.000000, 0.000000, 0.000000, 0.000000, 0.000000, 0.000000, 0.000000, 0.000000, 0.000000],
            [1.000000, 0.000000, -1.140155, -0.100171, -0.436244, -0.198648, 0.000000, 0.000000, 0.000000],
            [1.000000, 1.000000, -0.165625, 0.000000, 0.000000, -1.563887, -0.198561, 0.538594, 0.039814],
            [0.000000, 0.000000, 0.000000, 0.000000, 0.000000, 0.276822, -0.607869, -0.064848, -0.448082],
        ]
    )
    torch.manual_seed(6)
    _, labels = AugmentPipe.edm(0.5)(torch.zeros(4, 1, 8, 8))
    torch.testing.assert_close(labels, official, atol=2e-6, rtol=0)


def test_enable_rates_and_disabled_labels_for_cifar_p():
    torch.manual_seed(0)
    N, p = 4096, 0.12
    images = torch.rand(N, 1, 8, 8) * 2 - 1
    out, labels = AugmentPipe.edm(p)(images)
    assert labels.shape == (N, 9)

    def near(fraction, q):  # within 4 binomial standard deviations
        return abs(fraction - q) < 4 * math.sqrt(q * (1 - q) / N)

    xflip, yflip, scale, rotate, aniso, translate = (
        labels[:, 0],
        labels[:, 1],
        labels[:, 2],
        labels[:, 3:5],
        labels[:, 5:7],
        labels[:, 7:9],
    )
    assert near(xflip.mean().item(), 0.5)  # xflip=1e8: always decided by a fair coin
    assert near(yflip.mean().item(), p / 2)  # enabled with probability p, then a fair coin
    for enabled in (scale != 0, rotate.any(1), aniso.any(1), translate.any(1)):
        assert near(enabled.float().mean().item(), p)
    # One gate per kind zeroes both of its columns together; rotation labels stay on the unit circle.
    assert torch.equal(rotate[:, 0] != 0, rotate[:, 1] != 0)
    assert torch.equal(translate[:, 0] != 0, translate[:, 1] != 0)
    torch.testing.assert_close((rotate[:, 0] + 1) ** 2 + rotate[:, 1] ** 2, torch.ones(N))
    # The aniso direction is drawn only half of the time (aniso_rotate_prob = 0.5), else along x.
    along_x = (aniso[:, 0] != 0) & (aniso[:, 1] == 0)
    assert near(along_x.float().mean().item(), p / 2)
    # Draws of the enabled samples: N(0, 1) for scale and translation.
    for w in (scale[scale != 0], translate[translate.any(1)].flatten()):
        assert abs(w.mean()) < 0.2 and abs(w.std() - 1) < 0.15
    # A sample with all labels zero is left as it was (up to the resampling's float rounding).
    untouched = ~labels.any(1)
    assert untouched.sum() > N // 5  # about (1/2)(1 - p/2)(1 - p)^4 = 28 %
    torch.testing.assert_close(out[untouched], images[untouched], atol=1e-5, rtol=0)


def test_same_seed_same_bits():
    torch.manual_seed(0)
    images = torch.rand(16, 3, 16, 16) * 2 - 1
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(AugmentPipe.edm(0.5)(images))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])
