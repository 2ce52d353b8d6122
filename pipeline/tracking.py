"""MLflow conventions: one run per stage execution, in a local store inside the repository by default.

MLflow is for browsing and comparing; the DVC-tracked metric files stay the source of every table.
"""

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

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


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow's model-training view, not GenAI
EXPERIMENT_NOTE = (
    "One MLflow run per DVC stage execution. Compare methods and learning rates: the Chart view of the runs found by "
    "`tags.stage LIKE 'distill%' and tags.current = 'true'`, sorted by best_monitor_fid: `fid` is the monitoring FID "
    "over training (step: images seen), one line per run (`distillery ui` prints the link). `tags.current = 'true'` "
    "keeps the runs the present dvc.lock points to."
)
MODEL_TRAINING = "workflowType=machine_learning"  # the UI's model-training mode (GenAI is its default)
# the current distill runs, not nested under their pipeline run (MLflow nests only when sorted by date)
FID_VIEW = {
    "compareRunsMode": "CHART",
    "searchFilter": "tags.stage LIKE 'distill%' and tags.current = 'true'",
    "orderByKey": "metrics.`best_monitor_fid`",
    "orderByAsc": "true",
}


def ui_base():
    return os.environ.get("DISTILLERY_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/")


def ui_url(experiment_id, run_id=None):
    """Where the MLflow UI of `distillery ui` (or DISTILLERY_MLFLOW_UI) shows an experiment or a run."""
    return f"{ui_base()}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + f"?{MODEL_TRAINING}"


def fid_view_url(experiment_id):
    """One click to FID over training images of every current distill run, one line per method and lr."""
    return f"{ui_base()}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}&{urlencode(FID_VIEW)}"


