"""Pinned downloads: every fetched file is verified against a sha256 before anything reads it.

A pin comes from params (`sha256:`) or, failing that, from `downloads.lock.json`, where the first
download of a URL records the hash it found (trust on first use, announced loudly), once the file has
proved usable (the pickle converted, the weights imported). Commit that file: later runs, on any machine,
then refuse bytes that differ.
"""

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from pipeline.io import file_hash, write_json

from distillery.download import download

PINS = Path("downloads.lock.json")
DOWNLOADS = Path("downloads")
SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def recorded_pins():
    """{url: sha256} of downloads.lock.json; a file that is not that exits 2 naming it, before any download."""
    if not PINS.exists():
        return {}
    try:
        pins = json.loads(PINS.read_text())
    except ValueError as e:
        problem = f"not valid JSON ({e})"
    else:
        if isinstance(pins, dict) and all(isinstance(v, str) and SHA256.fullmatch(v) for v in pins.values()):
            return pins
        problem = "not a mapping of URL to sha256 (64 hex digits)"
    print(f"{PINS}: {problem}; restore it (git checkout {PINS}) or correct it", file=sys.stderr)
    raise SystemExit(2)


def file_sha256(path):
    return file_hash(path, "sha256")


@contextmanager
def fetch(spec, directory=DOWNLOADS):
    """The local path of `spec.url` (a params `Download`), downloaded if needed and verified: yields (path, sha256).
    Refuses a file whose hash differs from the pin (params first, then the lock file).

    Without a pin, the with-block is the check that the file is usable (the caller converts or imports it): the
    hash is recorded in downloads.lock.json only when the block succeeds; when it fails, the file is deleted."""
    pins = recorded_pins()
    pin = spec.sha256 or pins.get(spec.url)
    dest = Path(directory) / Path(urlparse(spec.url).path).name
    if dest.exists() and pin and file_sha256(dest) == pin:
        yield dest, pin
        return
    dest.unlink(missing_ok=True)  # a cached file that fails its pin is fetched again, then checked again
    digest = download(spec.url, dest, sha256=pin)
    if pin is not None:
        yield dest, digest
        return
    try:
        yield dest, digest
    except BaseException:
        dest.unlink(missing_ok=True)  # unpinned bytes that did not prove usable are not kept
        raise
    write_json(PINS, {**pins, spec.url: digest})
    print(
        f"WARNING: no sha256 pinned for {spec.url}\n"
        f"WARNING: recorded {digest} in {PINS} on first download; commit it (or set sha256 in "
        f"params.yaml) so that later downloads are verified against it",
        file=sys.stderr,
    )
