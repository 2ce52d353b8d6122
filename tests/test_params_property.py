"""Params that validate are params that run: every mutant of the micro profile (a key deleted, replaced or added)
either passes `distillery validate`, a stage's load_params_or_exit and a dry plan of every stage of dvc.yaml (what each
stage does before any compute), or is refused by both with exit 2 and one line per problem, one of them naming the
mutated key: never a traceback, never compute. Examples are derandomized (the same on every run); a second test runs
many more mutants through the checks alone, in memory."""

import argparse
import ast
import contextlib
import copy
import importlib
import io
import math
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple, get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from ruamel.yaml import YAML

from pipeline import runs_file
from pipeline.cli import main
from pipeline.params import Params, ParamsError, check_params, load_params, load_params_or_exit

from conftest import dump_params

ROOT = Path(__file__).resolve().parents[1]
MICRO = YAML(typ="safe", pure=True).load((ROOT / "profiles" / "micro.yaml").read_text())
DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
SOURCES = ["distillery", "pipeline", "stages", "votes"]  # what stages read besides other stages' outputs
TRACKED = set(
    subprocess.run(["git", "ls-files", *SOURCES], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
)


class Stage(NamedTuple):
    name: str  # as DVC names it: distill@sid-1e-4, preference@0
    module: str
    argv: list
    deps: list
    outs: list


def stage_instances(params):
    """Every stage dvc.yaml defines for `params`: its foreach stages over the runs of runs.yaml and over
    preference.pairs expanded as DVC expands them."""
    lists = {
        **{f"${{{key}}}": entries for key, entries in runs_file.runs(params).items()},
        "${preference.pairs}": [pair.model_dump() for pair in params.preference.pairs],
    }
    for stage, spec in DVC_STAGES.items():
        if "foreach" in spec:
            entries = lists[spec["foreach"]]
            items = entries.items() if isinstance(entries, dict) else enumerate(entries)
            instances = [(f"{stage}@{key}", expand(spec["do"], key, item)) for key, item in items]
        else:
            instances = [(stage, spec)]
        for name, do in instances:
            python, m, module, *argv = shlex.split(do["cmd"])
            assert (python, m) == ("python", "-m")
            outs = [next(iter(o)) if isinstance(o, dict) else o for o in do.get("outs", []) + do.get("metrics", [])]
            yield Stage(name, module, argv, do.get("deps", []), outs)


def expand(node, key, item):
    """`node` of a foreach stage's `do` with ${key} and ${item.<field>} put in."""
    if isinstance(node, dict):
        return {expand(k, key, item): expand(v, key, item) for k, v in node.items()}
    if isinstance(node, list):
        return [expand(v, key, item) for v in node]
    if isinstance(node, str):
        return re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item[m[1]]), node.replace("${key}", str(key)))
    return node


def stage_hooks(module_name):
    """The keyword arguments the stage module passes to run_stage (arguments, instance, tags, logged), evaluated in
    the module: what `python -m <module>` runs after validating params and before any compute."""
    module = importlib.import_module(module_name)
    tree = ast.parse(Path(module.__file__).read_text())
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run_stage"]
    return {
        k.arg: eval(compile(ast.Expression(k.value), module.__file__, "eval"), vars(module))
        for k in call.keywords
        if k.arg != "doc"
    }


def dry_plan(params, root="."):
    """Everything the stages of dvc.yaml do with `params` before any compute: runs.yaml current, each stage's
    arguments, DVC name, MLflow tags and logged params, each run's method object and training configuration."""
    from stages.distill import training_config
    from stages.skeleton import shared_params

    assert runs_file.check(root, params) is None
    stages = list(stage_instances(params))
    made = TRACKED | {out for stage in stages for out in stage.outs}
    for name, module, argv, deps, _ in stages:
        # dvc repro finds every dep: a file of the repository or an output of a stage (samples/<run>.npz), or a
        # folder holding some, or a file inside an output folder
        missing = [d for d in deps if not any(f == d or f.startswith(f"{d}/") or d.startswith(f"{f}/") for f in made)]
        assert not missing, f"{name} depends on {missing}, which no stage makes"
        hooks = stage_hooks(module)
        parser = argparse.ArgumentParser()
        for flag in hooks.get("arguments", {}):
            parser.add_argument(flag, required=True)
        args = parser.parse_args(argv)
        assert (hooks["instance"](params, args) if "instance" in hooks else name) == name
        if "tags" in hooks:
            hooks["tags"](params, args)
        hooks.get("logged", shared_params)(params, args)
    for run in params.runs():
        params.method(run)
        training_config(params, run.method, run.lr)


