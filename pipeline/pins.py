"""Pinned downloads: every fetched file is verified against a sha256 before anything reads it.

A pin comes from params (`sha256:`) or, failing that, from `downloads.lock.json`, where the first
download of a URL records the hash it found (trust on first use, announced loudly). Commit that file:
later runs, on any machine, then refuse bytes that differ.
"""

import json
import sys
from pathlib import Path
from urllib.parse import urlparse

from pipeline.io import file_hash, write_json

from distillery.download import download

PINS = Path("downloads.lock.json")
DOWNLOADS = Path("downloads")


def recorded_pins():
    return json.loads(PINS.read_text()) if PINS.exists() else {}


def file_sha256(path):
    return file_hash(path, "sha256")


def fetch(spec, directory=DOWNLOADS):
    """The local path of `spec.url` (a params `Download`), downloaded if needed and verified; returns
    (path, sha256). Refuses a file whose hash differs from the pin (params first, then the lock file)."""
    pins = recorded_pins()
    pin = spec.sha256 or pins.get(spec.url)
    dest = Path(directory) / Path(urlparse(spec.url).path).name
    if dest.exists() and pin and file_sha256(dest) == pin:
        return dest, pin
    dest.unlink(missing_ok=True)  # a cached file that fails its pin is fetched again, then checked again
    digest = download(spec.url, dest, sha256=pin)
    if pin is None:
        write_json(PINS, {**pins, spec.url: digest})
        print(
            f"WARNING: no sha256 pinned for {spec.url}\n"
            f"WARNING: recorded {digest} in {PINS} on first download; commit it (or set sha256 in "
            f"params.yaml) so that later downloads are verified against it",
            file=sys.stderr,
        )
    return dest, digest
