"""The few-step study through the real `dvc repro` on the micro profile: adding it to a built project runs only
its own stages and the report, which gains the K-step rows, fewstep.png and the covariate-shift table; its MLflow
runs carry method, K and ddil."""

import io
import re
import sys

import pandas as pd
import pytest
from ruamel.yaml import YAML

from conftest import copy_project, sh

pytestmark = pytest.mark.slow

FEWSTEP = {"methods": ["dmd2", "cd"], "lrs": ["1e-4"], "steps": [2], "variants": ["plain", "ddil"]}
RUNS = [f"{m}-1e-4-2-{v}" for m in ("dmd2", "cd") for v in ("plain", "ddil")]


def test_the_fewstep_study_adds_its_rows_figure_and_shift_table(built_micro, tmp_path):
    repo = copy_project(built_micro[0], tmp_path / "repo")
    yaml = YAML()
    params = yaml.load((repo / "params.yaml").read_text())
    params["fewstep"].update(FEWSTEP)
    params["dmd2"], params["cd"] = {"fake_updates": 2, "rollout_steps": 2}, {"rollout_steps": 2}
    with open(repo / "params.yaml", "w") as f:
        yaml.dump(params, f)

    sh(["distillery", "validate"], repo)  # runs.yaml: the few-step runs
    result = sh(["dvc", "repro"], repo)
    ran = set(re.findall(r"Running stage '([^']+)'", result.stdout))
    assert ran == {f"{stage}_fewstep@{run}" for stage in ("distill", "evaluate") for run in RUNS} | {"report"}

    table = pd.read_csv(repo / "reports" / "results.csv")
    fewstep = table[table["states"].notna()]
    assert sorted(fewstep["states"]) == ["DDIL 1:1:1 reflected"] * 2 + ["backward sim.", "diffused data"]
    assert set(fewstep["NFE"]) == {2} and fewstep[["FID", "precision", "recall"]].notna().all().all()
    assert (repo / "reports" / "fewstep.png").stat().st_size > 10_000

    shift = pd.read_csv(repo / "reports" / "covariate_shift.csv")
    assert sorted(zip(shift["method"], shift["variant"])) == sorted(
        (m, v) for m in ("dmd2", "cd") for v in ("plain", "ddil")
    )
    assert set(shift["level"]) == {1} and (shift["fd"] >= 0).all()
    markdown = (repo / "reports" / "results.md").read_text()
    assert "## Few-step students" in markdown and "no DDIL code" in markdown and "nan" not in markdown
    assert markdown.index("FD plain") < markdown.index("FD DDIL")  # the shift table: plain beside DDIL

    code = (
        "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
        "df = mlflow.search_runs(search_all_experiments=True);"
        "print(df[['tags.dvc_stage','tags.method','tags.steps','tags.ddil']].to_csv(index=False))"
    )
    runs = pd.read_csv(io.StringIO(sh([sys.executable, "-c", code], repo).stdout), dtype=str).set_index(
        "tags.dvc_stage"
    )
    tags = runs.loc["distill_fewstep@cd-1e-4-2-ddil"]
    assert (tags["tags.method"], tags["tags.steps"], tags["tags.ddil"]) == ("cd", "2", "True")