def numbers(node, path=()):
    """(key path, value) of every number in a params dump."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else []
    for key, value in items:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield (*path, key), value
        yield from numbers(value, (*path, key))


def folders(node, path=()):
    """(key path, value) of every path a params dump names: the keys `path` and `*_dir`."""
    for key, value in node.items() if isinstance(node, dict) else []:
        if isinstance(value, str) and (key == "path" or key.endswith("_dir")):
            yield (*path, key), value
        yield from folders(value, (*path, key))


def assert_bounded(params):
    """Every number finite and no larger than the largest bound (10⁷ kimg; seeds 2³¹), checked without the schema."""
    for path, value in numbers(params.model_dump()):
        limit = 2**31 if path[-1] == "seed" else 1e7
        assert math.isfinite(value) and abs(value) <= limit, (path, value)


def assert_refused_naming(lines, path):
    """`lines` (an error) is a header and one line per problem, one of them naming the mutated key `path`."""
    assert lines[0] == "params.yaml: invalid parameters" and len(lines) > 1
    assert all(re.fullmatch(r"  [^\s:]+: \S.*", line) for line in lines[1:]), lines
    # a list's checks (unique entries, K × variant) name the list for an entry
    keys = [path, path[:-1]] if isinstance(path[-1], int) else [path]
    assert any(names(line, ".".join(map(str, k))) for line in lines[1:] for k in keys), f"no line names {path}"


def within_contract(raw, params):
    """What valid params promise, checked without the schema's code: every number finite and no larger than the
    largest bound (10⁷ kimg; seeds 2³¹), every path inside the project (inputs: or under a data root), every
    top-level key a stage of dvc.yaml reads written in the file."""
    assert_bounded(params)
    project = os.path.realpath(".")
    for path, value in folders(params.model_dump()):
        where = os.path.realpath(value)
        roots = (
            [project]
            if path[-1] in ("output_dir", "votes_dir")
            else [project, *map(os.path.realpath, params.data_roots)]
        )
        assert any(os.path.commonpath([where, root]) == root for root in roots), (path, value)
    methods = {run.method for run in params.runs()}
    for spec in DVC_STAGES.values():
        for entry in spec.get("do", spec).get("params", []):
            tops = methods if entry == "${item.method}" else [entry.split(".")[0]]
            assert all(top in raw for top in tops), entry


def stage_load():
    """What a stage's load_params_or_exit makes of params.yaml: (exit status, its stderr lines, params)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return 0, [], load_params_or_exit()
        except SystemExit as e:
            return e.code, err.getvalue().splitlines(), None


