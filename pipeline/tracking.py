"""MLflow conventions: one run per stage execution, in a local store inside the repository by default.

MLflow is for browsing and comparing; the DVC-tracked metric files stay the source of every table.
"""

import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode

# Keep MLflow off the network (telemetry) unless the user asked otherwise.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# An unreachable server costs seconds, not minutes: MLflow's defaults are a 120 s timeout and 7 retries with
# exponential backoff (about 4 min per call). A user's own settings win.
for _key, _value in {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}.items():
    os.environ.setdefault(_key, _value)
# A local store that fails (a full disk) is reported by StageRun in one line; MLflow would add the whole traceback.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

RETRY_EVERY_S = 30.0  # while the server is unreachable, logging calls send the held data again at most this often
UNSYNCED = "mlruns-unsynced"  # runs the server did not take, one JSON file each, until `distillery sync`
HOST_TAG, PROCESS_TAG = "distillery.host", "distillery.process"


def repo_root() -> Path:
    return Path(os.environ.get("DISTILLERY_ROOT", Path.cwd())).resolve()


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite store at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def now_ms():
    return int(time.time() * 1000)


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
    """The MLflow UI: DISTILLERY_MLFLOW_UI, else the tracking server (it serves the UI), else `distillery ui`'s."""
    server = os.environ.get("MLFLOW_TRACKING_URI", "")
    default = server if server.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return os.environ.get("DISTILLERY_MLFLOW_UI", default).rstrip("/")


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


def experiment_name(profile):
    return os.environ.get("DISTILLERY_EXPERIMENT", f"distillery-{profile}")


def ensure_experiment(client, name):
    """The id of experiment `name`, created as a model-training experiment."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name, tags={**EXPERIMENT_KIND, "mlflow.note.content": EXPERIMENT_NOTE})
        except MlflowException:
            pass  # a concurrent stage created it first
        experiment = client.get_experiment_by_name(name)
    elif experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        client.set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", "custom_model_development")
    return experiment.experiment_id


def process_tags():
    """This process, as its run records it: a run left RUNNING by a process that is gone is ended KILLED."""
    import psutil

    return {HOST_TAG: socket.gethostname(), PROCESS_TAG: f"{os.getpid()}-{psutil.Process().create_time():.3f}"}


def process_gone(tag):
    """Whether the process of a `distillery.process` tag (pid-start time) has exited: its pid is free or reused."""
    import psutil

    pid, _, started = tag.partition("-")
    try:
        return f"{psutil.Process(int(pid)).create_time():.3f}" != started
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, ValueError):
        return False  # not ours to judge: leave the run as it is


def close_orphans(client, experiment_id):
    """End KILLED the runs of this host left RUNNING by a process that is gone (SIGKILL, out of memory, power)."""
    where = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{socket.gethostname()}'"
    for run in client.search_runs([experiment_id], filter_string=where, max_results=1000):
        if process_gone(run.data.tags.get(PROCESS_TAG, "")):
            client.set_terminated(run.info.run_id, "KILLED")
            print(
                f"MLflow run {run.info.run_name} ({run.info.run_id}): its process is gone; ended KILLED",
                file=sys.stderr,
            )


def settle_current(client, run):
    """DVC records the outputs of a stage that succeeded: of its successful runs, the one started last is current,
    the others are history (a run sent late by `distillery sync` may be either)."""
    where = (
        f"tags.dvc_stage = '{run.tags['dvc_stage']}' and tags.current = 'true' and attributes.run_id != '{run.run_id}'"
    )
    others = client.search_runs([run.experiment_id], filter_string=where, max_results=1000)
    for other in others:
        if other.info.start_time <= run.start_time:
            client.set_tag(other.info.run_id, "current", "false")
    if any(other.info.start_time > run.start_time for other in others):
        client.set_tag(run.run_id, "current", "false")
        run.tags["current"] = "false"


def json_float(value):
    return value if math.isfinite(value) else str(value)  # strict JSON has no NaN: "nan", "inf" (float() reads them)


def first_line(error):
    """What went wrong, short: the socket error inside MLflow's long message when there is one."""
    text = str(error)
    cause = re.search(r"\[Errno -?\d+\] [^'\")\]]+|(Read|Connect) timed out[^'\")\]]*", text)
    return cause.group(0) if cause else (text.strip().splitlines() or [type(error).__name__])[0][:300]


def unsynced_dir(root=None):
    return Path(root or repo_root()) / UNSYNCED


