"""Checkpoints carry their sha256 in a manifest: a damaged newest one is skipped loudly for the one before it, a run
whose checkpoints are all damaged stops with a clear error, another run's checkpoints are removed unread, and only
the newest `keep` stay on disk."""

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch
import yaml

from pipeline.params import ParamsError, load_params

from distillery.checkpoint import CheckpointError, Checkpoints
from distillery.data import load_digits_dataset, save_dataset
from distillery.training import train_teacher

from stages.paths import DATASET

from conftest import ROOT, dump_params
from toys import tiny_edm


class Interrupt(Exception):
    pass


def teacher_run(directory, fingerprint="f", keep=2, stop_at=None):
    """The EMA of 10 iterations of batch 16 with a checkpoint every 2 (after 32, 64, 96 and 128 images); with
    `stop_at`, the run dies once it has seen that many images."""

    def progress(nimg, _):
        if stop_at is not None and nimg >= stop_at:
            raise Interrupt

    torch.manual_seed(1)
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    return train_teacher(
        tiny_edm(dropout=0.1),
        images,
        None,
        batch=16,
        lr=1e-3,
        lr_rampup_kimg=0.05,
        duration_kimg=0.16,
        ema_halflife_kimg=0.05,
        ema_rampup_ratio=0.05,
        checkpoints=Checkpoints(directory, fingerprint, keep),
        checkpoint_kimg=0.032,
        on_progress=progress,
    ).ema


def interrupted_run(directory, fingerprint="f"):
    """A run killed after its checkpoints at 64 and 96 images (kept: 2); returns the manifest's entries."""
    with pytest.raises(Interrupt):
        teacher_run(directory, fingerprint, stop_at=112)
    listed = manifest(directory)["checkpoints"]
    assert [e["nimg"] for e in listed] == [64, 96]
    return listed


def manifest(directory):
    return json.loads((directory / "manifest.json").read_text())


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(directory):
    return sorted(p.name for p in directory.iterdir())


