"""Stage `preference_report`: the returned votes of every preference study → reports/preference.md,
metrics/preference.json and MLflow. A bad vote file stops the stage before anything is written."""

import json
import math
from pathlib import Path

from pipeline.io import write_json, write_text
from pipeline.preference_params import PreferenceParams
from pipeline.tracking import flatten

from distillery.preference.analysis import Analysis, Rate, analyse
from distillery.preference.study import StudyKey
from distillery.preference.votes import VotesError, read_votes

from stages.paths import PREFERENCE_REPORT, metrics
from stages.skeleton import StageFailed, run_stage


def load_keys(section: PreferenceParams) -> dict[str, StudyKey]:
    """The sealed keys of the configured pairs, by study ID, in the order of `preference.pairs`."""
    keys = [
        StudyKey.from_dict(json.loads((Path(section.output_dir) / p.name / "key.json").read_text()))
        for p in section.pairs
    ]
    return {k.study: k for k in keys}


def vote_files(section: PreferenceParams) -> list[Path]:
    folder = Path(section.votes_dir)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix in (".csv", ".json")
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def build(section: PreferenceParams) -> tuple[Analysis, list[Path], int]:
    """(analysis, vote files, number of votes read); raises VotesError when any file has a problem."""
    keys = load_keys(section)
    files = vote_files(section)
    votes = read_votes(files, keys)
    analysis = analyse(
        votes,
        keys,
        section.max_failed_checks,
        section.confidence,
        section.bootstrap,
        section.bootstrap_unit,
        section.bradley_terry_prior,
        section.seed,
    )
    return analysis, files, len(votes)


def percent(rate: Rate | None) -> str:
    return "—" if rate is None else f"{100 * rate.value:.1f}% [{100 * rate.low:.1f}, {100 * rate.high:.1f}]"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def markdown(analysis: Analysis, section: PreferenceParams, files: list[Path], votes: int) -> str:
    level = f"{100 * section.confidence:g}%"
    kept = [r for r in analysis.raters.values() if r not in analysis.excluded]
    lines = ["# Human preference: blind paired comparison", ""]
    if not files:
        lines += [f"No votes yet: put the returned vote files in `{section.votes_dir}/` and rerun this stage.", ""]
    lines += [
        f"{count(votes, 'vote')} from {count(len(analysis.raters), 'rater')} in {count(len(files), 'file')}; "
        f"{count(len(analysis.excluded), 'rater')} excluded for more than "
        f"{count(section.max_failed_checks, 'wrong attention check')}; {count(analysis.votes_used, 'vote')} of "
        f"the kept {count(len(kept), 'rater')} on real comparisons are counted below.",
        "",
    ]
    lines += [
        "| A | B | votes | A preferred | tie | B preferred | A win rate | tie rate | B win rate "
        "| A among non-ties | sign test p |",
        "|---|---|---:|---:|---:|---:|---|---|---|---|---:|",
    ]
    for p in analysis.pairs:
        pvalue = "—" if p.sign_test_p is None else f"{p.sign_test_p:.3g}"
        lines.append(
            f"| {p.a} | {p.b} | {p.votes} | {p.a_wins} | {p.ties} | {p.b_wins} | {percent(p.a_rate)} "
            f"| {percent(p.tie_rate)} | {percent(p.b_rate)} | {percent(p.a_decisive)} | {pvalue} |"
        )
    lines += [
        "",
        f"Rates with Wilson {level} intervals, which treat votes as independent (several votes of one "
        f"rater are not). The sign test drops ties.",
        "",
    ]
    if analysis.scores is not None:
        lines += [
            "## Bradley–Terry scores",
            "",
            f"θ is a log-strength (mean 0): system i is preferred over j with probability 1 / (1 + e^(θj − θi)). "
            f"Ties count half a win for each side; every compared pair gets {section.bradley_terry_prior:g} "
            f"virtual tie(s). {level} percentile intervals from {section.bootstrap} bootstrap resamples of "
            f"whole {section.bootstrap_unit}s (seed {section.seed}).",
            "",
            f"| system | θ | {level} interval |",
            "|---|---:|---|",
        ]
        for s in sorted(analysis.scores, key=lambda s: -s.theta):
            interval = "—" if math.isnan(s.low) else f"[{s.low:+.3f}, {s.high:+.3f}]"
            lines.append(f"| {s.system} | {s.theta:+.3f} | {interval} |")
        lines.append("")
    lines += [
        "## Attention checks",
        "",
        "Each study mixes in items whose attentive answer is known: an image against itself (tie) and a noise "
        "image against a real one (the real one).",
        "",
    ]
    if analysis.excluded:
        lines += ["| excluded rater | votes | checks answered | wrong |", "|---|---:|---:|---:|"]
        lines += [f"| {r.rater} | {r.votes} | {r.checks} | {r.failed} |" for r in analysis.excluded]
    else:
        lines.append("No rater was excluded.")
    unchecked = sum(r.checks == 0 for r in kept)
    if unchecked:
        lines += ["", f"{count(unchecked, 'kept rater')} answered no attention check."]
    return "\n".join(lines) + "\n"


def summary_metrics(analysis: Analysis, votes: int) -> dict:
    def rate(r):
        return None if r is None else {"value": r.value, "low": r.low, "high": r.high}

    out = {
        "votes": votes,
        "raters": len(analysis.raters),
        "raters_excluded": len(analysis.excluded),
        "votes_used": analysis.votes_used,
        "pairs": {
            f"{p.a}-vs-{p.b}": {
                "votes": p.votes,
                "a_wins": p.a_wins,
                "ties": p.ties,
                "b_wins": p.b_wins,
                "a_rate": rate(p.a_rate),
                "tie_rate": rate(p.tie_rate),
                "b_rate": rate(p.b_rate),
                "a_decisive": rate(p.a_decisive),
                "sign_test_p": p.sign_test_p,
            }
            for p in analysis.pairs
        },
    }
    if analysis.scores is not None:
        out["bradley_terry"] = {
            s.system: {
                "theta": s.theta,
                "low": None if math.isnan(s.low) else s.low,
                "high": None if math.isnan(s.high) else s.high,
            }
            for s in analysis.scores
        }
    return out


def run(params, args, run):
    section = params.preference
    try:
        analysis, files, votes = build(section)
    except VotesError as e:
        raise StageFailed(str(e)) from None
    summary = summary_metrics(analysis, votes)
    write_json(metrics("preference"), summary)
    write_text(PREFERENCE_REPORT, markdown(analysis, section, files, votes))
    run.log_metrics({k: v for k, v in flatten(summary).items() if v is not None})
    run.log_artifact(PREFERENCE_REPORT)
    print(Path(PREFERENCE_REPORT).read_text())


if __name__ == "__main__":
    run_stage("preference_report", run, doc=__doc__)
