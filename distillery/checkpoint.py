"""Network files (safetensors weights + JSON constructor config) and resumable training states.

Nothing here unpickles arbitrary objects: weights are safetensors and training states are read
with `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distillery.networks import build_network


def save_network(directory, net, config, name="network", meta=None):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(directory / f"{name}.safetensors"))
    (directory / "config.json").write_text(
        json.dumps({"network": config, **(meta or {})}, indent=2, sort_keys=True) + "\n"
    )


def load_config(directory):
    return json.loads((Path(directory) / "config.json").read_text())


def load_network(directory, name="network", device="cpu"):
    """The network of a directory written by `save_network`, in eval mode, strict names and shapes."""
    net = build_network(load_config(directory)["network"])
    net.load_state_dict(load_file(str(Path(directory) / f"{name}.safetensors"), device=str(device)), strict=True)
    return net.to(device).eval().requires_grad_(False)


def save_state(path, state):
    """Write a training state (tensors, state dicts, numbers) atomically: temp file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
