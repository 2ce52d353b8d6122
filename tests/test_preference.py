"""The preference study without a browser: blind, seeded, deterministic study folders; strict vote import from the
page, Label Studio and MTurk; attention screening; Wilson intervals and Bradley–Terry scores."""

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.preference_params import PreferenceParams

from distillery.preference.analysis import (
    Comparison,
    bootstrap_bradley_terry,
    bradley_terry,
    pair_result,
    wilson_interval,
)
from distillery.preference.page import script_json
from distillery.preference.study import BROKEN, BROKEN_SIDE, COMPARISON, IDENTICAL, StudyKey, build_study, load_samples
from distillery.preference.votes import VotesError, read_votes

from stages.preference import write_study
from stages.preference_report import build, markdown

SEEDS = 30


def save_samples(path, seed, labels=True, label_shift=0):
    rng = np.random.default_rng(seed)
    seeds = np.arange(SEEDS)
    arrays = {"images": rng.integers(0, 256, size=(SEEDS, 1, 8, 8), dtype=np.uint8), "seeds": seeds}
    if labels:
        arrays["labels"] = (seeds + label_shift) % 10
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def section_for(tmp_path, pairs=(("teacher", "sid-1e-4"),), **overrides):
    for name in {n for pair in pairs for n in pair}:
        if not (tmp_path / "samples" / f"{name}.npz").exists():
            save_samples(tmp_path / "samples" / f"{name}.npz", seed=len(name))
    return PreferenceParams(
        **{
            "items": 8,
            "attention_checks": 2,
            "pairs": [{"a": a, "b": b} for a, b in pairs],
            "samples_dir": str(tmp_path / "samples"),
            "output_dir": str(tmp_path / "preference"),
            "votes_dir": str(tmp_path / "votes"),
            "bootstrap": 200,
            **overrides,
        }
    )


def key_of(section, pair=0):
    return json.loads((Path(section.output_dir) / section.pairs[pair].name / "key.json").read_text())


