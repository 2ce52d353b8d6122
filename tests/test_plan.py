"""`distillery plan` validates a profile and prints its DAG, downloads, disk and compute, offline."""

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.params import load_params
from pipeline.plan import dag, disk_gb, downloads, network

from conftest import ROOT, dump_params, sh

DISTILLERY = str(Path(sys.executable).parent / "distillery")


@pytest.mark.parametrize("profile", ["cifar10-uncond", "cifar10-cond"])
def test_plan_of_a_cifar10_profile_runs_offline(profile):
    out = sh([DISTILLERY, "plan", "--profile", profile, "--no-measure"], ROOT).stdout
    assert f"profile {profile}" in out and "valid" in out
    assert "distill@sid-1e-5" in out and "evaluate@gdd_i-1e-4" in out and "report" in out
    vp = "cond-vp" if profile == "cifar10-cond" else "uncond-vp"
    assert f"edm-cifar10-32x32-{vp}.pkl" in out and "cifar10-32x32.npz" in out


@pytest.mark.parametrize(
    "profile,teacher,lrs",
    [
        ("ffhq-64", "edm-ffhq-64x64-uncond-vp.pkl", ["1e-5", "2e-5"]),
        ("afhqv2-64", "edm-afhqv2-64x64-uncond-vp.pkl", ["5e-6", "2e-5"]),
        ("imagenet-64", "edm-imagenet-64x64-cond-adm.pkl", ["4e-6", "8e-6"]),
    ],
)
def test_plan_of_a_64px_profile_runs_offline(profile, teacher, lrs):
    out = sh([DISTILLERY, "plan", "--profile", profile, "--no-measure"], ROOT).stdout
    assert f"profile {profile}" in out and "valid" in out
    assert f"distill@sid-{lrs[0]}" in out and f"evaluate@gdd_i-{lrs[1]}" in out
    name = profile.replace("-64", "-64x64")
    assert teacher in out and f"fid-refs/{name}.npz" in out and f"local file datasets/{name}.zip" in out


@pytest.mark.parametrize(
    "profile,n_params",
    [
        ("cifar10-uncond", 55_733_891),
        ("cifar10-cond", 55_735_299),
        ("ffhq-64", 61_805_571),
        ("afhqv2-64", 61_805_571),
        ("imagenet-64", 295_899_267),
    ],
)
def test_each_profile_describes_its_official_teacher(profile, n_params):
    # parameter counts of the official checkpoints, docs/methods.md §1.4 (the meta device allocates nothing)
    with torch.device("meta"):
        net = network(load_params(ROOT / "profiles" / f"{profile}.yaml"))
    assert sum(p.numel() for p in net.parameters()) == n_params


def test_dag_is_dvcs_own_rendering_of_the_profile():
    stages = dag(ROOT, ROOT / "profiles" / "cifar10-uncond.yaml")
    assert len([s for s in stages if s.startswith("distill@")]) == 10
    # exactly the stages whose outputs dvc.yaml lists as deps: runs/sid-1e-5, models/features,
    # stats/reference{,_features}.npz and stats/teacher.npz
    assert stages["evaluate@sid-1e-5"] == ["distill@sid-1e-5", "features", "reference_stats", "teacher_samples"]
    assert stages["distill@sid-1e-5"] == ["data", "features", "reference_stats", "teacher"]
    order = list(stages)
    assert order.index("teacher") < order.index("distill@sid-1e-5") < order.index("report")


def test_downloads_and_disk_follow_the_profile():
    cifar = load_params(ROOT / "profiles" / "cifar10-uncond.yaml")
    assert any("edm-cifar10-32x32-uncond-vp.pkl" in url for _, url, _, _ in downloads(cifar))
    assert downloads(load_params(ROOT / "params.yaml")) == []  # the toy fetches nothing
    sizes = disk_gb(cifar, n_params=55_733_891)
    assert sizes["sample sets"] == 47 * 50_000 * 3 * 32 * 32  # teacher + 10 study runs + 36 few-step runs, uint8


def test_a_bad_profile_is_refused_naming_the_key(tmp_path):
    bad = (ROOT / "profiles" / "cifar10-uncond.yaml").read_text().replace("num_samples: 50000", "num_samples: -5")
    (tmp_path / "bad.yaml").write_text(bad)
    result = sh([DISTILLERY, "plan", "--profile", str(tmp_path / "bad.yaml"), "--no-measure"], ROOT, check=False)
    assert result.returncode == 2 and "evaluation.num_samples" in result.stderr


def test_the_measured_plan_times_each_method_and_counts_the_fid_trials():
    out = sh([DISTILLERY, "plan", "--profile", str(ROOT / "profiles" / "micro.yaml")], ROOT).stdout
    rate = re.search(r"distill sid: ([\d.]+) images/s × 0.128 kimg × 2 lrs", out)
    assert rate and float(rate.group(1)) > 0
    # micro: 200 samples × 2 trials; teacher Heun with 4 steps (NFE 7); best and last of 2 runs
    assert "teacher samples: 400 × NFE 7" in out and "student samples: 400 × 2 checkpoints × 2 runs (Σ NFE 2)" in out
    assert re.search(r"total device-hours .* +\d+\.\d", out) and "sample sets" in out


def test_the_measured_plan_counts_each_methods_own_lrs(tmp_path):
    params = yaml.safe_load((ROOT / "profiles" / "micro.yaml").read_text())
    params["study"].update(
        methods=["sid", "diff_instruct"], lrs=["1e-4"], per_method={"diff_instruct": {"lrs": ["1e-5", "3e-6", "1e-6"]}}
    )
    params["diff_instruct"] = {"sigma_init": 1.0, "loss_scale_g": 1}
    dump_params(tmp_path / "profile.yaml", params)
    out = sh([DISTILLERY, "plan", "--profile", str(tmp_path / "profile.yaml")], ROOT).stdout
    assert re.search(r"distill sid: [\d.]+ images/s × 0.128 kimg × 1 lrs", out)
    assert re.search(r"distill diff_instruct: [\d.]+ images/s × 0.128 kimg × 3 lrs", out)
    assert "student samples: 400 × 2 checkpoints × 4 runs" in out and "evaluate@diff_instruct-1e-6" in out
