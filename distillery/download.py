"""Resumable, hash-checked HTTP downloads (the only network access of the pipeline: pinned teacher files).

`download` streams into `<dest>.part`, continues an existing `.part` with an HTTP Range request, and
moves the file to `dest` only once its sha256 is known (and matches the pin, when one is given).
"""

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)


class IncompleteDownload(ConnectionError):
    """The connection ended before the announced length; the `.part` file is kept for resuming."""


class ChecksumMismatch(ValueError):
    """The downloaded bytes do not have the pinned sha256; nothing was kept."""


def download(url, dest, sha256=None, progress=True, chunk=1 << 20, retries=3, timeout=60):
    """Download `url` to `dest` and return the file's sha256 (hex).

    Bytes go to `<dest>.part`; an existing `.part` (an earlier, interrupted call) is continued with a
    `Range` request, or restarted when the server answers with the whole file. A broken connection is
    resumed the same way up to `retries` times within this call. With `sha256` pinned, a mismatch
    deletes the `.part`, leaves nothing at `dest` and raises `ChecksumMismatch`.

    WARNING: without a pin nothing vouches for the bytes. The hash is returned (and a warning is
    emitted) so that the caller records it and pins it from then on; never unpickle an unpinned file.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            digest = _fetch(url, part, progress, chunk, timeout)
            break
        except (ConnectionError, TimeoutError, http.client.IncompleteRead) as err:
            if attempt == retries:
                raise
            log.warning("%s: %s; resuming (%d/%d)", url, err, attempt + 1, retries)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise ChecksumMismatch(f"{url}: sha256 {digest} does not match the pinned {sha256.lower()}; file discarded")
    os.replace(part, dest)
    if sha256 is None:
        warnings.warn(f"{url}: no sha256 pinned; the downloaded file has sha256 {digest}: pin it", stacklevel=2)
    return digest


def _fetch(url, part, progress, chunk, timeout):
    """Bring `part` to the full content of `url`, continuing from its current size; the sha256 of the whole."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        # Range not satisfiable: the part is not a prefix of this file (or already whole): start over
        part.unlink()
        return _fetch(url, part, progress, chunk, timeout)

    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored Range and sends the whole file
        elif offset:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != offset:
                got = response.headers.get("Content-Range")
                raise IncompleteDownload(f"{url}: asked for bytes {offset}- but got Content-Range {got!r}")
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None else None

        digest = hashlib.sha256()
        if offset:
            with open(part, "rb") as f:
                while block := f.read(chunk):
                    digest.update(block)
        received = 0
        with (
            open(part, "ab" if offset else "wb") as f,
            tqdm(
                total=offset + length if length is not None else None,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name[: -len(".part")],
                disable=not progress,
            ) as bar,
        ):
            while block := response.read(chunk):
                f.write(block)
                digest.update(block)
                received += len(block)
                bar.update(len(block))
    # http.client returns b"" when the peer closes early, so the announced length is checked here
    if length is not None and received != length:
        raise IncompleteDownload(f"{url}: connection closed after {offset + received} of {offset + length} bytes")
    return digest.hexdigest()
