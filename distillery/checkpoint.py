"""Network files (safetensors weights + JSON constructor config) and resumable training states.

Nothing here unpickles arbitrary objects: weights are safetensors and training states are read
with `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers.
"""

import hashlib
import json
import os
import re
import shutil
import sys
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


MANIFEST = "manifest.json"
CHECKPOINT_FILE = re.compile(r"nimg-\d{9,}\.pt")


class CheckpointError(Exception):
    """A run's checkpoints exist but none can be resumed from: training must not silently start over."""


class Checkpoints:
    """The resumable states of one training run: `nimg-<9 digits>.pt` files in `directory` and `manifest.json`,
    which lists the run's fingerprint and, newest last, each file with its nimg, size and sha256.

    A file is written whole (temporary file, fsync, rename) before the manifest lists it, and the manifest is
    replaced the same way; a crash in between leaves a file the manifest does not list, removed at the next
    `latest()`. After each save only the newest `keep` checkpoints remain.
    """

    def __init__(self, directory, fingerprint, keep=2):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory, self.fingerprint, self.keep = Path(directory), fingerprint, keep

    def latest(self):
        """The state of the newest checkpoint that passes its check, or None when this run has none.

        Checkpoints of another fingerprint are stale: removed, with one line on stderr, before any of them is
        read. A file failing its size, sha256 or load is skipped for the one before it, with a warning on
        stderr; CheckpointError when the manifest is unreadable or no listed file passes."""
        manifest = self._manifest()
        if manifest is None:
            self._clean([])
            return None
        if manifest["fingerprint"] != self.fingerprint:
            print(
                f"{self.directory}: checkpoints of another run (other params or inputs), removed; training starts "
                "afresh",
                file=sys.stderr,
            )
            self.remove()
            return None
        self._clean(manifest["checkpoints"])
        failures = []
        for entry in reversed(manifest["checkpoints"]):
            path = self.directory / entry["file"]
            failure = self._check(path, entry)
            if failure is None:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as e:  # whatever the reason, a file that does not load cannot be resumed from
                    failure = f"{path} passes its sha256 but does not load ({type(e).__name__}: {e})"
            if failure is None:
                for line in failures:
                    print(f"warning: {line}; resuming from {path} instead", file=sys.stderr)
                return state
            failures.append(failure)
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: {'; '.join(failures) or 'the manifest lists none'}. "
            f"Delete {self.directory} to start this run afresh."
        )

    def save(self, nimg, state):
        """Write `state` as the checkpoint after `nimg` images, list it last, then delete all but the last `keep`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"nimg-{nimg:09d}.pt"
        _write_atomically(path, lambda f: torch.save(state, f))
        entry = {"file": path.name, "nimg": nimg, "size": path.stat().st_size, "sha256": _sha256(path)}
        # a run resumed from an older checkpoint (the newer ones failed their check) writes the later ones anew
        listed = [e for e in self._listed() if e["nimg"] < nimg] + [entry]
        manifest = {"fingerprint": self.fingerprint, "checkpoints": listed[-self.keep :]}
        text = json.dumps(manifest, indent=2) + "\n"
        _write_atomically(self.directory / MANIFEST, lambda f: f.write(text.encode()))
        self._clean(manifest["checkpoints"])

    def remove(self):
        """Delete the run's checkpoints (the run is done, or they are stale)."""
        shutil.rmtree(self.directory, ignore_errors=True)  # DDP ranks may remove stale ones at the same time

    def _manifest(self):
        """The manifest as written by `save`, None when there is none; CheckpointError when it is not one."""
        try:
            text = (self.directory / MANIFEST).read_text()
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(text)
            if not isinstance(manifest["fingerprint"], str):
                raise TypeError("the fingerprint is not a string")
            for e in manifest["checkpoints"]:
                if e["file"] != f"nimg-{e['nimg']:09d}.pt" or not isinstance(e["size"], int) or len(e["sha256"]) != 64:
                    raise ValueError(f"unexpected entry {e}")
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(
                f"{self.directory / MANIFEST} is not a checkpoint manifest ({type(e).__name__}: {e}). "
                f"Delete {self.directory} to start this run afresh."
            ) from None
        return manifest

    def _listed(self):
        manifest = self._manifest()
        return manifest["checkpoints"] if manifest and manifest["fingerprint"] == self.fingerprint else []

    @staticmethod
    def _check(path, entry):
        """None when the file at `path` has the size and sha256 `entry` lists, else what it has instead."""
        if not path.is_file():
            return f"{path}: expected sha256 {entry['sha256']} ({entry['size']} bytes), found no file"
        size, digest = path.stat().st_size, _sha256(path)
        if (size, digest) != (entry["size"], entry["sha256"]):
            return f"{path}: expected sha256 {entry['sha256']} ({entry['size']} bytes), found {digest} ({size} bytes)"
        return None

    def _clean(self, entries):
        """Delete the checkpoint and temporary files that `entries` does not list (older ones, a crash's leftovers)."""
        if not self.directory.is_dir():
            return
        keep = {e["file"] for e in entries}
        for path in self.directory.iterdir():
            if (CHECKPOINT_FILE.fullmatch(path.name) and path.name not in keep) or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomically(path, write):
    """Call write(binary file) on a temporary sibling of `path`, sync it to disk and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)  # the rename itself reaches the disk
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