def paths(node, path=()):
    """The key path of every value in the YAML tree `node`, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield (*path, key)
        yield from paths(value, (*path, key))


def absent(node, model, path=()):
    """The key path of every field the schema `model` allows where the YAML tree `node` does not write it (micro.yaml
    has no data.path, no teacher.download, no sim section, …), depth first."""
    for name, field in model.model_fields.items():
        if name not in node:
            yield (*path, name)
            continue
        value, kind = node[name], field.annotation
        if get_origin(kind) is dict and isinstance(value, dict):  # per_method: {method: section}
            section = get_args(kind)[1]
            for method, entry in value.items():
                yield from absent(entry, section, (*path, name, method))
            continue
        section = next((t for t in (kind, *get_args(kind)) if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if section is not None and isinstance(value, dict):
            yield from absent(value, section, (*path, name))


PATHS = list(paths(MICRO))
ABSENT = list(absent(MICRO, Params))
FILES = [p for p in PATHS + ABSENT if p[-1] == "path" or str(p[-1]).endswith("_dir")]  # one mutant in 5 mutates one
ODD = [
    None,
    True,
    "",
    "x",
    [],
    {},
    {"nested": {"deeper": [1]}},
    [1, "two"],
    0,
    -1,
    -1e-9,
    10**18,
    1e300,
    math.inf,
    -math.inf,
    math.nan,
    1e-4,  # an unquoted learning rate
    "inf",
    "1e999",
    "..",
    "../outside",
    "samples/../../outside",
    "/",
    "/tmp/outside",
    "datasets/digits.zip",
    "/tmp/outside/digits.zip",
    {"url": "https://example.org/x.zip", "sha256": "0" * 64},
    [0.9, 0.999],
]


@st.composite
def mutants(draw):
    """(params as read, mutated key path, what was done): micro.yaml with one key deleted, replaced or added."""
    raw = copy.deepcopy(MICRO)
    path = draw(st.sampled_from(FILES) if draw(st.integers(0, 4)) == 0 else st.sampled_from(PATHS))
    *parent_path, key = path
    parent = raw
    for k in parent_path:
        parent = parent[k]
    if path in ABSENT:  # data.path: a path micro.yaml does not write
        parent[key] = "digits.zip"
    old = parent[key]
    action = draw(st.sampled_from(["delete", "replace", "replace", "replace", "add", "add an unknown key"]))
    if action == "delete":
        del parent[key]
        # a list item's deletion changes the list: its key is the list's
        return raw, tuple(parent_path) if isinstance(parent, list) else path, "delete"
    if action == "add an unknown key" and isinstance(old, dict):
        old["unknown_key"] = 1
        return raw, (*path, "unknown_key"), action
    if action == "add":  # a key the schema allows and micro.yaml leaves out
        path = draw(st.sampled_from(ABSENT))
        *parent_path, key = path
        parent, old = raw, None
        for k in parent_path:
            parent = parent[k]
    nearby, extreme = [], []  # values like the one written (often valid), and its far-off versions
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        nearby, extreme = [old * 2, old / 2, old + 1, -old, 0], [old * 10**12, math.inf, -math.inf, math.nan, "inf"]
    elif isinstance(old, str):
        nearby, extreme = [f"{old}x", old.upper()], [f"../{old}", f"/tmp/{old}", "..", "/", f"{old}/../../..", "\0"]
    pick = draw(st.integers(0, 19))
    if pick < 7 and nearby:
        value = draw(st.sampled_from(nearby))
    elif pick < 14 and extreme:
        value = draw(st.sampled_from(extreme))
    elif pick < 17:
        value = draw(st.sampled_from(ODD))
    else:
        value = draw(st.one_of(st.integers(), st.floats(), st.text(max_size=8)))
    parent[key] = value
    return raw, path, f"replace by {value!r}"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder holding dvc.yaml, as the working directory: validate writes runs.yaml there."""
    folder = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
    before = Path.cwd()
    os.chdir(folder)
    yield folder
    os.chdir(before)


def names(line, key):
    """Whether the error line names `key` (dotted): as its key (or a key inside it), or in its text."""
    where = line[2:].split(": ", 1)[0]
    if where == key or where.startswith(f"{key}."):
        return True
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", line) is not None


def test_the_dry_plan_names_the_stages_as_dvc_renders_them():
    from pipeline.plan import dag

    params = load_params(ROOT / "params.yaml")  # the toy: study, few-step study and a preference pair
    assert {stage.name for stage in stage_instances(params)} == set(dag(ROOT, ROOT / "params.yaml"))
    dry_plan(params, ROOT)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples on every run (CI)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutants())
def test_a_mutant_of_the_micro_profile_runs_or_is_refused_naming_its_key(project, mutant):
    raw, path, action = mutant
    key = ".".join(map(str, path))
    note(f"{key}: {action}")
    dump_params(project / "params.yaml", raw)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["validate"])  # an exception here (a traceback) fails the test
    lines = err.getvalue().splitlines()
    note("\n".join(lines))
    event("valid" if status == 0 else "refused")  # --hypothesis-show-statistics: how many of each
    stage_status, stage_lines, params = stage_load()
    if status == 0:
        assert lines == [] and stage_status == 0
        within_contract(raw, params)
        dry_plan(params)
        return
    # a stage refuses what validate refuses, but for the keys inside a section that only DVC reads one by one
    dvc_only = all(re.fullmatch(r"  \w+(\.\w+)+: missing: dvc.yaml's stages read it .*", line) for line in lines[1:])
    assert (stage_status, stage_lines) == ((0, []) if dvc_only else (2, lines))
    if status == 2 and lines[0].startswith("params.yaml: cannot read parameters: "):
        assert len(lines) == 1  # a text the YAML writer quoted too little (`?0` in a flow mapping): one line too
        return
    assert status == 2
    assert_refused_naming(lines, path)


@settings(
    max_examples=10000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mutants())
def test_many_mutants_checked_in_memory_are_bounded_or_refused_naming_their_key(project, mutant):
    """What load_params checks once the file is read (paths against the project folder), without YAML or stages:
    fast enough for thousands of mutants."""
    raw, path, action = mutant
    note(f"{'.'.join(map(str, path))}: {action}")
    try:
        params = check_params(raw)
    except ParamsError as e:
        assert_refused_naming(str(e).splitlines(), path)
        return
    assert_bounded(params)
