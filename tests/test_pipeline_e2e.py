"""The real `dvc repro` on the micro profile in a temporary git repository: the table, the no-op rerun,
and an edited learning rate rerunning only its own stages (once runs.yaml is rewritten)."""

import io
import json
import re
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import copy_project, sh


def stages_run(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(built_micro, tmp_path_factory):
    """A copy of the built micro project, which these tests may change."""
    src, output = built_micro
    return copy_project(src, tmp_path_factory.mktemp("e2e") / "repo"), output


def test_repro_builds_the_results_table(repo):
    repo, output = repo
    assert stages_run(output) == {
        "data",
        "teacher",
        "features",
        "reference_stats",
        "teacher_samples",
        "distill@sid-1e-4",
        "distill@sid-3e-5",
        "evaluate@sid-1e-4",
        "evaluate@sid-3e-5",
        "report",
        "preference@0",
        "preference_report",
    }
    table = pd.read_csv(repo / "reports" / "results.csv")
    assert len(table) == 3
    assert table["method"][0].startswith("teacher") and table["NFE"][0] == 7
    students = table.iloc[1:]
    assert list(students["method"]) == ["SiD", "SiD"] and sorted(students["lr"]) == [3e-5, 1e-4]
    assert (students["NFE"] == 1).all()
    for col in ["FID", "IS", "KID", "rel-FID", "images/s"]:
        assert table[col].notna().all() and (table[col].iloc[1:] > 0).all(), col
    assert (students["batch"] == 16).all()  # distill.per_method.sid overrides the common batch of 32
    # the micro profile's FID is SiD's protocol: mean ± std over 2 seed blocks
    for name in ["teacher_samples", "eval/sid-1e-4"]:
        m = json.loads((repo / "metrics" / f"{name}.json").read_text())
        assert len(m["fid_trials"]) == 2 and m["fid_trials"][0] != m["fid_trials"][1]
        assert m["fid"] == pytest.approx(sum(m["fid_trials"]) / 2) and m["fid_std"] > 0
        assert m["protocol"]["seeds"] == "0-399" and m["protocol"]["aggregate"] == "mean"
    md = (repo / "reports" / "results.md").read_text()
    assert "| SiD" in md and "teacher" in md and "FID protocol: 2 trials of 200 samples (seeds 0–199, 200–399)" in md
    assert re.search(r"\| SiD +\| +1e-4 +\| +16 +\| +1 +\| +\d+\.\d{3} ± \d+\.\d{3}", md)  # lr as written
    for name in ["teacher", "sid-1e-4", "sid-3e-5"]:
        assert (repo / "reports" / "grids" / f"{name}.png").stat().st_size > 0
    assert (repo / "preference" / "teacher-vs-sid-1e-4" / "study" / "index.html").exists()
    assert "No votes yet" in (repo / "reports" / "preference.md").read_text()
    # nothing partial is left next to the outputs
    assert not list(repo.rglob("*.tmp"))


def test_second_repro_is_a_noop(repo):
    repo, _ = repo
    start = time.perf_counter()
    result = sh(["dvc", "repro"], repo)
    elapsed = time.perf_counter() - start
    assert stages_run(result.stdout) == set()
    assert elapsed < 10, elapsed
    assert sh(["dvc", "status"], repo).stdout.strip().endswith("Data and pipelines are up to date.")


def test_every_stage_is_an_mlflow_run_with_tags(repo):
    repo, _ = repo
    code = (
        "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
        "df = mlflow.search_runs(search_all_experiments=True);"
        "print(df[['tags.dvc_stage','tags.method','tags.lr','tags.git_commit','params.method','params.lr',"
        "'params.batch','params.seed']].to_csv(index=False))"
    )
    out = sh([sys.executable, "-c", code], repo).stdout
    runs = pd.read_csv(io.StringIO(out), dtype=str)
    assert {"teacher", "distill@sid-1e-4", "evaluate@sid-3e-5", "reference_stats"} <= set(runs["tags.dvc_stage"])
    distill = runs[runs["tags.dvc_stage"] == "distill@sid-1e-4"].iloc[0]
    assert distill["tags.method"] == distill["params.method"] == "sid"
    assert distill["tags.lr"] == distill["params.lr"] == "1e-4"
    assert distill["params.batch"] == "16" and distill["params.seed"] == "0"
    assert len(str(distill["tags.git_commit"])) == 40


def test_a_distill_run_logs_its_own_params_and_curves_over_images_seen(repo):
    repo, _ = repo
    code = (
        "import json, mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); c = mlflow.MlflowClient();"
        "(r,) = mlflow.search_runs(search_all_experiments=True, output_format='list',"
        " filter_string=\"tags.dvc_stage = 'distill@sid-1e-4'\");"
        "e = c.get_experiment(r.info.experiment_id);"
        "print(json.dumps({'params': sorted(r.data.params), 'metrics': sorted(r.data.metrics),"
        " 'kind': e.tags.get('mlflow.experimentKind'), 'parent': r.data.tags.get('mlflow.parentRunId'),"
        " 'fid': [m.step for m in c.get_metric_history(r.info.run_id, 'fid')],"
        " 'loss': [m.step for m in c.get_metric_history(r.info.run_id, 'loss_g')]}))"
    )
    run = json.loads(sh([sys.executable, "-c", code], repo).stdout)
    assert run["kind"] == "custom_model_development" and run["parent"]  # model training; grouped under dvc repro
    assert "sid.alpha" in run["params"] and "distill.batch" in run["params"]
    assert not [p for p in run["params"] if p.startswith(("teacher.", "study.", "fewstep.", "sim.", "gdd."))]
    assert not {"lr", "batch", "sigma_init", "kimg"} & set(run["metrics"])  # settings are params, not metrics
    assert run["fid"] == [64, 128] and len(run["loss"]) > 2  # step = images seen: short runs resolve


def test_changing_one_lr_reruns_only_its_stages(repo):
    repo, _ = repo
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace('lrs: ["1e-4", "3e-5"]', 'lrs: ["2e-4", "3e-5"]'))
    # plain DVC reads the runs.yaml of the old lrs: the report, which reads the study's params, refuses to run
    stale = sh(["dvc", "repro"], repo, check=False)
    assert stale.returncode != 0 and stages_run(stale.stdout) == {"report"}
    assert "runs.yaml is stale (lacks sid-2e-4; still lists sid-1e-4)" in stale.stderr
    assert "Run `distillery validate` to rewrite it" in stale.stderr
    sh(["distillery", "validate"], repo)
    result = sh(["dvc", "repro"], repo)
    assert stages_run(result.stdout) == {"distill@sid-2e-4", "evaluate@sid-2e-4", "report"}
    table = pd.read_csv(repo / "reports" / "results.csv")
    assert sorted(table["lr"].dropna()) == [3e-5, 2e-4]


def test_compare_shows_the_runs_dvc_lock_points_to_or_all_with_history(repo):
    repo, _ = repo  # after the test above, which replaced lr 1e-4 by 2e-4
    distillery = str(Path(sys.executable).parent / "distillery")
    current = sh([distillery, "compare"], repo).stdout
    rows = {line.split("|")[1].strip(): line for line in current.splitlines() if "evaluate@" in line}
    assert set(rows) == {"evaluate@sid-2e-4", "evaluate@sid-3e-5"}
    assert "| 2e-4 " in rows["evaluate@sid-2e-4"]  # the lr as written in params.yaml
    history = sh([distillery, "compare", "--all"], repo).stdout
    old = [line for line in history.splitlines() if "evaluate@sid-1e-4" in line]
    assert len(old) == 1 and old[0].rstrip(" |").endswith("false")
