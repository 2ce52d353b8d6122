"""The participant's study page: one self-contained HTML file that works opened from disk, with no server.

Text reaches the page only through html.escape (static markup) or JSON read by the script and shown with
textContent; a Content-Security-Policy allows only this file's own script and style (by hash), so markup
smuggled in through a label could neither render nor run.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json

from distillery.preference.images import png_data_uri
from distillery.preference.study import Study

PAGE_CSV_HEADER = ("study", "item", "rater", "choice")
RATER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"  # no CSV quoting or spreadsheet formula can arise

SCRIPT = r"""
(() => {
  const study = JSON.parse(document.getElementById("study-data").textContent);
  const items = study.items;
  const storeKey = "distillery-preference/" + study.study;
  const $ = (id) => document.getElementById(id);
  const sections = {intro: $("intro"), vote: $("vote"), done: $("done")};

  let storage = null;
  try {
    storage = window.localStorage;
    storage.setItem(storeKey + "/probe", "1");
    storage.removeItem(storeKey + "/probe");
  } catch (e) { storage = null; }

  function loadState() {
    try {
      const saved = storage && JSON.parse(storage.getItem(storeKey));
      if (saved && typeof saved.rater === "string" && saved.votes && typeof saved.position === "number") return saved;
    } catch (e) { /* a damaged entry starts the study afresh */ }
    return {rater: "", position: 0, votes: {}};
  }
  const state = loadState();

  function save() {
    if (storage) storage.setItem(storeKey, JSON.stringify(state));
    const answered = Object.keys(state.votes).length;
    $("saved").textContent = storage
      ? answered + " of " + items.length + " answers saved in this browser."
      : "This browser does not keep your answers: download them before closing the page.";
    $("download").disabled = answered === 0;
  }

  function show(name) {
    for (const [key, section] of Object.entries(sections)) section.hidden = key !== name;
  }

  function render() {
    if (!state.rater) { show("intro"); $("rater").focus(); save(); return; }
    if (state.position >= items.length) { show("done"); $("download").focus(); save(); return; }
    const item = items[state.position];
    sections.vote.dataset.item = item.id;
    $("left-img").src = item.left;
    $("right-img").src = item.right;
    $("prompt").textContent = item.prompt;
    $("prompt").hidden = item.prompt === "";
    $("count").textContent = "Pair " + (state.position + 1) + " of " + items.length;
    $("bar").value = state.position;
    $("back").disabled = state.position === 0;
    for (const side of ["left", "right", "tie"]) $(side).classList.toggle("chosen", state.votes[item.id] === side);
    show("vote");
    save();
  }

  function vote(choice) {
    if (sections.vote.hidden) return;
    state.votes[items[state.position].id] = choice;
    state.position += 1;
    render();
  }

  function back() {
    if (state.position > 0) { state.position -= 1; render(); }
  }

  function start() {
    const code = $("rater").value.trim();
    if (code && !RATER.test(code)) {
      $("rater-error").textContent = "Use letters, digits and . _ - @ only (at most 64 characters).";
      return;
    }
    const random = crypto.getRandomValues(new Uint32Array(2));
    state.rater = code || "anon-" + Array.from(random, (x) => x.toString(16).padStart(8, "0")).join("");
    render();
  }

  function download() {
    const rows = [HEADER.join(",")];
    for (const item of items) {
      if (item.id in state.votes) rows.push([study.study, item.id, state.rater, state.votes[item.id]].join(","));
    }
    const blob = new Blob([rows.join("\n") + "\n"], {type: "text/csv"});
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "votes-" + study.study + "-" + state.rater + ".csv";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  $("start").addEventListener("click", start);
  $("rater").addEventListener("keydown", (e) => { if (e.key === "Enter") start(); });
  $("left").addEventListener("click", () => vote("left"));
  $("right").addEventListener("click", () => vote("right"));
  $("tie").addEventListener("click", () => vote("tie"));
  $("back").addEventListener("click", back);
  $("download").addEventListener("click", download);
  document.addEventListener("keydown", (e) => {
    if (sections.vote.hidden || e.repeat || e.altKey || e.ctrlKey || e.metaKey) return;
    const choice = {ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie"}[e.key];
    if (choice) { e.preventDefault(); vote(choice); }
    else if (e.key === "Backspace") { e.preventDefault(); back(); }
  });
  render();
})();
"""

STYLE = """
body { font: 16px/1.45 system-ui, sans-serif; margin: 0; background: #f4f4f6; color: #1d1d22; }
main { max-width: 46rem; margin: 0 auto; padding: 1.5rem; }
h1 { font-size: 1.3rem; margin: 0 0 .25rem; }
.question { font-size: 1.15rem; font-weight: 600; margin: .25rem 0 1rem; }
kbd { border: 1px solid #aaa; border-bottom-width: 2px; border-radius: 4px; padding: 0 .3em; background: #fff;
      font: .85em ui-monospace, monospace; }
button { font: inherit; cursor: pointer; border: 1px solid #999; border-radius: 8px; background: #fff;
         padding: .45rem 1rem; }
button:disabled { cursor: default; opacity: .45; }
button:focus-visible { outline: 3px solid #3b6fd8; outline-offset: 2px; }
.progress { display: flex; align-items: center; gap: .75rem; }
progress { flex: 1; height: .8rem; }
#prompt { font-size: 1.1rem; text-align: center; margin: 1rem 0 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.pair { display: flex; justify-content: center; gap: 2.5rem; margin: 1.25rem 0; }
.choice { display: flex; flex-direction: column; align-items: center; gap: .5rem; padding: .75rem; border-width: 2px; }
.choice:hover, .choice.chosen, #tie.chosen { border-color: #3b6fd8; background: #eef3ff; }
.choice img { width: %(px)dpx; height: %(px)dpx; image-rendering: pixelated; background: #000; }
.actions { display: grid; grid-template-columns: 1fr auto 1fr; align-items: center; }
.actions #back { justify-self: start; }
.error { color: #b00020; }
footer { margin-top: 2rem; padding-top: 1rem; border-top: 1px solid #ccc; display: flex; align-items: center;
         gap: 1rem; font-size: .9rem; color: #555; }
"""

BODY = """<main>
<header>
<h1>Image comparison</h1>
<p class="question">%(question)s</p>
</header>
<section id="intro">
<p>You will see %(n)d pairs of images, one pair at a time. For each pair, pick the image that answers the question
better.</p>
<ul>
<li>Click the better image, or press <kbd>&larr;</kbd> for the left one and <kbd>&rarr;</kbd> for the right one.</li>
<li>If both are equally good, or you cannot tell them apart, click <b>Tie</b> or press <kbd>&darr;</kbd>.</li>
<li><kbd>Backspace</kbd> or <b>Back</b> returns to the previous pair to change your answer.</li>
<li>Your answers are kept in this browser as you go. At the end, press <b>Download my votes</b> and send the file
to the person running the study.</li>
</ul>
<p><label>Participant code (optional) <input id="rater" autocomplete="off" maxlength="64"></label>
<button id="start">Start</button></p>
<p id="rater-error" class="error"></p>
</section>
<section id="vote" hidden>
<div class="progress"><span id="count"></span><progress id="bar" max="%(n)d" value="0"></progress></div>
<p id="prompt"></p>
<div class="pair">
<button id="left" class="choice"><img id="left-img" alt="left image"><span>Left <kbd>&larr;</kbd></span></button>
<button id="right" class="choice"><img id="right-img" alt="right image"><span>Right <kbd>&rarr;</kbd></span></button>
</div>
<div class="actions">
<button id="back">Back</button>
<button id="tie">Tie / can&#x27;t tell <kbd>&darr;</kbd></button>
</div>
</section>
<section id="done" hidden>
<h2>Thank you: all %(n)d pairs are rated.</h2>
<p>Press <b>Download my votes</b> to save your answers as a file, and send that file to the person running the
study.</p>
</section>
<footer><button id="download" disabled>Download my votes</button><span id="saved"></span></footer>
</main>"""


def script_json(data) -> str:
    """JSON that cannot end its <script> element: `<`, `>` and `&` become \\u escapes; ensure_ascii escapes
    every non-ASCII character, U+2028/2029 included."""
    text = json.dumps(data, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def render_page(study: Study, question: str, image_px: int) -> str:
    """The study page: every item of `study` in its order, images upscaled to `image_px` without smoothing."""
    data = {
        "study": study.study_id,
        "items": [
            {"id": i.id, "left": png_data_uri(i.left), "right": png_data_uri(i.right), "prompt": i.prompt}
            for i in study.items
        ],
    }
    script = (
        f'\n"use strict";\nconst HEADER = {json.dumps(list(PAGE_CSV_HEADER))};\n'
        f"const RATER = /{RATER_PATTERN}/;" + SCRIPT
    )
    style = STYLE % {"px": image_px}
    csp = (
        f"default-src 'none'; img-src data:; style-src {_sha256(style)}; script-src {_sha256(script)}; "
        f"base-uri 'none'; form-action 'none'"
    )
    body = BODY % {"question": html.escape(question), "n": len(study.items)}
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp)}">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="referrer" content="no-referrer">\n'
        f"<title>Image comparison</title>\n<style>{style}</style>\n</head>\n<body>\n{body}\n"
        f'<script type="application/json" id="study-data">{script_json(data)}</script>\n'
        f"<script>{script}</script>\n</body>\n</html>\n"
    )