def write_page_votes(path, study, rater, choices):
    """A file as the page downloads it: choices maps item ID → left / right / tie."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("study,item,rater,choice\n" + "".join(f"{study},{i},{rater},{c}\n" for i, c in choices.items()))


def attentive(key):
    """Answers that pass every check and prefer the first system on every comparison."""
    a = key["systems"][0]
    return {i["id"]: i["expected"] or ("left" if i["left"] == a else "right") for i in key["items"]}


# --- params -------------------------------------------------------------------------------------------------


def test_default_params_describe_the_toy_study():
    p = PreferenceParams()
    assert [(q.a, q.b, q.name) for q in p.pairs] == [("teacher", "sid-1e-4", "teacher-vs-sid-1e-4")]
    assert p.pair("teacher", "sid-1e-4") is p.pairs[0]
    with pytest.raises(ValueError, match="configured: teacher-vs-sid-1e-4"):
        p.pair("sid-1e-4", "teacher")


@pytest.mark.parametrize(
    "raw,words",
    [
        ({"pairs": [{"a": "teacher", "b": "teacher"}]}, "different runs"),
        ({"pairs": [{"a": "x", "b": "y"}, {"a": "y", "b": "x"}]}, "listed twice"),
        ({"pairs": [{"a": "../x", "b": "y"}]}, "pattern"),
        ({"pairs": []}, "at least 1"),
        ({"itmes": 3}, "Extra inputs"),
        ({"bootstrap_unit": "pixel"}, "rater"),
    ],
)
def test_bad_preference_params_are_refused(raw, words):
    with pytest.raises(ValidationError, match=words):
        PreferenceParams.model_validate(raw)


# --- the study ----------------------------------------------------------------------------------------------


def test_items_pair_the_same_seed_and_label_with_seeded_sides_and_checks(tmp_path):
    save_samples(tmp_path / "a.npz", 1)
    save_samples(tmp_path / "b.npz", 2)
    a_set, b_set = load_samples(tmp_path / "a.npz", ["zero"] * 10), load_samples(tmp_path / "b.npz", ["zero"] * 10)
    study = build_study("A", a_set, "B", b_set, items=20, attention_checks=6, seed=3)
    assert len({i.id for i in study.items}) == 26 and all(len(i.id) == 10 for i in study.items)
    kinds = [i.kind for i in study.items]
    assert (kinds.count(COMPARISON), kinds.count(BROKEN), kinds.count(IDENTICAL)) == (20, 3, 3)
    assert kinds[:20] != [COMPARISON] * 20  # checks are mixed in, not appended
    for i in study.items:
        pick = {"A": a_set.images[i.seed], "B": b_set.images[i.seed]}
        if i.kind == COMPARISON:
            assert {i.left_system, i.right_system} == {"A", "B"}
            assert np.array_equal(i.left, pick[i.left_system]) and np.array_equal(i.right, pick[i.right_system])
        elif i.kind == IDENTICAL:
            assert i.left_system == i.right_system and np.array_equal(i.left, i.right) and i.expected == "tie"
        else:
            real = "right" if i.left_system == BROKEN_SIDE else "left"
            assert i.expected == real and BROKEN_SIDE in (i.left_system, i.right_system)
    sides = [i.left_system for i in study.items if i.kind == COMPARISON]
    assert 0 < sides.count("A") < 20
    again = build_study("A", a_set, "B", b_set, items=20, attention_checks=6, seed=3)
    assert again.key() == study.key()
    assert build_study("A", a_set, "B", b_set, items=20, attention_checks=6, seed=4).key() != study.key()


def test_mismatched_labels_or_too_few_seeds_are_refused(tmp_path):
    save_samples(tmp_path / "a.npz", 1)
    save_samples(tmp_path / "b.npz", 2, label_shift=1)  # the same seeds, other labels
    a_set, b_set = load_samples(tmp_path / "a.npz"), load_samples(tmp_path / "b.npz")
    with pytest.raises(ValueError, match="seed 0: A has 'class 0' but B has 'class 1'"):
        build_study("A", a_set, "B", b_set, items=3, attention_checks=0, seed=0)
    save_samples(tmp_path / "c.npz", 2, labels=False)
    with pytest.raises(ValueError, match="only one of"):
        build_study("A", a_set, "C", load_samples(tmp_path / "c.npz"), items=3, attention_checks=0, seed=0)
    save_samples(tmp_path / "d.npz", 3)
    with pytest.raises(ValueError, match="share 30 seeds; 28 items \\+ 4 attention checks need 32"):
        build_study("A", a_set, "D", load_samples(tmp_path / "d.npz"), items=28, attention_checks=4, seed=0)


def test_the_study_folder_is_deterministic_and_blind(tmp_path):
    section = section_for(tmp_path, pairs=[("teacher-x", "student-y")])
    folder, study = write_study(section, section.pairs[0])
    first = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    write_study(section, section.pairs[0])
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == first
    assert {str(p) for p in first} == {
        "README.md",
        "key.json",
        "study/index.html",
        "study/labelstudio/tasks.json",
        "study/labelstudio/config.xml",
        "study/mturk/batch.csv",
        "study/mturk/layout.html",
    }
    for path, content in first.items():  # names never reach what participants see
        if path.parts[0] == "study":
            assert b"teacher-x" not in content and b"student-y" not in content, path
    key = json.loads(first[Path("key.json")])
    assert key["study"] == study.study_id and key["systems"] == ["teacher-x", "student-y"]
    tasks = json.loads(first[Path("study/labelstudio/tasks.json")])
    assert [t["data"]["item"] for t in tasks] == [i["id"] for i in key["items"]]
    assert first[Path("study/mturk/batch.csv")].decode().count("\n") == len(key["items"]) + 1


def test_a_failed_build_leaves_no_folder(tmp_path):
    section = section_for(tmp_path, items=40)
    with pytest.raises(ValueError, match="share 30 seeds"):
        write_study(section, section.pairs[0])
    assert not Path(section.output_dir).exists() or not any(Path(section.output_dir).iterdir())


def test_json_in_the_page_cannot_close_its_script_element():
    text = script_json({"prompt": "</script><script>alert(1)</script>&\u2028\u2029"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text and "\u2029" not in text
    assert json.loads(text) == {"prompt": "</script><script>alert(1)</script>&\u2028\u2029"}


# --- votes --------------------------------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path):
    section = section_for(tmp_path)
    write_study(section, section.pairs[0])
    key = key_of(section)
    return section, key, {key["study"]: StudyKey.from_dict(key)}


def test_malformed_rows_are_refused_with_file_and_line_and_nothing_is_imported(built, tmp_path):
    section, key, keys = built
    study, items = key["study"], [i["id"] for i in key["items"]]
    path = tmp_path / "votes" / "bad.csv"
    path.parent.mkdir()
    path.write_text(
        "study,item,rater,choice\n"
        f"{study},{items[0]},alice,left\n"  # line 2: fine
        f"{study},{items[1]},alice,maybe\n"  # 3: unknown choice
        f"{study},nope,alice,left\n"  # 4: unknown item
        f"cafe,{items[2]},alice,left\n"  # 5: unknown study
        f"{study},{items[3]},alice\n"  # 6: a field missing
        f"{study},{items[4]},=cmd|x,left\n"  # 7: not a rater code
        "\n"
        f"{study},{items[0]},alice,right\n"
    )  # 9: alice again on item 0
    with pytest.raises(VotesError) as e:
        read_votes([path], keys)
    lines = [p.split(": ", 1)[0] for p in e.value.problems]
    assert lines == [f"{path}:{n}" for n in (3, 4, 5, 6, 7, 9)], e.value.problems
    message = str(e.value)
    assert "nothing was imported" in message and "choice must be one of" in message and "unknown item 'nope'" in message
    assert f"duplicate vote of rater page:alice on item {items[0]} (first at {path}:2)" in message
    assert "expected 4 fields, got 3" in message


def test_a_duplicate_across_files_is_refused(built, tmp_path):
    section, key, keys = built
    first = {key["items"][0]["id"]: "left"}
    write_page_votes(tmp_path / "votes" / "a.csv", key["study"], "bob", first)
    write_page_votes(tmp_path / "votes" / "b.csv", key["study"], "bob", first)
    with pytest.raises(VotesError, match=r"b\.csv:2: duplicate vote of rater page:bob .* \(first at .*a\.csv:2\)"):
        build(section)


def label_studio_export(key, annotations):
    """A Label Studio JSON export: one task per item with the given annotations (completed_by, choice or None)."""
    tasks = []
    for n, item in enumerate(key["items"], 1):
        results = [
            {
                "id": f"r{n}{user}",
                "completed_by": user,
                "was_cancelled": choice is None,
                "result": []
                if choice is None
                else [{"from_name": "choice", "to_name": "left", "type": "choices", "value": {"choices": [choice]}}],
            }
            for user, choice in annotations(item)
        ]
        tasks.append(
            {
                "id": n,
                "data": {"study": key["study"], "item": item["id"], "left": "…", "right": "…", "prompt": ""},
                "annotations": results,
            }
        )
    return json.dumps(tasks, indent=2)


def test_label_studio_and_mturk_results_import_and_unblind(built, tmp_path):
    section, key, keys = built
    answers = attentive(key)
    label = {"left": "Left", "right": "Right", "tie": "Tie"}
    export = label_studio_export(key, lambda item: [(7, label[answers[item["id"]]]), (8, None)])
    (tmp_path / "votes").mkdir()
    (tmp_path / "votes" / "project-1.json").write_text(export)
    rows = [
        "HITId,AssignmentId,WorkerId,AssignmentStatus,Input.study,Input.item,Input.left,Input.right,"
        "Input.prompt,Answer.choice"
    ]
    for n, item in enumerate(key["items"]):
        rows.append(f"H{n},A{n},W1,Approved,{key['study']},{item['id']},x,y,class 1,{answers[item['id']]}")
        rows.append(f"H{n},B{n},W2,Rejected,{key['study']},{item['id']},x,y,class 1,left")
    (tmp_path / "votes" / "batch-results.csv").write_text("\n".join(rows) + "\n")
    analysis, files, votes = build(section)
    assert len(files) == 2 and votes == 2 * len(key["items"])
    assert set(analysis.raters) == {"labelstudio:7", "mturk:W1"} and not analysis.excluded
    (pair,) = analysis.pairs
    assert (pair.a, pair.votes, pair.a_wins, pair.ties, pair.b_wins) == ("teacher", 16, 16, 0, 0)


def test_label_studio_problems_name_the_line_of_the_task(built, tmp_path):
    section, key, keys = built
    export = label_studio_export(key, lambda item: [(7, "Left" if item is not key["items"][2] else "Maybe")])
    (tmp_path / "votes").mkdir()
    path = tmp_path / "votes" / "export.json"
    path.write_text(export)
    third = [n for n, text in enumerate(export.splitlines(), 1) if text == "  {"][2]  # where task 3 starts
    with pytest.raises(VotesError, match=rf"export\.json:{third}: task 3, annotation 1: expected exactly one "):
        build(section)
    path.write_text(export[:-20])
    with pytest.raises(VotesError, match=r"export\.json:\d+: not valid JSON"):
        build(section)


# --- analysis -----------------------------------------------------------------------------------------------


def test_wilson_interval_matches_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(8, 8) == pytest.approx((0.6756, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bradley_terry_recovers_known_strengths():
    theta = np.array([0.8, 0.0, -0.3, -0.5])
    n = 1000.0
    wins = n / (1 + np.exp(theta[None, :] - theta[:, None]))  # expected wins: the MLE is theta itself
    np.fill_diagonal(wins, 0)
    compared = ~np.eye(4, dtype=bool)
    assert bradley_terry(wins, compared, prior=1e-9) == pytest.approx(theta - theta.mean(), abs=1e-6)
    batch = bradley_terry(np.stack([wins, wins.T]), compared, prior=1e-9)
    assert batch[1] == pytest.approx(-(theta - theta.mean()), abs=1e-6)
    never_loses = np.array([[0, 5, 0], [0, 0, 3], [0, 2, 0]], dtype=float)
    finite = bradley_terry(never_loses, np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]]), prior=1.0)
    assert np.all(np.isfinite(finite)) and finite[0] > finite[1] > finite[2]
    with pytest.raises(ValueError, match="do not connect"):
        bradley_terry(np.zeros((3, 3)), np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]]), prior=1.0)


def test_bootstrap_is_seeded_and_resamples_whole_raters():
    rng = np.random.default_rng(0)
    comparisons = [
        Comparison(f"r{r}", f"s/{k}", *pair, float(rng.random() < 0.7))
        for r in range(12)
        for k, pair in enumerate([("A", "B"), ("B", "C"), ("A", "C")] * 4)
    ]
    compared = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=bool)
    scores = bootstrap_bradley_terry(comparisons, ["A", "B", "C"], compared, 1.0, "rater", 300, seed=5)
    assert scores == bootstrap_bradley_terry(comparisons, ["A", "B", "C"], compared, 1.0, "rater", 300, seed=5)
    assert all(s.low < s.theta < s.high for s in scores)
    assert scores[0].theta > scores[1].theta > scores[2].theta
    one_rater = [c for c in comparisons if c.rater == "r0"]
    assert all(
        np.isnan(s.low)
        for s in bootstrap_bradley_terry(one_rater, ["A", "B", "C"], compared, 1.0, "rater", 300, seed=5)
    )
    result = pair_result("B", "A", comparisons)
    forward = pair_result("A", "B", comparisons)
    assert (result.a_wins, result.ties, result.b_wins) == (forward.b_wins, forward.ties, forward.a_wins)


def test_a_rater_failing_attention_checks_is_excluded_and_reported(built, tmp_path):
    section, key, keys = built
    good = attentive(key)
    careless = {
        i: ("left" if c == "tie" else "tie") if any(x["id"] == i and x["expected"] for x in key["items"]) else "right"
        for i, c in good.items()
    }
    write_page_votes(tmp_path / "votes" / "alice.csv", key["study"], "alice", good)
    write_page_votes(tmp_path / "votes" / "zed.csv", key["study"], "zed", careless)
    analysis, files, votes = build(section)
    assert [r.rater for r in analysis.excluded] == ["page:zed"] and analysis.excluded[0].failed == 2
    (pair,) = analysis.pairs
    assert (pair.votes, pair.a_wins, pair.ties, pair.b_wins) == (8, 8, 0, 0)
    report = markdown(analysis, section, files, votes)
    assert "| page:zed | 10 | 2 | 2 |" in report
    assert "| teacher | sid-1e-4 | 8 | 8 | 0 | 0 | 100.0% [67.6, 100.0] |" in report
    assert (
        "20 votes from 2 raters in 2 files; 1 rater excluded for more than 0 wrong attention checks; "
        "8 votes of the kept 1 rater on real comparisons"
    ) in report


def test_three_systems_get_bradley_terry_scores(tmp_path):
    section = section_for(tmp_path, pairs=[("teacher", "sid-1e-4"), ("teacher", "sid-3e-5")])
    for pair in section.pairs:
        write_study(section, pair)
    for n in range(2):
        key = key_of(section, n)
        for rater in ("ann", "ben", "cy"):
            write_page_votes(tmp_path / "votes" / f"{rater}-{n}.csv", key["study"], rater, attentive(key))
    analysis, files, votes = build(section)
    assert [s.system for s in analysis.scores] == ["teacher", "sid-1e-4", "sid-3e-5"]
    assert analysis.scores[0].theta > 0 > analysis.scores[1].theta
    report = markdown(analysis, section, files, votes)
    assert "## Bradley–Terry scores" in report and "| teacher | +" in report
    assert [p.votes for p in analysis.pairs] == [24, 24]


def test_no_votes_yet_gives_an_empty_report(built):
    section, _, _ = built
    analysis, files, votes = build(section)
    report = markdown(analysis, section, files, votes)
    assert "No votes yet" in report and "| teacher | sid-1e-4 | 0 | 0 | 0 | 0 | — |" in report
