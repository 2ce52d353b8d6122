"""A teacher trained here with augment labels (augment_dim 9) trains with EDM's augmentation, so its augment map
learns; without the pipe the map would keep its initial weights."""

import subprocess
import sys

import torch
import yaml

from pipeline.params import load_params
from pipeline.runtime import seed_everything

from distillery.augment import AugmentPipe
from distillery.checkpoint import load_network
from distillery.networks import build_network
from distillery.training import train_teacher

from stages.teacher import teacher_config

from conftest import ROOT, dump_params
from toys import tiny_edm


def test_train_teacher_trains_the_augment_map_only_with_the_pipe():
    images = torch.rand(32, 1, 8, 8) * 2 - 1
    maps = {}
    for pipe in (None, AugmentPipe.edm(0.5)):
        net = tiny_edm(augment_dim=9)
        initial = net.model.map_augment.weight.clone()
        torch.manual_seed(0)
        ema, _, _ = train_teacher(
            net,
            images,
            None,
            batch=8,
            lr=1e-2,
            lr_rampup_kimg=0,
            duration_kimg=0.032,
            ema_halflife_kimg=0.01,
            ema_rampup_ratio=None,
            augment_pipe=pipe,
        )
        maps[pipe is not None] = (ema.model.map_augment.weight - initial).abs().max()
    assert maps[False] == 0 and maps[True] > 0


def run(module, project):
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": str(project)}
    result = subprocess.run([sys.executable, "-m", module], cwd=project, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_teacher_stage_trains_with_teacher_augment_p(tmp_path):
    params = yaml.safe_load((ROOT / "profiles" / "micro.yaml").read_text())
    params["teacher"]["network"]["augment_dim"] = 9
    params["teacher"].update(augment_p=0.5, duration_kimg=0.128, checkpoint_kimg=1)
    dump_params(tmp_path / "params.yaml", params)
    for link in ("stages", "distillery", "pipeline"):
        (tmp_path / link).symlink_to(ROOT / link)
    run("stages.data", tmp_path)
    run("stages.teacher", tmp_path)

    seed_everything(0)  # the stage's initialisation
    initial = build_network(teacher_config(load_params(tmp_path / "params.yaml"), 8, 1, 10))
    trained = load_network(tmp_path / "models" / "teacher")
    assert not torch.equal(trained.model.map_augment.weight, initial.model.map_augment.weight)
    assert (tmp_path / "metrics" / "teacher.json").read_text().count('"augment_p": 0.5') == 1