class StageRun:
    """One MLflow run whose logging never fails the stage. What the server does not take (down, unreachable, its
    store failing) is held in memory and sent again with a later call, at most every RETRY_EVERY_S; at the end
    what is still held is written to mlruns-unsynced/ for `distillery sync`. run_id is None until the server has
    the run (it is created late, with its real start time, when the server was unreachable at the start)."""

    def __init__(self, experiment, name, tags, params=None, stage=None):
        self.experiment, self.name, self.stage = experiment, name, stage  # stage: the DVC stage this process runs
        self.run_id = self.experiment_id = None
        self.start_time, self.end_time, self.status = now_ms(), None, "RUNNING"
        self.tags, self.params = dict(tags), dict(params or {})
        # held: not yet taken by the server
        self.held_tags, self.held_params = dict(self.tags), dict(self.params)
        self.metrics, self.artifacts, self.tables = [], [], []  # (key, value, step, ms), paths, (file, frame)
        self.terminated = False
        self.failed_at = None  # time.monotonic() of the last failed send; None while the server takes everything
        self._client = None

    def log_metrics(self, metrics: dict, step: int | None = None):
        at = now_ms()
        self.metrics += [(k, float(v), step or 0, at) for k, v in metrics.items()]
        self.send_when_due()

    def log_artifact(self, path):
        self.artifacts.append(str(Path(path).resolve()))
        self.send_when_due()

    def log_table(self, frame, artifact_file):
        self.tables.append((artifact_file, frame))
        self.send_when_due()

    def set_tag(self, key, value):
        self.set_tags({key: value})

    def set_tags(self, tags):
        tags = {k: str(v) for k, v in tags.items()}
        self.tags.update(tags)
        self.held_tags.update(tags)
        self.send_when_due()

    def pending(self):
        """Whether the server lacks anything of this run."""
        return bool(
            self.run_id is None
            or self.held_tags
            or self.held_params
            or self.metrics
            or self.artifacts
            or self.tables
            or (self.status != "RUNNING" and not self.terminated)
        )

    def send_when_due(self):
        if self.failed_at is None or time.monotonic() - self.failed_at >= RETRY_EVERY_S:
            self.try_send()

    def try_send(self):
        """Send what is held; a failure keeps it held (and warns once). Returns whether the server has it all."""
        try:
            self.send()
        except Exception as e:  # whatever the tracking server or its store does, the stage goes on
            if self.failed_at is None:
                print(
                    f"warning: MLflow unreachable ({tracking_uri()}): {first_line(e)}. {self.name} goes on; its "
                    f"MLflow data is held and sent again at most every {RETRY_EVERY_S:g} s",
                    file=sys.stderr,
                    flush=True,
                )
            self.failed_at = time.monotonic()
            return False
        if self.failed_at is not None:
            print(f"MLflow reachable again: the held data of {self.name} is sent", file=sys.stderr, flush=True)
            self.failed_at = None
        return True

    def client(self):
        import mlflow

        if self._client is None:
            mlflow.set_tracking_uri(tracking_uri())
            self._client = mlflow.MlflowClient(tracking_uri())
        return self._client

    def create(self, client):
        from pipeline import events

        self.experiment_id = ensure_experiment(client, self.experiment)
        made = self.made_before(client)
        if made is not None:  # the server created it but its answer was lost: carry on with that run
            self.run_id, self.held_tags = made, {}
            return
        close_orphans(client, self.experiment_id)
        if self.stage and "mlflow.parentRunId" not in self.tags:
            parent = invocation_parent(client, self.experiment_id)
            if parent:
                self.tags["mlflow.parentRunId"] = self.held_tags["mlflow.parentRunId"] = parent  # nests it in the UI
        run = client.create_run(self.experiment_id, start_time=self.start_time, tags=self.held_tags, run_name=self.name)
        self.run_id, self.held_tags = run.info.run_id, {}
        if self.stage:
            events.emit("mlflow_run", stage=self.stage, url=ui_url(self.experiment_id, self.run_id))

    def made_before(self, client):
        """The id of this very run if an earlier create_run reached the server (same process, name and start)."""
        process = self.tags.get(PROCESS_TAG)
        if self.run_id is not None or process is None:
            return None
        where = f"tags.`{PROCESS_TAG}` = '{process}' and attributes.run_name = '{self.name}'"
        found = client.search_runs([self.experiment_id], filter_string=where, max_results=10)
        return next((r.info.run_id for r in found if r.info.start_time == self.start_time), None)

    def send(self):
        """Send everything held, in order, forgetting each part once the server has it; raises on a failure."""
        from mlflow.entities import Metric, Param, RunTag

        client = self.client()
        if self.run_id is None:
            self.create(client)
        for held, entity in ((self.held_params, Param), (self.held_tags, RunTag)):
            items = list(held.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params or tags per batch
                kind = "params" if entity is Param else "tags"
                client.log_batch(self.run_id, **{kind: [entity(k, v) for k, v in items[i : i + 100]]})
            held.clear()
        while self.metrics:
            batch = self.metrics[:1000]  # and 1000 metrics
            client.log_batch(self.run_id, metrics=[Metric(k, v, at, step) for k, v, step, at in batch])
            del self.metrics[: len(batch)]
        while self.artifacts:
            if Path(self.artifacts[0]).exists():
                client.log_artifact(self.run_id, self.artifacts[0])
            else:
                print(f"warning: {self.artifacts[0]} is gone: not logged to MLflow", file=sys.stderr)
            self.artifacts.pop(0)
        while self.tables:
            artifact_file, frame = self.tables[0]
            client.log_table(self.run_id, data=frame, artifact_file=artifact_file)
            self.tables.pop(0)
        if self.status != "RUNNING" and not self.terminated:
            if self.status == "FINISHED" and self.tags.get("current") == "true":
                settle_current(client, self)
            client.set_terminated(self.run_id, self.status, self.end_time)
            self.terminated = True

    def end(self, status):
        """End the run with `status` (FINISHED, FAILED, KILLED). What the server does not take then is written to
        mlruns-unsynced/, and a warning names the file."""
        if self.status != "RUNNING":
            return
        self.status, self.end_time = status, now_ms()
        try:
            self.try_send()
        finally:  # also when a signal interrupts the last send
            if self.pending():
                name = re.sub(r"[^\w@.-]", "_", self.name)
                path = self.write_unsynced(
                    unsynced_dir() / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.json"
                )
                parts = [f"{len(self.metrics)} metrics"] if self.metrics else []
                if self.artifacts or self.tables:
                    parts.append(f"{len(self.artifacts) + len(self.tables)} artifacts")
                held = ", ".join(parts)
                kept = (
                    (f"the whole run ({held})" if held else "the whole run")
                    if self.run_id is None
                    else held or "its end"
                )
                print(
                    f"warning: MLflow unreachable: {kept} of {self.name} ({status}) kept in {path}; "
                    "`distillery sync` sends them",
                    file=sys.stderr,
                    flush=True,
                )

    def write_unsynced(self, path):
        """Write what the server lacks as one strict JSON record, the held artifacts copied into a folder beside it
        (the stage may change or delete them before they are sent). Returns the path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = path.with_suffix("")
        artifacts = []
        for artifact in map(Path, self.artifacts):
            if artifact.parent != folder:
                if not artifact.exists():
                    print(f"warning: {artifact} is gone: not kept for MLflow", file=sys.stderr)
                    continue
                folder.mkdir(exist_ok=True)
                copy = shutil.copytree if artifact.is_dir() else shutil.copy2
                copy(artifact, folder / artifact.name)
            artifacts.append(f"{folder.name}/{artifact.name}")
        record = {
            "tracking_uri": tracking_uri(),
            "experiment": self.experiment,
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,  # null: the server never had the run
            "run_name": self.name,
            "status": self.status,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "tags": self.tags,
            "params": self.params,
            "metrics": [
                {"key": k, "value": json_float(v), "step": step, "timestamp": at} for k, v, step, at in self.metrics
            ],
            "artifacts": artifacts,
            "tables": [
                {"artifact_file": file, **json.loads(frame.to_json(orient="split", index=False))}
                for file, frame in self.tables
            ],
        }
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_record(cls, path):
        """The run a file of mlruns-unsynced/ records, all of it held (tags and params again: they are
        idempotent)."""
        record = json.loads(Path(path).read_text())
        run = cls(record["experiment"], record["run_name"], record["tags"], record["params"])
        run.experiment_id, run.run_id, run.status = record["experiment_id"], record["run_id"], record["status"]
        run.start_time, run.end_time = record["start_time"], record["end_time"]
        run.metrics = [(m["key"], float(m["value"]), m["step"], m["timestamp"]) for m in record["metrics"]]
        run.artifacts = [str(Path(path).parent / a) for a in record["artifacts"]]
        if record["tables"]:
            import pandas as pd

            run.tables = [(t["artifact_file"], pd.DataFrame(t["data"], columns=t["columns"])) for t in record["tables"]]
        return run


@contextmanager
def ended(run):
    """End `run` FINISHED; FAILED when the body raises; KILLED when a signal or Ctrl-C stopped it (the stage
    skeleton turns SIGTERM into a KeyboardInterrupt)."""
    try:
        yield run
    except KeyboardInterrupt:
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")


def pipeline_tags():
    return {"stage": "pipeline", "git_commit": git_commit()}


def resolve_tags(tags):
    """The tags with MLflow's own (user, source) added, as `mlflow.start_run` adds them."""
    from mlflow.tracking.context.registry import resolve_tags as mlflow_tags

    return mlflow_tags(tags)


@contextmanager
def parent_run(root, name):
    """The MLflow run that groups the stage runs of one pipeline invocation; yields its run_id and experiment_id
    (empty strings when the server was unreachable at the start: the stages then run ungrouped)."""
    from pipeline.params import load_params

    os.environ["DISTILLERY_ROOT"] = str(root)
    experiment = experiment_name(load_params(Path(root) / "params.yaml").profile)
    run = StageRun(experiment, name, resolve_tags({**pipeline_tags(), **process_tags()}))
    run.try_send()
    try:
        with ended(run):
            yield SimpleNamespace(run_id=run.run_id or "", experiment_id=run.experiment_id or "")
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


def invocation_parent(client, experiment_id):
    """The parent run of the `dvc repro` this stage runs under (created by its first stage), so that the stage
    runs of a plain `dvc repro` are grouped as those of `distillery repro` are."""
    invocation = dvc_invocation()
    if invocation is None:
        return None
    key = "distillery.dvc_invocation"
    found = client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{invocation}'")
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name="dvc repro", tags={**pipeline_tags(), key: invocation})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@contextmanager
def stage_run(stage: str, params: dict, tags: dict | None = None):
    """An MLflow run named after the DVC stage, with the given (flattened) params and the standard tags; ended
    FINISHED, FAILED (the stage raised) or KILLED (a signal stopped it). An unreachable server never fails the
    stage: see StageRun.

    The run-specific `tags` (method, lr, batch, seed) are logged as params too: the MLflow UI compares runs by
    params and filters them by tags. On success the run is tagged with the md5 of every file the stage wrote
    (what dvc.lock records), by which `mark_current` tells the runs the present dvc.lock points to."""
    from pipeline.io import WRITTEN, file_hash

    all_tags = {"stage": stage.split("@")[0], "dvc_stage": stage, "git_commit": git_commit(), **process_tags()}
    if os.environ.get("DISTILLERY_PARENT_RUN_ID"):
        all_tags["mlflow.parentRunId"] = os.environ["DISTILLERY_PARENT_RUN_ID"]  # nests it in the UI
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    logged = {k: str(v)[:500] for k, v in {**flatten(params), **(tags or {})}.items()}
    experiment = experiment_name(params.get("profile", "default"))
    run = StageRun(experiment, stage, resolve_tags(all_tags), logged, stage=stage)
    run.try_send()  # the run exists on the server from the start when it answers
    del WRITTEN[:]
    with ended(run):
        yield run
        written = " ".join(file_hash(p, "md5") for p in WRITTEN if p.is_file())
        run.set_tags({"outputs_md5": written, "current": "true"})


