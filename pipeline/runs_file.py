"""runs.yaml: the runs of params.yaml, one entry per run, as dvc.yaml's `foreach` stages read them.

DVC's templating expands lists, but cannot give each method its own learning rates (`study.per_method`), so the runs
are written out here under the names DVC gives their stages (distill@sid-3e-4). `distillery validate`, `repro` and
`run` rewrite the file; every stage refuses to run while it differs from what params.yaml gives, so a plain
`dvc repro` after an edit of params.yaml never builds from stale runs.
"""

import sys
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.io import write_text

NAME = "runs.yaml"
HEADER = "# generated from params.yaml by `distillery validate`; do not edit"


def runs(params):
    """{study_runs: {<run>: {method}}, fewstep_runs: {<run>: {method}}}: what dvc.yaml's foreach stages iterate."""
    study, fewstep = {}, {}
    for run in params.runs():
        (study if run.steps is None else fewstep)[run.name] = {"method": run.method}
    return {"study_runs": study, "fewstep_runs": fewstep}


def render(params):
    """The text of runs.yaml for `params`: one line per run (names are plain YAML strings: a method, then digits)."""
    lines = [HEADER]
    for key, entries in runs(params).items():
        lines.append(f"{key}:" if entries else f"{key}: {{}}")
        lines += [f"  {name}: {{method: {entry['method']}}}" for name, entry in entries.items()]
    return "\n".join(lines) + "\n"


def write(root, params):
    """Write runs.yaml in `root` from `params`; True when its text changed."""
    path, text = Path(root) / NAME, render(params)
    if path.is_file() and path.read_text() == text:
        return False
    write_text(path, text)
    return True


def sync(params_path, params):
    """Rewrite runs.yaml when `params_path` is the params.yaml DVC reads here (a project: dvc.yaml beside it), saying
    so when it changed; True then."""
    path = Path(params_path).resolve()
    if path != Path("params.yaml").resolve() or not (path.parent / "dvc.yaml").is_file():
        return False
    changed = write(path.parent, params)
    if changed:
        print(f"{NAME}: rewritten from {params_path} ({len(params.runs())} runs)")
    return changed


def check(root, params):
    """None when runs.yaml in `root` holds the runs of `params` (or `root` is no DVC project), else what is wrong."""
    root = Path(root)
    if not (root / "dvc.yaml").is_file():
        return None  # a stage run by hand outside a project: no DVC reads runs.yaml there
    advice = "Run `distillery validate` to rewrite it, or use `distillery repro` / `distillery run`, which do"
    try:
        found = YAML(typ="safe", pure=True).load((root / NAME).read_text())
    except (OSError, YAMLError) as e:
        return f"{NAME} cannot be read ({e}). {advice}"
    expected = runs(params)
    if found == expected:
        return None
    names = {name for entries in expected.values() for name in entries}
    held = {n for e in found.values() if isinstance(e, dict) for n in e} if isinstance(found, dict) else set()
    lacks, extra = sorted(names - held), sorted(held - names)
    detail = "; ".join([f"lacks {', '.join(lacks)}"] * bool(lacks) + [f"still lists {', '.join(extra)}"] * bool(extra))
    return (
        f"{NAME} is stale ({detail or 'not as params.yaml gives it'}): DVC would build the runs it lists, not those "
        f"of params.yaml. {advice}"
    )


def check_or_exit(params, root="."):
    """Refuse to run a stage (exit 2, before any compute) while runs.yaml is stale."""
    problem = check(root, params)
    if problem:
        print(problem, file=sys.stderr)
        raise SystemExit(2)
