"""Every DVC stage lists, in its deps, every repository module it runs, so that DVC never serves a stale number.

The import closure of a stage's module (`python -m stages.X` in its cmd) is computed statically with `ast`: every
`import` / `from ... import` anywhere in a module (function bodies included), resolved to the repository's packages.
A directory dep (distillery/methods) stands for every module in it, whose closures count too: the method registry
imports those by name.
"""

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distillery", "pipeline", "stages")


def module_file(name):
    """The file of repository module `name` (a package's `__init__.py`), or None if it is not one."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path, name):
    """Names of the modules a module's imports load: each imported module, its parent packages, and
    `from pkg import name` submodules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    # Importing a.b.c runs a and a.b first.
    return {".".join(n.split(".")[:i]) for n in names if n for i in range(1, n.count(".") + 2)}


def import_closure(*module_names):
    """The repository files that importing `module_names` runs, recursively."""
    seen, todo = {}, [".".join(n.split(".")[:i]) for n in module_names for i in range(1, n.count(".") + 2)]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        todo.extend(imported_modules(path, name))
    return set(seen.values())


def stages():
    """(name, module, deps) for every stage of dvc.yaml; matrix/foreach stages by their cmd template."""
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        stage = stage.get("do", stage)
        module = re.search(r"python -m ([\w.]+)", stage["cmd"]).group(1)
        yield pytest.param(name, module, stage.get("deps", []), id=name)


def directory_modules(deps):
    """The module names of every .py file under the directory deps."""
    return [
        ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for dep in deps
        if (ROOT / dep).is_dir()
        for f in sorted((ROOT / dep).rglob("*.py"))
    ]


@pytest.mark.parametrize("stage,module,deps", list(stages()))
def test_stage_deps_are_the_import_closure_of_its_module(stage, module, deps):
    closure = import_closure(module, *directory_modules(deps))
    covered = [ROOT / dep for dep in deps]
    missing = sorted(
        str(path.relative_to(ROOT))
        for path in closure
        if not any(path == dep or dep in path.parents for dep in covered)
    )
    assert not missing, f"dvc.yaml stage {stage!r} runs {module} but its deps lack: {', '.join(missing)}"
    # a listed module the stage does not run would rerun it for nothing
    extra = [dep for dep in deps if dep.endswith(".py") and ROOT / dep not in closure]
    assert not extra, f"dvc.yaml stage {stage!r} lists modules it does not run: {', '.join(extra)}"


def test_a_stage_missing_a_module_it_runs_is_caught():
    closure = import_closure("stages.evaluate")
    assert ROOT / "distillery" / "edm.py" in closure  # through distillery.sampling
    assert ROOT / "distillery" / "training.py" not in closure
