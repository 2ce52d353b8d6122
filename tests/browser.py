"""Debian's Chromium driven by Playwright, for the tests of every page we claim works."""

from contextlib import contextmanager
from pathlib import Path

import pytest

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    sync_playwright is None or not CHROMIUM.exists(),
    reason="playwright is not installed (pip install -e '.[test]')"
    if sync_playwright is None
    else "no browser at /usr/bin/chromium (apt-get install chromium)",
)


@contextmanager
def chromium():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser
        finally:
            browser.close()