def sync_unsynced(root=None):
    """Send the runs kept in mlruns-unsynced/ to the tracking server, deleting each file once the server has it
    all; returns how many were sent. Raises RuntimeError at the first that cannot be sent (what of it was sent
    stays sent: its file is rewritten with the rest)."""
    files = sorted(unsynced_dir(root).glob("*.json"))
    for i, path in enumerate(files):
        run = StageRun.from_record(path)
        try:
            run.send()
        except Exception as e:
            run.write_unsynced(path)
            raise RuntimeError(
                f"{path}: not sent to {tracking_uri()} ({first_line(e)}); {len(files) - i} unsynced runs left"
            ) from None
        path.unlink()
        shutil.rmtree(path.with_suffix(""), ignore_errors=True)
        print(f"sent {path.name}: run {run.name} ({run.status}) -> {ui_url(run.experiment_id, run.run_id)}")
    return len(files)


def unsynced_note(root=None):
    """A line saying how many runs wait in mlruns-unsynced/, or None."""
    count = len(list(unsynced_dir(root).glob("*.json")))
    if count:
        return (
            f"{count} runs kept in {UNSYNCED}/ while MLflow was unreachable are not shown: `distillery sync` sends them"
        )
    return None


def locked_md5s(root):
    """{DVC stage name: md5s of its outputs} as the present dvc.lock records them."""
    from ruamel.yaml import YAML

    lock = Path(root) / "dvc.lock"
    stages = (YAML(typ="safe", pure=True).load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    return {name: {out.get("md5") for out in stage.get("outs", [])} for name, stage in stages.items()}


def mark_current(root=None, experiments=None):
    """Tag every stage run `current` true when dvc.lock points to its outputs, else false (history). dvc.lock keeps
    the entries of stages since removed from dvc.yaml: a run of a removed lr is history too. An unreachable server
    only warns (the report stage calls this): the next report, `distillery repro`/`run` or `compare` tags again."""
    try:
        tag_current(root, experiments)
    except Exception as e:  # MLflow unreachable or failing: never the stage's failure
        print(f"warning: MLflow unreachable: `current` tags not updated ({first_line(e)})", file=sys.stderr)


def tag_current(root, experiments):
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
