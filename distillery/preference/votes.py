"""Returned votes in the three formats the study hands out, validated all together before any is used.

- the study page's download: CSV `study,item,rater,choice`;
- a Label Studio JSON export of the project built from labelstudio/ (one vote per submitted annotation);
- an MTurk batch results CSV of the batch built from mturk/ (columns Input.study, Input.item, WorkerId,
  AssignmentStatus, Answer.choice; rejected assignments are not votes).

Any problem in any file (unknown study or item, a duplicate vote of one rater on one item, a malformed row)
raises one VotesError naming every file and line at fault, so that nothing is half-imported.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from distillery.preference.manifests import LABEL_STUDIO_CHOICES
from distillery.preference.page import PAGE_CSV_HEADER, RATER_PATTERN
from distillery.preference.study import CHOICES, StudyKey

MTURK_REQUIRED = ("Input.study", "Input.item", "WorkerId", "AssignmentStatus", "Answer.choice")
SHOWN_ERRORS = 30


@dataclass(frozen=True)
class Vote:
    source: str  # file
    line: int  # line in that file where the vote's row (CSV) or task (JSON) starts
    study: str
    item: str
    rater: str  # prefixed with the tool ("page:", "labelstudio:", "mturk:"): IDs of two tools never merge
    choice: str  # left, right or tie


class VotesError(Exception):
    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:SHOWN_ERRORS]
        more = [f"... and {len(problems) - SHOWN_ERRORS} more"] if len(problems) > SHOWN_ERRORS else []
        super().__init__(
            "\n".join(
                [
                    f"{len(problems)} problem(s) in the vote files; nothing was imported:",
                    *[f"  {p}" for p in shown],
                    *more,
                ]
            )
        )


class _Problems(list):
    def add(self, source, line, message):
        self.append((str(source), line, message))


def _csv_rows(path: Path, text: str, problems: _Problems):
    """(line, row dict) of every non-blank row of a CSV file after its header; a row whose number of fields
    differs from the header's is refused."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                problems.add(path, reader.line_num, f"expected {len(header)} fields, got {len(fields)}")
            else:
                yield reader.line_num, dict(zip(header, fields, strict=True))
    except csv.Error as e:
        problems.add(path, reader.line_num, f"not valid CSV: {e}")


def _page_votes(path, text, problems):
    rater_ok = re.compile(RATER_PATTERN)
    for line, row in _csv_rows(path, text, problems):
        if not rater_ok.match(row["rater"]):
            problems.add(path, line, f"invalid rater code {row['rater']!r}")
            continue
        yield Vote(str(path), line, row["study"], row["item"], f"page:{row['rater']}", row["choice"])


def _mturk_votes(path, text, problems):
    for line, row in _csv_rows(path, text, problems):
        if row["AssignmentStatus"] == "Rejected":
            continue
        if not row["WorkerId"]:
            problems.add(path, line, "empty WorkerId")
            continue
        yield Vote(
            str(path), line, row["Input.study"], row["Input.item"], f"mturk:{row['WorkerId']}", row["Answer.choice"]
        )


