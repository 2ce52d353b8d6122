"""Outputs appear at their final path whole or not at all: write to a temporary sibling, then rename."""

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

WRITTEN: list[Path] = []  # the files this process put in place, in order (their hashes tag its MLflow run)


@contextmanager
def atomic_path(final, is_dir=False):
    """Yield a temporary path next to `final`; on success move it into place, on error delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        if is_dir and final.exists():
            # a directory cannot be renamed over a non-empty one: swap through a trash name
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(target, final)
            shutil.rmtree(trash)
        else:
            os.replace(target, final)
            WRITTEN.append(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path, data):
    """Strict JSON: a NaN or ±Inf anywhere in `data` raises ValueError (json.dumps would write `NaN`/`Infinity`,
    which JSON parsers outside Python refuse); the writer turns such values into null where they may occur."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_hash(path, algorithm="sha256"):
    """Hex digest of a file's bytes, read in 1 MiB blocks (sha256 for pins, md5 as DVC records outputs)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
