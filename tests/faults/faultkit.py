"""The parts of the fault-injection suite (`make test-faults`). Faults are injected into real stage processes of a
micro project built by the real `dvc repro`, and each must be survived: the run finishes with the bits of an
undisturbed run, or stops with a clear error, and no output that existed before the fault is lost or changed.

Every injected fault is counted in `LEDGER`; the session ends with one line
`faults: N injected, M survived, K artifacts lost`.
"""

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.io import file_hash

from conftest import BIN, dump_params, new_project, sh

VOLATILE = ("train_seconds", "kimg_per_s", "images_per_s")  # timings: the only fields two identical runs differ in


class Ledger:
    def __init__(self):
        self.injected, self.survived, self.lost = 0, 0, 0

    @contextmanager
    def fault(self, project=None, keep=None):
        """One injected fault: survived when the block ends without error; `keep` ({path: digest} of outputs that
        must come through unchanged) is checked at the end, each missing or changed file counting as lost."""
        self.injected += 1
        yield
        lost = changed(project, keep) if keep else []
        self.lost += len(lost)
        assert not lost, f"outputs lost or changed by the fault: {lost}"
        self.survived += 1

    def line(self):
        return f"faults: {self.injected} injected, {self.survived} survived, {self.lost} artifacts lost"


LEDGER = Ledger()


def digest(path):
    """The bits of an output, JSON files without their timing fields."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in VOLATILE}
        return json.dumps(data, sort_keys=True)
    return file_hash(path)


def stage_outputs(project, stage):
    """The files a DVC stage writes (its outs and metrics, directories expanded), relative to the project."""
    from dvc.repo import Repo

    repo = Repo(str(project))
    try:
        (st,) = repo.stage.collect(f"{project / 'dvc.yaml'}:{stage}")  # not the cwd's dvc.yaml
        paths = [Path(str(out.def_path)) for out in st.outs]
    finally:
        repo.close()
    files = []
    for p in paths:
        full = project / p
        files += sorted(f.relative_to(project) for f in full.rglob("*") if f.is_file()) if full.is_dir() else [p]
    return files


def snapshot(project, files):
    return {str(f): digest(project / f) for f in files if (project / f).is_file()}


def changed(project, keep):
    return [f for f, d in keep.items() if not (project / f).is_file() or digest(project / f) != d]


def debris(project):
    """Temporary files of interrupted writes left anywhere in the project's outputs."""
    skip = {".git", ".dvc", "mlruns", "stages", "distillery", "pipeline"}
    return [
        p.relative_to(project)
        for p in project.rglob("*")
        if not set(p.relative_to(project).parts) & skip and (p.name.endswith((".tmp", ".old")))
    ]


def env(extra=None):
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **(extra or {}),
    }


def stage_command(project, stage):
    from dvc.repo import Repo

    repo = Repo(str(project))
    try:
        (st,) = repo.stage.collect(f"{project / 'dvc.yaml'}:{stage}")  # not the cwd's dvc.yaml
        return st.cmd
    finally:
        repo.close()


def start(args, project, extra_env=None, shell=False):
    """A process in its own process group (so that a kill reaches every process it started), output captured."""
    return subprocess.Popen(
        args,
        cwd=project,
        env=env(extra_env),
        shell=shell,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_group(proc, sig=signal.SIGKILL):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    return proc.communicate(timeout=60)


def run_stage(project, stage, extra_env=None, timeout=600):
    """The stage's command as DVC would run it, to completion: (exit code, stdout, stderr, seconds)."""
    started = time.monotonic()
    proc = start(stage_command(project, stage), project, extra_env, shell=True)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, time.monotonic() - started


FAULT_PARAMS = {
    # long enough that a kill lands in training, with checkpoints to resume from (seconds per stage)
    "teacher": {"duration_kimg": 3, "checkpoint_kimg": 0.5},
    "distill": {"duration_kimg": 0.256, "checkpoint_kimg": 0.064, "monitor_kimg": 0.128},
}


def fault_params(project, **sections):
    """Rewrite the project's params.yaml with the given section updates (dicts merged key by key)."""
    from ruamel.yaml import YAML

    params = YAML(typ="safe", pure=True).load((project / "params.yaml").read_text())
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(params.get(section), dict):
            params[section].update(values)
        else:
            params[section] = values
    dump_params(project / "params.yaml", params)
    sh([str(BIN / "distillery"), "validate"], project)  # rewrites runs.yaml for the new params


def build_reference(path):
    """A micro project with the fault sizes, fully built by `dvc repro`: the undisturbed run every fault is
    compared with. Copy it (`copy_project`) before changing it."""
    project = new_project(path)
    fault_params(project, **FAULT_PARAMS)
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "fault sizes"], project)
    sh(["dvc", "repro"], project, extra_env={"OMP_NUM_THREADS": "1"})
    return project