def assert_same_bits(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def flip_tensor_bytes(path):
    """Invert 16 bytes in the middle of the largest tensor record of a torch.save file: it still loads."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = record.header_offset
    start = header + 30 + int.from_bytes(data[header + 26 : header + 28], "little")
    start += int.from_bytes(data[header + 28 : header + 30], "little")  # past the local header's name and extra field
    middle = start + record.file_size // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    torch.load(path, map_location="cpu", weights_only=True)  # the damage is invisible to torch.load


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [flip_tensor_bytes, truncate], ids=["flipped", "truncated"])
def test_a_damaged_newest_checkpoint_is_skipped_loudly_for_the_one_before(tmp_path, capsys, damage):
    reference = teacher_run(tmp_path / "a")
    directory = tmp_path / "b"
    older, newest = interrupted_run(directory)
    damage(directory / newest["file"])
    found, size = sha256(directory / newest["file"]), (directory / newest["file"]).stat().st_size
    capsys.readouterr()
    resumed = teacher_run(directory)
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        f"warning: {directory / newest['file']}: expected sha256 {newest['sha256']} ({newest['size']} bytes), "
        f"found {found} ({size} bytes); "
        f"resuming from {directory / older['file']} instead"
    ]
    assert_same_bits(reference, resumed)
    # the run redid the checkpoint after 96 images, and only the newest two are left
    assert [e["nimg"] for e in manifest(directory)["checkpoints"]] == [96, 128]
    assert files(directory) == ["manifest.json", "nimg-000000096.pt", "nimg-000000128.pt"]
    assert manifest(directory)["checkpoints"][0]["sha256"] == sha256(directory / "nimg-000000096.pt") != found


def test_a_run_whose_checkpoints_are_all_damaged_stops_naming_the_directory(tmp_path):
    directory = tmp_path / "run"
    listed = interrupted_run(directory)
    flip_tensor_bytes(directory / listed[1]["file"])
    truncate(directory / listed[0]["file"])
    before = {name: (directory / name).read_bytes() for name in files(directory)}
    with pytest.raises(CheckpointError) as error:
        teacher_run(directory)
    message = str(error.value)
    assert message.startswith(f"no usable checkpoint in {directory}: {directory / listed[1]['file']}: expected sha256 ")
    assert all(
        f"{directory / e['file']}: expected sha256 {e['sha256']} ({e['size']} bytes), found " in message for e in listed
    )
    assert message.endswith(f"Delete {directory} to start this run afresh.")
    assert {name: (directory / name).read_bytes() for name in files(directory)} == before  # nothing touched


def test_a_manifest_that_is_not_json_is_a_clear_error(tmp_path):
    Checkpoints(tmp_path, "f").save(8, {"x": torch.ones(2)})
    (tmp_path / "manifest.json").write_text('{"fingerprint": "f", "checkpoints": [')
    with pytest.raises(
        CheckpointError, match=f"^{re.escape(str(tmp_path / 'manifest.json'))} is not a checkpoint manifest "
    ):
        Checkpoints(tmp_path, "f").latest()
    # an entry naming a file outside the directory is refused the same way
    (tmp_path / "manifest.json").write_text(
        json.dumps({"fingerprint": "f", "checkpoints": [{"file": "../x.pt", "nimg": 8, "size": 1, "sha256": "0" * 64}]})
    )
    with pytest.raises(CheckpointError, match="unexpected entry"):
        Checkpoints(tmp_path, "f").latest()


def test_checkpoints_of_another_fingerprint_are_removed_without_being_read(tmp_path, capsys):
    reference = teacher_run(tmp_path / "a")
    directory = tmp_path / "b"
    listed = interrupted_run(directory, fingerprint="another")
    for e in listed:
        (directory / e["file"]).write_bytes(b"not a checkpoint")  # reading it, let alone loading it, would fail
    with pytest.raises(CheckpointError):
        Checkpoints(directory, "another").latest()  # (its own run could not resume from them)
    shutil.copytree(directory, tmp_path / "c")
    stale = "{}: checkpoints of another run (other params or inputs), removed; training starts afresh\n"
    capsys.readouterr()
    assert Checkpoints(directory, "f").latest() is None
    assert capsys.readouterr().err == stale.format(directory) and not directory.exists()
    # a run over them trains from scratch: the bits of a run that never saw them
    fresh = teacher_run(tmp_path / "c")
    assert capsys.readouterr().err == stale.format(tmp_path / "c")
    assert_same_bits(reference, fresh)
    assert manifest(tmp_path / "c")["fingerprint"] == "f"


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_only_the_newest_keep_checkpoints_stay(tmp_path, keep):
    checkpoints, saved = Checkpoints(tmp_path, "f", keep), []
    for nimg in (8, 16, 24, 32):
        checkpoints.save(nimg, {"nimg": nimg, "x": torch.full([3], float(nimg))})
        saved.append(nimg)
        listed = manifest(tmp_path)["checkpoints"]
        assert [e["nimg"] for e in listed] == saved[-keep:]
        assert files(tmp_path) == ["manifest.json", *(e["file"] for e in listed)]
        for e in listed:
            assert (e["sha256"], e["size"]) == (sha256(tmp_path / e["file"]), (tmp_path / e["file"]).stat().st_size)
    assert checkpoints.latest()["nimg"] == 32
    with pytest.raises(ValueError, match="keep must be at least 1"):
        Checkpoints(tmp_path, "f", 0)


def test_a_file_the_manifest_does_not_list_is_ignored_and_removed(tmp_path):
    checkpoints = Checkpoints(tmp_path, "f")
    checkpoints.save(8, {"nimg": 8})
    checkpoints.save(16, {"nimg": 16})
    # a crash after the next file was renamed into place, before the manifest listed it; and a half-written file
    torch.save({"nimg": 24}, tmp_path / "nimg-000000024.pt")
    (tmp_path / ".nimg-000000032.pt.tmp").write_bytes(b"half")
    assert checkpoints.latest() == {"nimg": 16}
    assert files(tmp_path) == ["manifest.json", "nimg-000000008.pt", "nimg-000000016.pt"]


@pytest.mark.parametrize("section", ["teacher", "distill"])
def test_checkpoint_keep_below_one_is_refused(tmp_path, section):
    params = yaml.safe_load((ROOT / "profiles" / "micro.yaml").read_text())
    params[section]["checkpoint_keep"] = 0
    dump_params(tmp_path / "params.yaml", params)
    with pytest.raises(ParamsError, match=f"{section}.checkpoint_keep"):
        load_params(tmp_path / "params.yaml")


def test_the_teacher_stage_killed_and_damaged_exits_1_telling_to_delete_its_checkpoints(tmp_path):
    """The stage killed with SIGKILL mid-run keeps `teacher.checkpoint_keep` checkpoints; with all of them damaged
    the next run stops with exit 1 and one line saying what failed and what to do, and trains nothing."""
    params = yaml.safe_load((ROOT / "profiles" / "micro.yaml").read_text())
    params["teacher"].update(duration_kimg=1000, checkpoint_kimg=0.064, checkpoint_keep=3)  # one save per iteration
    dump_params(tmp_path / "params.yaml", params)
    for link in ("stages", "distillery", "pipeline"):
        (tmp_path / link).symlink_to(ROOT / link)
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    stage = [sys.executable, "-m", "stages.teacher"]
    (tmp_path / "data").mkdir()
    save_dataset(tmp_path / DATASET, *load_digits_dataset(), num_classes=10)  # what stage `data` writes, sooner

    directory, log = tmp_path / "checkpoints" / "teacher", tmp_path / "first-run.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(stage, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not ((directory / "manifest.json").exists() and manifest(directory)["checkpoints"][-1]["nimg"] >= 192):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no handler runs, the files are as the kill found them
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    listed = manifest(directory)["checkpoints"]
    assert len(listed) == 3
    for e in listed:
        flip_tensor_bytes(directory / e["file"])

    result = subprocess.run(stage, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("no usable checkpoint") == 1
    error = result.stderr[result.stderr.index("teacher: no usable") :].splitlines()[0]  # (after the progress bar)
    relative = "checkpoints/teacher"
    assert error.startswith(f"teacher: no usable checkpoint in {relative}: {relative}/{listed[-1]['file']}: expected ")
    assert error.endswith(f"Delete {relative} to start this run afresh.")
    assert files(directory) == ["manifest.json", *(e["file"] for e in listed)]  # a crash's leftovers gone, no others
    assert not (tmp_path / "models" / "teacher").exists()
