"""A small digits CNN used as the `toy` profile's evaluation network (FID/KID features, IS logits).

It plays the role Inception-v3 plays for the real profiles and is never part of a training loss.
Weights are stored with safetensors next to a JSON config, so loading never unpickles anything.
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

WEIGHTS_FILE = "digits_net.safetensors"
CONFIG_FILE = "digits_net.json"


class DigitsNet(nn.Module):
    """CNN on [N, C, H, W] float images in [-1, 1]; returns (features [N, feature_dim], logits [N, num_classes])."""

    def __init__(self, in_channels=1, width=32, feature_dim=64, num_classes=10):
        super().__init__()
        self.config = dict(in_channels=in_channels, width=width, feature_dim=feature_dim, num_classes=num_classes)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width, feature_dim)
        # No output bias: the logits are then the "unbiased" logits IS conventionally uses.
        self.head = nn.Linear(feature_dim, num_classes, bias=False)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.relu(self.conv4(F.relu(self.conv3(x))))
        # Global average pooling (not a flattened map) keeps noise images on few classes, i.e. a low IS.
        features = F.relu(self.fc(x.mean((2, 3))))
        return features, self.head(features)


def _accuracy(net, images, labels, batch_size=512):
    net.eval()
    with torch.no_grad():
        correct = sum(
            int((net(images[i : i + batch_size])[1].argmax(1) == labels[i : i + batch_size]).sum())
            for i in range(0, len(images), batch_size)
        )
    return correct / len(images)


def train_digits_classifier(images, labels, seed, epochs=20, batch_size=64, lr=2e-3, holdout_fraction=0.2):
    """Train a DigitsNet on float [-1, 1] images [N, C, H, W] and int labels; returns (net, metrics).

    A seeded random `holdout_fraction` of the images is kept out of training to measure accuracy.
    Runs on one CPU thread: the result then does not depend on the core count (CPU kernels split
    sums by thread), and these tiny convolutions only get slower with more threads on a busy CPU.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(images, labels, seed, epochs, batch_size, lr, holdout_fraction)
    finally:
        torch.set_num_threads(threads)


def _train(images, labels, seed, epochs, batch_size, lr, holdout_fraction):
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    n_heldout = int(round(holdout_fraction * len(images)))
    heldout, train = order[:n_heldout], order[n_heldout:]

    # Seed the initialisation without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsNet(in_channels=images.shape[1], num_classes=int(labels.max()) + 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)

    for _ in range(epochs):
        net.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(batch_size):
            loss = F.cross_entropy(net(images[batch])[1], labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()

    net.requires_grad_(False)
    metrics = dict(
        heldout_accuracy=_accuracy(net, images[heldout], labels[heldout]),
        train_accuracy=_accuracy(net, images[train], labels[train]),
        n_train=len(train),
        n_heldout=n_heldout,
        seed=seed,
        epochs=epochs,
    )
    return net.eval(), metrics


def save_digits_net(net, directory):
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(directory, WEIGHTS_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(net.config, f, indent=2, sort_keys=True)


def load_digits_net(directory):
    """Load a net saved by `save_digits_net`; `directory` may also be the path of its weights file."""
    if not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        net = DigitsNet(**json.load(f))
    net.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE)))
    net.requires_grad_(False)
    return net.eval()
