"""`dvc plots show` renders offline: the real DVC writes dvc_plots/index.html for the built micro project, and a real
headless Chromium (Playwright driving Debian's /usr/bin/chromium) with every non-file request refused shows the
report's figures as images, with no script or link to load from anywhere."""

from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import chromium, needs_chromium

from conftest import copy_project, sh

FIGURES = ["fid_curves", "lr_robustness", "fewstep", "covariate_shift"]
pytestmark = pytest.mark.ui  # a page in a browser, with the UI tests (make test-ui)


class Tags(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def png_size(path):
    data = Path(path).read_bytes()
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture(scope="module")
def plots_page(built_micro, tmp_path_factory):
    """(repo, index.html) of `dvc plots show` in a copy of the built micro project."""
    repo = copy_project(built_micro[0], tmp_path_factory.mktemp("plots") / "repo")
    out = sh(["dvc", "plots", "show"], repo)
    index = repo / "dvc_plots" / "index.html"
    assert index.is_file(), out.stdout + out.stderr
    return repo, index


def test_the_page_loads_nothing_from_the_network(plots_page):
    _, index = plots_page
    tags = Tags()
    tags.feed(index.read_text())
    assert [a for tag, a in tags.tags if tag == "script" and "src" in a] == []  # inline scripts only, if any
    links = [a[key] for _, a in tags.tags for key in ("src", "href") if key in a]
    assert not [link for link in links if "//" in link], links  # no http(s):// nor protocol-relative URL
    images = [a["src"] for tag, a in tags.tags if tag == "img"]
    assert len(images) >= len(FIGURES)
    for figure in FIGURES:
        assert any(Path(src).name.endswith(f"{figure}.png") for src in images), (figure, images)


@needs_chromium
def test_chromium_offline_shows_every_figure(plots_page, tmp_path):
    repo, index = plots_page
    refused = []

    def only_files(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    with chromium() as browser:
        context = browser.new_context(offline=True, viewport={"width": 1400, "height": 900})
        context.route("**/*", only_files)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(index.resolve().as_uri(), wait_until="load")
        images = page.evaluate(
            "Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete,"
            " width: i.naturalWidth, height: i.naturalHeight}))"
        )
        page.screenshot(path=str(tmp_path / "dvc_plots_offline.png"), full_page=True)
    assert refused == [] and errors == []
    assert len(images) >= len(FIGURES)
    assert all(i["complete"] and i["width"] > 0 for i in images), images
    shown = {Path(i["src"]).name: (i["width"], i["height"]) for i in images}
    for figure in FIGURES:
        (name,) = [name for name in shown if name.endswith(f"{figure}.png")]
        assert shown[name] == png_size(repo / "reports" / f"{figure}.png"), figure  # the report's own figure
    assert (tmp_path / "dvc_plots_offline.png").stat().st_size > 0