def experiment_links():
    """[(name, experiment URL, FID view URL)] of the distillery experiments in the tracking store."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return [
        (e.name, ui_url(e.experiment_id), fid_view_url(e.experiment_id))
        for e in mlflow.search_experiments()
        if e.name.startswith("distillery-")
    ]


class StageRun:
    def __init__(self, mlflow, run):
        self._mlflow = mlflow
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id

    def log_metrics(self, metrics: dict, step: int | None = None):
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path):
        self._mlflow.log_artifact(str(path))

    def log_table(self, frame, artifact_file):
        self._mlflow.log_table(data=frame, artifact_file=artifact_file)

    def set_tag(self, key, value):
        self._mlflow.set_tag(key, str(value))


def set_experiment(mlflow, profile):
    """The profile's experiment, created as a model-training experiment; returns its id."""
    mlflow.set_tracking_uri(tracking_uri())
    name = os.environ.get("DISTILLERY_EXPERIMENT", f"distillery-{profile}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name, tags={**EXPERIMENT_KIND, "mlflow.note.content": EXPERIMENT_NOTE})
        except mlflow.exceptions.MlflowException:
            pass  # a concurrent stage created it first
        experiment = client.get_experiment_by_name(name)
    elif experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        client.set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", "custom_model_development")
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


def pipeline_tags():
    return {"stage": "pipeline", "git_commit": git_commit()}


@contextmanager
def parent_run(root, name):
    """The MLflow run that groups the stage runs of one pipeline invocation; yields it (its run_id, experiment_id)."""
    import mlflow

    from pipeline.params import load_params

    os.environ["DISTILLERY_ROOT"] = str(root)
    set_experiment(mlflow, load_params(Path(root) / "params.yaml").profile)
    try:
        with mlflow.start_run(run_name=name, tags=pipeline_tags()) as run:
            yield run.info
    finally:
        mark_current(root)  # what DVC recorded, also of a run that failed part-way


def dvc_invocation():
    """(pid, start time) of the `dvc repro` (or `dvc exp run`) process this stage runs under, or None."""
    import psutil

    try:
        for proc in psutil.Process().parents():
            args = [Path(a).name for a in proc.cmdline()[:3]]
            if "dvc" in args and ("repro" in args or "exp" in args):
                return f"{proc.pid}-{proc.create_time():.3f}"
    except psutil.Error:
        return None
    return None


def invocation_parent(mlflow, experiment_id):
    """The parent run of the `dvc repro` this stage runs under (created by its first stage), so that the stage
    runs of a plain `dvc repro` are grouped as those of `distillery repro` are."""
    invocation = dvc_invocation()
    if invocation is None:
        return None
    key = "distillery.dvc_invocation"
    found = mlflow.search_runs(
        experiment_ids=[experiment_id], filter_string=f"tags.`{key}` = '{invocation}'", output_format="list"
    )
    if found:
        return found[0].info.run_id
    run = mlflow.MlflowClient().create_run(
        experiment_id, run_name="dvc repro", tags={**pipeline_tags(), key: invocation}
    )
    mlflow.MlflowClient().set_terminated(run.info.run_id)
    return run.info.run_id


@contextmanager
def stage_run(stage: str, params: dict, tags: dict | None = None):
    """An MLflow run named after the DVC stage, with the given (flattened) params and the standard tags.

    The run-specific `tags` (method, lr, batch, seed) are logged as params too: the MLflow UI compares runs by
    params and filters them by tags. On success the run is tagged with the md5 of every file the stage wrote
    (what dvc.lock records), by which `mark_current` tells the runs the present dvc.lock points to."""
    import mlflow

    from pipeline import events
    from pipeline.io import WRITTEN, file_hash

    experiment_id = set_experiment(mlflow, params.get("profile", "default"))
    all_tags = {"stage": stage.split("@")[0], "dvc_stage": stage, "git_commit": git_commit()}
    parent = os.environ.get("DISTILLERY_PARENT_RUN_ID") or invocation_parent(mlflow, experiment_id)
    if parent:
        all_tags["mlflow.parentRunId"] = parent  # nests it in the UI
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        events.emit("mlflow_run", stage=stage, url=ui_url(experiment_id, run.info.run_id))
        mlflow.log_params({k: str(v)[:500] for k, v in {**flatten(params), **(tags or {})}.items()})
        del WRITTEN[:]
        yield StageRun(mlflow, run)
        written = " ".join(file_hash(p, "md5") for p in WRITTEN if p.is_file())
        mlflow.set_tags({"outputs_md5": written, "current": "true"})
    # DVC records the outputs of a stage that succeeded: its earlier runs are history from now on
    client = mlflow.MlflowClient()
    earlier = f"tags.dvc_stage = '{stage}' and tags.current = 'true' and attributes.run_id != '{run.info.run_id}'"
    for old in client.search_runs([experiment_id], filter_string=earlier):
        client.set_tag(old.info.run_id, "current", "false")


def locked_md5s(root):
    """{DVC stage name: md5s of its outputs} as the present dvc.lock records them."""
    from ruamel.yaml import YAML

    lock = Path(root) / "dvc.lock"
    stages = (YAML(typ="safe", pure=True).load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    return {name: {out.get("md5") for out in stage.get("outs", [])} for name, stage in stages.items()}


def mark_current(root=None, experiments=None):
    """Tag every stage run `current` true when dvc.lock points to its outputs, else false (history). dvc.lock keeps
    the entries of stages since removed from dvc.yaml: a run of a removed lr is history too."""
    import mlflow

    from pipeline.params import load_params

    root = Path(root or repo_root())
    mlflow.set_tracking_uri(tracking_uri())
    locked = locked_md5s(root)
    runs = {run.name for run in load_params(root / "params.yaml").runs()}
    names = experiments or [e.name for e in mlflow.search_experiments() if e.name.startswith("distillery-")]
    if not names:
        return
    client = mlflow.MlflowClient()
    for run in mlflow.search_runs(
        experiment_names=names, filter_string="tags.stage != 'pipeline'", output_format="list"
    ):
        tags = run.data.tags
        stage = tags.get("dvc_stage", "")
        written = set(tags.get("outputs_md5", "").split())
        live = "method" not in tags or stage.partition("@")[2] in runs  # a run stage of params.yaml's study
        if written:
            current = "true" if live and written <= locked.get(stage, set()) else "false"
        else:  # only directories written (no file hash to match): the latest successful run stays current
            current = "true" if live and stage in locked and tags.get("current") == "true" else "false"
        if tags.get("current") != current:
            client.set_tag(run.info.run_id, "current", current)


METRIC_COLUMNS = {
    "evaluate": ["fid", "fid_last", "is", "kid", "precision", "recall", "rel_fid", "images_per_s"],
    "distill": ["best_monitor_fid", "final_monitor_fid", "best_kimg", "train_seconds", "kimg_per_s"],
}


def compare_table(experiment=None, stage="evaluate", history=False):
    """One row per MLflow run of `stage` (one-step and few-step runs): method, lr as written in params.yaml, batch,
    K, seed, the stage's metrics and when it ran; only the runs the present dvc.lock points to unless `history`."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri())
    names = (
        [experiment]
        if experiment
        else [e.name for e in mlflow.search_experiments() if e.name.startswith("distillery-")]
    )
    columns = [
        "tags.dvc_stage",
        "params.method",
        "params.lr",
        "params.batch",
        "params.steps",
        "params.seed",
        *[f"metrics.{m}" for m in METRIC_COLUMNS[stage]],
        "start_time",
        *(["tags.current"] if history else []),
    ]
    if not names:
        return pd.DataFrame(columns=[c.split(".", 1)[-1] for c in columns])
    mark_current(experiments=names)
    where = f"tags.stage LIKE '{stage}%'" + ("" if history else " and tags.current = 'true'")
    runs = mlflow.search_runs(experiment_names=names, filter_string=where, order_by=["attributes.start_time DESC"])
    table = runs.reindex(columns=columns)
    table.columns = [c.split(".", 1)[-1] for c in columns]
    if not history:
        table = table.sort_values("dvc_stage", kind="stable")
    return table
