"""What machines share through the DVC remote (pipeline/remote.py), on a folder remote: a running stage's checkpoints
mirrored as they rotate and fetched by another clone to resume from; the outputs DVC does not cache carried whole;
and `distillery run --pool` refusing, before any server is asked, a repository the workers could not reproduce."""

import json
import subprocess

import pytest
import torch

from pipeline.remote import CheckpointMirror, Remote

from distillery.checkpoint import Checkpoints

from conftest import BIN, new_project, sh, tool_env

DIRECTORY = "checkpoints/distill-sid-1e-4"


@pytest.fixture
def clones(tmp_path):
    """Two clones of one repository whose default DVC remote is a folder."""
    seed = tmp_path / "seed"
    seed.mkdir()
    sh(["git", "init", "-q"], seed)
    sh(["dvc", "init", "-q"], seed)
    sh(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], seed)
    sh(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qam", "remote"], seed)
    for name in ("a", "b"):
        sh(["git", "clone", "-q", str(seed), str(tmp_path / name)], tmp_path)
    return tmp_path / "a", tmp_path / "b", tmp_path / "remote"


def save(root, nimg, fingerprint="run-1"):
    Checkpoints(root / DIRECTORY, fingerprint, keep=2).save(nimg, {"w": torch.full((3,), float(nimg))})


def test_checkpoints_mirrored_as_they_rotate_are_resumed_from_in_another_clone(clones):
    a, b, folder = clones
    with CheckpointMirror(Remote(a), DIRECTORY, every=3600) as mirror:
        for nimg in (64, 128, 192):
            save(a, nimg)
            mirror.sync()  # what its thread does every `every` seconds
    mirrored = folder / "distillery" / DIRECTORY
    assert sorted(p.name for p in mirrored.iterdir()) == ["manifest.json", "nimg-000000128.pt", "nimg-000000192.pt"]

    assert Remote(b).pull_checkpoints(DIRECTORY) == 192
    assert torch.equal(Checkpoints(b / DIRECTORY, "run-1").latest()["w"], torch.full((3,), 192.0))
    assert (b / DIRECTORY / "nimg-000000192.pt").read_bytes() == (a / DIRECTORY / "nimg-000000192.pt").read_bytes()

    # a clone that went as far keeps its own; one of another configuration is left to the stage to discard
    assert Remote(b).pull_checkpoints(DIRECTORY) is None
    save(b, 256, fingerprint="run-2")
    assert Remote(b).pull_checkpoints(DIRECTORY) is None
    assert json.loads((b / DIRECTORY / "manifest.json").read_text())["fingerprint"] == "run-2"

    Remote(a).remove(DIRECTORY)
    assert Remote(b).pull_checkpoints(DIRECTORY) is None and not list(mirrored.iterdir())


def test_uncached_outputs_travel_whole(clones):
    a, b, _ = clones
    (a / "metrics" / "eval").mkdir(parents=True)
    (a / "metrics" / "eval" / "x.json").write_text('{"fid": 1.5}')
    (a / "reports").mkdir()
    (a / "reports" / "results.md").write_text("| a |\n")
    Remote(a).put_files("outs/run-1", ["metrics/eval", "reports/results.md"])
    Remote(b).get_files("outs/run-1", ["metrics/eval", "reports/results.md"])
    assert (b / "metrics" / "eval" / "x.json").read_text() == '{"fid": 1.5}'
    assert (b / "reports" / "results.md").read_text() == "| a |\n"
    assert Remote(b).get_json("stages/none.json") is None


def pool_run(repo):
    return subprocess.run(
        [str(BIN / "distillery"), "run", "--pool", "lab"], cwd=repo, env=tool_env(), capture_output=True, text=True
    )


def test_a_pool_run_is_refused_before_any_server_when_workers_could_not_reproduce_it(tmp_path):
    repo = new_project(tmp_path / "repo")
    sh(["git", "clone", "-q", "--bare", str(repo), str(tmp_path / "origin.git")], tmp_path)
    sh(["git", "remote", "add", "origin", str(tmp_path / "origin.git")], repo)
    sh(["git", "fetch", "-q", "origin"], repo)

    refused = pool_run(repo)  # no DVC remote
    assert refused.returncode == 2 and "no default DVC remote" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    sh(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], repo)
    refused = pool_run(repo)  # .dvc/config changed, not committed
    assert refused.returncode == 2 and "uncommitted changes to .dvc/config" in refused.stderr, refused.stderr

    sh(["git", "commit", "-qam", "remote"], repo)
    refused = pool_run(repo)  # committed, not pushed
    assert refused.returncode == 2 and "is not on origin" in refused.stderr, refused.stderr
    assert not (repo / "dvc.lock").exists()
