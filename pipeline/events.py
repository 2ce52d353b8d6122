"""What a stage process tells the Prefect flow that runs it: one line per event on stdout, read by the flow.

Only under `distillery run` (which sets DISTILLERY_EVENTS): under plain `dvc repro` nothing is printed.
"""

import json
import os
import sys
import time

PREFIX = "::distillery-event:: "


def enabled():
    return os.environ.get("DISTILLERY_EVENTS") == "1"


def emit(kind, **data):
    if enabled():
        print(PREFIX + json.dumps({"kind": kind, **data}, default=float), file=sys.stdout, flush=True)


def parse(line):
    """(text, event) of a line of stage output: the ordinary text, and the event at its end or None. The event
    may follow text without a line break (a progress bar on stderr, merged into the same pipe)."""
    text, sep, payload = line.partition(PREFIX)
    if not sep:
        return line, None
    try:
        return text, json.loads(payload)
    except json.JSONDecodeError:
        return line, None


class Progress:
    """Training progress (kimg of total, images/s, ETA, latest monitoring FID), sent at most every `every` s."""

    def __init__(self, stage, total_kimg, every=5.0):
        self.stage, self.total, self.every = stage, total_kimg, every
        self.fid = None
        self._start = time.perf_counter()
        self._start_kimg = None  # a resumed run counts its speed from where it resumed
        self._sent = -float("inf")

    def update(self, kimg, fid=None, force=False):
        if fid is not None:
            self.fid = fid
        if self._start_kimg is None:
            self._start_kimg, self._start = kimg, time.perf_counter()
        now = time.perf_counter()
        if not enabled() or (now - self._sent < self.every and not force):
            return
        self._sent = now
        rate = (kimg - self._start_kimg) * 1000 / (now - self._start) if now > self._start else 0.0
        emit(
            "progress",
            stage=self.stage,
            kimg=kimg,
            total_kimg=self.total,
            images_per_s=rate,
            eta_s=(self.total - kimg) * 1000 / rate if rate > 0 else None,
            fid=self.fid,
        )
