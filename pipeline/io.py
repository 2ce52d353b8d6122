"""Outputs appear at their final path whole or not at all: write to a temporary sibling, then rename.

A temporary sibling is named `.<final name>.<writer pid>.<random>.tmp`: a writer killed mid-write leaves it
behind, and `remove_debris` deletes it once that pid is no longer running.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

WRITTEN: list[Path] = []  # the files this process put in place, in order (their hashes tag its MLflow run)
TEMP_NAME = re.compile(r"\..+\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp")  # what temp_prefix + tempfile make


def temp_prefix(final):
    """The start of the name of a temporary sibling of `final` (tempfile adds 8 random characters, then `.tmp`)."""
    return f".{Path(final).name}.{os.getpid()}."


def umask():
    """The process's umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final, is_dir=False):
    """Yield a temporary path next to `final`; on success move it into place, on error delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=".tmp", dir=final.parent))
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        # mkdtemp's 0700 must not become the output's: it gets what any file the user creates gets
        os.chmod(target, (0o777 if is_dir else 0o666) & ~umask())
        if is_dir and final.exists():
            # a directory cannot be renamed over a non-empty one: swap through a trash name
            trash = Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=".tmp", dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(target, final)
            shutil.rmtree(trash)
        else:
            os.replace(target, final)
            WRITTEN.append(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def pid_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_debris(root):
    """Delete the temporary siblings under `root` (hidden directories skipped) whose writer is no longer running,
    those a killed stage left; a running writer's stay. Returns the removed paths."""
    removed = []
    for parent, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            found = TEMP_NAME.fullmatch(name)
            if found and not pid_running(int(found["pid"])):
                path = Path(parent) / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return removed


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
