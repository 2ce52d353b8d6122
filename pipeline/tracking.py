"""MLflow conventions: one run per stage execution, in a local store inside the repository by default.

MLflow is for browsing and comparing; the DVC-tracked metric files stay the source of every table.
"""

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

# Keep MLflow off the network (telemetry) unless the user asked otherwise.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def repo_root() -> Path:
    return Path(os.environ.get("DISTILLERY_ROOT", Path.cwd())).resolve()


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite store at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo_root())
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def flatten(d, prefix=""):
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


class StageRun:
    def __init__(self, mlflow):
        self._mlflow = mlflow

    def log_metrics(self, metrics: dict, step: int | None = None):
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path):
        self._mlflow.log_artifact(str(path))


def set_experiment(mlflow, profile):
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(os.environ.get("DISTILLERY_EXPERIMENT", f"distillery-{profile}"))


@contextmanager
def parent_run(root, name):
    """The MLflow run that groups the stage runs of one pipeline invocation; yields its id."""
    import mlflow

    from pipeline.params import load_params

    os.environ["DISTILLERY_ROOT"] = str(root)
    set_experiment(mlflow, load_params(Path(root) / "params.yaml").profile)
    with mlflow.start_run(run_name=name, tags={"stage": "pipeline", "git_commit": git_commit()}) as run:
        yield run.info.run_id


@contextmanager
def stage_run(stage: str, params: dict, tags: dict | None = None):
    """An MLflow run named after the DVC stage, with flattened params and the standard tags.

    The run-specific `tags` (method, lr, batch, seed) are logged as params too: the MLflow UI compares
    runs by params and filters them by tags."""
    import mlflow

    set_experiment(mlflow, params.get("profile", "default"))
    all_tags = {"stage": stage.split("@")[0], "dvc_stage": stage, "git_commit": git_commit()}
    if os.environ.get("DISTILLERY_PARENT_RUN_ID"):
        all_tags["mlflow.parentRunId"] = os.environ["DISTILLERY_PARENT_RUN_ID"]  # nests it in the UI
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    with mlflow.start_run(run_name=stage, tags=all_tags):
        mlflow.log_params({k: str(v)[:500] for k, v in {**flatten(params), **(tags or {})}.items()})
        yield StageRun(mlflow)


METRIC_COLUMNS = {
    "evaluate": ["fid", "fid_last", "is", "kid", "rel_fid", "images_per_s"],
    "distill": ["best_monitor_fid", "final_monitor_fid", "train_seconds", "kimg_per_s"],
}


def compare_table(experiment=None, stage="evaluate"):
    """One row per MLflow run of `stage`: method, lr, batch, seed, the stage's metrics and when it ran."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri())
    names = (
        [experiment]
        if experiment
        else [e.name for e in mlflow.search_experiments() if e.name.startswith("distillery-")]
    )
    runs = (
        mlflow.search_runs(
            experiment_names=names, filter_string=f"tags.stage = '{stage}'", order_by=["attributes.start_time DESC"]
        )
        if names
        else pd.DataFrame()
    )
    columns = [
        "tags.dvc_stage",
        "params.method",
        "params.lr",
        "params.batch",
        "params.seed",
        *[f"metrics.{m}" for m in METRIC_COLUMNS[stage]],
        "start_time",
    ]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    table = runs.reindex(columns=columns)
    table.columns = [c.split(".", 1)[-1] for c in columns]
    return table