def _json_elements(path, text, problems):
    """(line, element) of a top-level JSON array; the line of each element is where it starts."""
    decoder = json.JSONDecoder()

    def line_of(pos):
        return text.count("\n", 0, pos) + 1

    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        problems.add(path, line_of(pos), "a Label Studio export must be a JSON list of tasks")
        return
    pos = _skip_space(text, pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            element, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            problems.add(path, e.lineno, f"not valid JSON: {e.msg}")
            return
        yield line_of(pos), element
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif text.startswith("]", pos) and not text[_skip_space(text, pos + 1) :]:
            return
        else:
            problems.add(path, line_of(pos), "not valid JSON: expected ',' or the closing ']' of the task list")
            return


def _skip_space(text, pos):
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _label_studio_votes(path, text, problems):
    for line, task in _json_elements(path, text, problems):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or not isinstance(task.get("annotations", []), list):
            problems.add(path, line, "a task needs a `data` object and an `annotations` list")
            continue
        for n, annotation in enumerate(task.get("annotations", []), 1):
            where = f"task {task.get('id', '?')}, annotation {n}"
            if not isinstance(annotation, dict):
                problems.add(path, line, f"{where}: not an object")
                continue
            if annotation.get("was_cancelled"):
                continue  # a skipped task carries no vote
            user = annotation.get("completed_by")
            user = user.get("id") if isinstance(user, dict) else user
            results = annotation.get("result") if isinstance(annotation.get("result"), list) else []
            picked = [
                r["value"].get("choices")
                for r in results
                if isinstance(r, dict)
                and r.get("from_name") == "choice"
                and r.get("type") == "choices"
                and isinstance(r.get("value"), dict)
            ]
            if isinstance(user, bool) or not isinstance(user, (int, str)) or user == "":
                problems.add(path, line, f"{where}: no annotator in `completed_by`")
            elif (
                len(picked) != 1
                or not isinstance(picked[0], list)
                or len(picked[0]) != 1
                or picked[0][0] not in LABEL_STUDIO_CHOICES
            ):
                problems.add(
                    path, line, f"{where}: expected exactly one `choice` of {list(LABEL_STUDIO_CHOICES)}, got {picked}"
                )
            else:
                yield Vote(
                    str(path),
                    line,
                    str(data.get("study", "")),
                    str(data.get("item", "")),
                    f"labelstudio:{user}",
                    LABEL_STUDIO_CHOICES[picked[0][0]],
                )


def _parse(path: Path, problems: _Problems):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        problems.add(path, 1, f"cannot read: {e}")
        return []
    if path.suffix == ".json":
        return list(_label_studio_votes(path, text, problems))
    header = next(csv.reader(io.StringIO(text, newline="")), [])
    if tuple(header) == PAGE_CSV_HEADER:
        return list(_page_votes(path, text, problems))
    if set(MTURK_REQUIRED) <= set(header):
        return list(_mturk_votes(path, text, problems))
    problems.add(
        path,
        1,
        f"unrecognised CSV header {header}: expected the study page's {list(PAGE_CSV_HEADER)} "
        f"or MTurk batch results with {list(MTURK_REQUIRED)}",
    )
    return []


def read_votes(paths, keys: dict[str, StudyKey]) -> list[Vote]:
    """Every vote of every file (.csv: study page or MTurk results; .json: Label Studio export), checked against
    the studies' keys. Raises VotesError listing all problems; returns votes only when there is none."""
    problems = _Problems()
    votes, first_seen = [], {}
    order = {str(Path(p)): n for n, p in enumerate(paths)}
    for path in paths:
        for vote in _parse(Path(path), problems):
            key = keys.get(vote.study)
            if key is None:
                problems.add(vote.source, vote.line, f"unknown study {vote.study!r}")
            elif vote.item not in key.items:
                problems.add(vote.source, vote.line, f"unknown item {vote.item!r} in study {vote.study}")
            elif vote.choice not in CHOICES:
                problems.add(vote.source, vote.line, f"choice must be one of {list(CHOICES)}, got {vote.choice!r}")
            elif (vote.study, vote.rater, vote.item) in first_seen:
                earlier = first_seen[vote.study, vote.rater, vote.item]
                problems.add(
                    vote.source,
                    vote.line,
                    f"duplicate vote of rater {vote.rater} on item {vote.item} "
                    f"(first at {earlier.source}:{earlier.line})",
                )
            else:
                first_seen[vote.study, vote.rater, vote.item] = vote
                votes.append(vote)
    if problems:
        # parse problems are found before the checks against the keys: report in file and line order
        problems.sort(key=lambda p: (order[p[0]], p[1]))
        raise VotesError([f"{source}:{line}: {message}" for source, line, message in problems])
    return votes
