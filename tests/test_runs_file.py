"""runs.yaml: the runs of params.yaml (each method × its own lrs) that dvc.yaml's foreach stages expand, written by
`distillery validate`; a stage refuses to run while it is stale (real DVC, in fresh projects)."""

import sys

import yaml

from pipeline.dvc_keys import dvc_params_keys
from pipeline.params import load_params, parse_params
from pipeline.plan import dag
from pipeline.runs_file import check, render

from conftest import ROOT, dump_params, new_project, sh


def test_the_committed_runs_file_is_that_of_params_yaml():
    params = load_params(ROOT / "params.yaml")
    assert (ROOT / "runs.yaml").read_text() == render(params) and check(ROOT, params) is None
    runs = yaml.safe_load((ROOT / "runs.yaml").read_text())
    assert runs["study_runs"]["sid-3e-4"] == {"method": "sid"} and len(runs["study_runs"]) == 10
    assert runs["fewstep_runs"]["dmd2-3e-4-1-plain"] == {"method": "dmd2"} and "cd-1e-4-4-ddil" in runs["fewstep_runs"]


def per_method_params():
    """The micro profile with SIM beside SiD, SIM at its own two rates."""
    params = yaml.safe_load((ROOT / "profiles" / "micro.yaml").read_text())
    params["study"].update(methods=["sid", "sim"], lrs=["1e-4"], per_method={"sim": {"lrs": ["1e-5", "3e-6"]}})
    params["sim"] = yaml.safe_load((ROOT / "params.yaml").read_text())["sim"]
    return params


def test_per_method_lrs_give_exactly_their_stages_in_dvc(tmp_path):
    project = new_project(tmp_path / "project")
    dump_params(project / "params.yaml", per_method_params())
    validate = sh(["distillery", "validate"], project)
    assert "runs.yaml: rewritten from params.yaml (3 runs)" in validate.stdout
    assert "runs.yaml" not in sh(["distillery", "validate"], project).stdout  # unchanged: not rewritten
    runs = yaml.safe_load((project / "runs.yaml").read_text())
    assert runs == {
        "study_runs": {"sid-1e-4": {"method": "sid"}, "sim-1e-5": {"method": "sim"}, "sim-3e-6": {"method": "sim"}},
        "fewstep_runs": {},  # the micro profile has no few-step study: DVC expands the empty foreach to nothing
    }
    names = sh(["dvc", "stage", "list", "--name-only"], project).stdout.split()
    assert {n for n in names if "@s" in n} == {
        f"{stage}@{run}" for stage in ("distill", "evaluate") for run in ("sid-1e-4", "sim-1e-5", "sim-3e-6")
    }
    assert not [n for n in names if "_fewstep@" in n]
    # the params each run's stages read: its own method's section
    assert {"sid", "sim"} <= dvc_params_keys((project / "dvc.yaml").read_text(), per_method_params())


def test_a_stage_refuses_a_stale_runs_file_before_any_compute(tmp_path):
    project = new_project(tmp_path / "project")
    params = (project / "params.yaml").read_text()
    params = params.replace('lrs: ["1e-4", "3e-5"]', 'lrs: ["2e-4", "3e-5"]').replace("b: sid-1e-4", "b: sid-2e-4")
    (project / "params.yaml").write_text(params)
    result = sh([sys.executable, "-m", "stages.data"], project, check=False)
    assert result.returncode == 2
    assert "runs.yaml is stale (lacks sid-2e-4; still lists sid-1e-4)" in result.stderr
    assert "Run `distillery validate` to rewrite it, or use `distillery repro` / `distillery run`" in result.stderr
    assert not (project / "data").exists() and not (project / "mlflow.db").exists()
    (project / "runs.yaml").unlink()
    result = sh([sys.executable, "-m", "stages.data"], project, check=False)
    assert result.returncode == 2 and "runs.yaml cannot be read" in result.stderr
    sh(["distillery", "validate"], project)
    assert check(project, load_params(project / "params.yaml")) is None


def test_plan_renders_the_profile_with_its_own_runs_file(tmp_path):
    dump_params(tmp_path / "profile.yaml", per_method_params())
    stages = dag(ROOT, tmp_path / "profile.yaml")
    assert [s for s in stages if s.startswith("distill@")] == [
        "distill@sid-1e-4",
        "distill@sim-1e-5",
        "distill@sim-3e-6",
    ]
    assert stages["evaluate@sim-3e-6"] == ["distill@sim-3e-6", "features", "reference_stats", "teacher_samples"]


def test_render_writes_an_empty_study_as_an_empty_mapping():
    text = render(parse_params({"study": {"methods": ["sid"], "lrs": ["1e-4"]}}))
    assert text.splitlines() == [
        "# generated from params.yaml by `distillery validate`; do not edit",
        "study_runs:",
        "  sid-1e-4: {method: sid}",
        "fewstep_runs: {}",
    ]
