"""The study page in a real headless Chromium (Playwright driving Debian's /usr/bin/chromium): a participant votes
through every item with keys and clicks, goes back once, reloads, downloads the votes; the import counts exactly
those votes, unblinded by the key. Markup in a label or in the question shows as text and runs nothing."""

import json
import time

import numpy as np
import pytest
from browser import chromium, needs_chromium

from pipeline.preference_params import PreferenceParams

from stages.preference import PAGE, write_study
from stages.preference_report import build, markdown

pytestmark = [
    needs_chromium,
    pytest.mark.timeout(120),
]
KEYS = {"left": "ArrowLeft", "right": "ArrowRight", "tie": "ArrowDown"}
EVIL = (
    '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"><b>bold</b> & \u2028 "quoted"'
)


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def study(tmp_path, **overrides):
    rng = np.random.default_rng(0)
    for name in ("teacher", "sid-1e-4"):
        (tmp_path / "samples").mkdir(exist_ok=True)
        np.savez(
            tmp_path / "samples" / f"{name}.npz",
            images=rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8),
            seeds=np.arange(20, dtype=np.int64),
            labels=np.arange(20) % 2,
        )
    section = PreferenceParams(
        **{
            "items": 6,
            "attention_checks": 2,
            "samples_dir": str(tmp_path / "samples"),
            "output_dir": str(tmp_path / "preference"),
            "votes_dir": str(tmp_path / "votes"),
            "label_names": ["zero", "one"],
            **overrides,
        }
    )
    folder, _ = write_study(section, section.pairs[0])
    return section, folder, json.loads((folder / "key.json").read_text())


def open_page(browser, folder):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto((folder / PAGE).resolve().as_uri())
    return context, page, errors


def current_item(page):
    return page.get_attribute("#vote", "data-item")


def reopen(context, page, folder, answered, errors, timeout=10.0):
    """The study opened in a new tab once the browser has stored the answer to `answered`, the old tab closed.

    Chromium hands a tab's localStorage writes to its browser process asynchronously: a page opened within
    milliseconds of the last vote may not see it yet, so the new tab is opened until it does (or `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        fresh = context.new_page()
        fresh.on("pageerror", lambda e: errors.append(str(e)))
        fresh.goto((folder / PAGE).resolve().as_uri())
        if fresh.is_visible("#vote") and current_item(fresh) != answered:
            page.close()
            return fresh
        fresh.close()
        assert time.monotonic() < deadline, "the answers given before closing the tab were not kept"
        time.sleep(0.2)


def test_votes_by_keys_and_clicks_are_downloaded_imported_and_unblinded(browser, tmp_path):
    section, folder, key = study(tmp_path)
    items = {i["id"]: i for i in key["items"]}
    context, page, errors = open_page(browser, folder)
    page.fill("#rater", "alice")
    page.click("#start")
    votes = {}
    for step in range(len(items)):
        item = current_item(page)
        assert page.text_content("#count") == f"Pair {step + 1} of {len(items)}"
        assert page.text_content("#prompt") in ("zero", "one")
        # attention checks answered attentively; comparisons cycle through the three answers
        choice = items[item]["expected"] or ("left", "right", "tie")[step % 3]
        if step == 2:  # a first answer, taken back with Backspace and changed
            page.keyboard.press(KEYS["tie" if choice != "tie" else "left"])
            page.keyboard.press("Backspace")
            assert current_item(page) == item
        if step % 2:
            page.click(f"#{choice}")
        else:
            page.keyboard.press(KEYS[choice])
        votes[item] = choice
        if step == 3:  # votes survive closing the page and opening it again
            page = reopen(context, page, folder, item, errors)
    assert page.is_visible("#done") and not page.is_visible("#vote")
    with page.expect_download() as download:
        page.click("#download")
    path = tmp_path / "votes" / download.value.suggested_filename
    download.value.save_as(path)
    context.close()
    assert errors == []

    lines = path.read_text().splitlines()
    assert lines[0] == "study,item,rater,choice" and len(lines) == 1 + len(items)
    assert {tuple(line.split(",")) for line in lines[1:]} == {(key["study"], i, "alice", c) for i, c in votes.items()}
    analysis, files, n = build(section)
    assert files == [path] and n == len(items) and not analysis.excluded
    expected = {"teacher": 0, "tie": 0, "sid-1e-4": 0}
    for item, choice in votes.items():
        if items[item]["kind"] == "comparison":
            expected[items[item][choice] if choice != "tie" else "tie"] += 1
    (pair,) = analysis.pairs
    assert (pair.a_wins, pair.ties, pair.b_wins) == (expected["teacher"], expected["tie"], expected["sid-1e-4"])
    assert (
        f"| teacher | sid-1e-4 | 6 | {expected['teacher']} | {expected['tie']} | {expected['sid-1e-4']} |"
        in markdown(analysis, section, files, n)
    )


def test_markup_in_labels_and_question_shows_as_text_and_runs_nothing(browser, tmp_path):
    question = '<img src=x onerror="window.__pwned = 3">Which is <i>better</i>?'
    section, folder, key = study(tmp_path, label_names=[EVIL, EVIL], question=question, attention_checks=0, items=2)
    assert "<script>window" not in (folder / PAGE).read_text()
    context, page, errors = open_page(browser, folder)
    assert page.text_content(".question") == question
    page.click("#start")
    for _ in range(2):
        assert page.text_content("#prompt") == EVIL
        assert page.evaluate("document.querySelectorAll('#prompt *, .question *').length") == 0
        page.keyboard.press("ArrowLeft")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.evaluate("document.scripts.length") == 2 and page.evaluate("document.images.length") == 2
    context.close()
    assert errors == []
