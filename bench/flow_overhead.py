"""Overhead of running the DAG through Prefect (`distillery run`) next to plain `dvc repro`.

Builds the micro profile in a temporary git + DVC repository, then measures, from one run:
  - no-op: `dvc repro` and `distillery run` on the built DAG (every stage up to date);
  - per stage: for stages the flow really runs, the task's wall time minus the stage command's own
    time (DVC checks, `dvc commit`, Prefect bookkeeping), after an edit that invalidates the study.
    .venv/bin/python bench/flow_overhead.py
Targets: no-op flow <= 20 s, overhead per stage <= 2 s.
"""

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import new_project, sh  # noqa: E402

DISTILLERY = str(Path(sys.executable).parent / "distillery")


def timed(args, repo, **kw):
    start = time.perf_counter()
    result = sh(args, repo, **kw)
    return time.perf_counter() - start, result


def flow(repo, timeline):
    env = {"PREFECT_HOME": str(repo.parent / "prefect-home")}
    return timed([DISTILLERY, "run", "--max-parallel", "2", "--timeline", str(timeline)], repo, extra_env=env)


def main():
    work = Path(tempfile.mkdtemp(prefix="flow-bench-"))
    try:
        repo = new_project(work / "repo")
        build, _ = timed(["dvc", "repro"], repo)
        print(f"build (dvc repro, micro profile): {build:.1f} s")
        flow(repo, work / "warmup.json")  # the first flow on a fresh PREFECT_HOME also creates its database
        dvc_noop, _ = timed(["dvc", "repro"], repo)
        flow_noop, _ = flow(repo, work / "noop.json")
        print(f"no-op dvc repro:      {dvc_noop:6.1f} s")
        print(f"no-op distillery run: {flow_noop:6.1f} s   (target <= 20 s)")

        params = (repo / "params.yaml").read_text()
        (repo / "params.yaml").write_text(params.replace('lrs: ["1e-4", "3e-5"]', 'lrs: ["2e-4", "5e-5"]'))
        total, _ = flow(repo, work / "run.json")
        timeline = json.loads((work / "run.json").read_text())
        ran = {n: t for n, t in timeline.items() if t.get("ran")}
        overhead = {
            n: (t["task_finished"] - t["task_started"]) - (t["finished"] - t["started"]) for n, t in ran.items()
        }
        for name, seconds in overhead.items():
            print(
                f"  {name:<22} stage {ran[name]['finished'] - ran[name]['started']:6.1f} s   overhead {seconds:5.2f} s"
            )
        print(
            f"flow with {len(ran)} stages run: {total:.1f} s; overhead per stage: "
            f"mean {statistics.mean(overhead.values()):.2f} s, max {max(overhead.values()):.2f} s   (target <= 2 s)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
