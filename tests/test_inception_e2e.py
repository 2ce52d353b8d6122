"""The real profiles' path end to end, offline, through the real `dvc repro`: an RGB data set zip in EDM's format,
a class-conditional NCSN++ teacher with dropout and augment labels as an official-format EDM pickle served on
127.0.0.1 (pinned), SiD with EDM's augmentation, and Inception-v3 features from a pinned local weights file.

The Inception weights are random (written in torch-fidelity's format by the test): every FID, IS and KID here
measures nothing about the images. What is checked is the plumbing: every declared output is written, the report
says what was measured, a second repro is a no-op, and another extractor reruns exactly the stages that compute
features.
"""

import hashlib
import io
import json
import re
import zipfile

import numpy as np
import pytest
import yaml
from PIL import Image
from ruamel.yaml import YAML
from sklearn.datasets import load_sample_images
from test_download import serving
from test_edm_pickle import write_official_pickle

from conftest import ROOT, new_project, sh
from toys import seeded_network, tiny_config, write_random_inception

FEATURE_STAGES = {"features", "reference_stats", "teacher_samples", "distill@sid-1e-4", "evaluate@sid-1e-4"}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_patch_zip(path, per_class=24, size=16):
    """16×16 RGB patches (64×64 crops, downsampled) of scikit-learn's two sample photos, labelled by photo, in
    the layout of EDM's dataset_tool.py."""
    rng = np.random.default_rng(0)
    labels = []
    with zipfile.ZipFile(path, "w") as archive:
        for label, photo in enumerate(load_sample_images().images):
            for i in range(per_class):
                y, x = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
                patch = Image.fromarray(photo[y : y + 64, x : x + 64]).resize((size, size), Image.BOX)
                name = f"{label:05d}/img{label * per_class + i:08d}.png"
                buffer = io.BytesIO()
                patch.save(buffer, format="PNG")
                archive.writestr(name, buffer.getvalue())
                labels.append([name, label])
        archive.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


@pytest.fixture
def teacher_server(tmp_path):
    """An official-format EDM pickle of a conditional NCSN++ net (dropout, augment labels), served on 127.0.0.1."""
    config = tiny_config("ncsnpp", 16, 3, label_dim=2, augment_dim=9, dropout=0.1, attn_resolutions=[8])
    net = seeded_network(config, perturb=0.05).eval()
    init_kwargs = {k: v for k, v in config.items() if k != "model_type"} | dict(use_fp16=False, model_type="SongUNet")
    write_official_pickle(tmp_path / "teacher.pkl", net, init_kwargs, "raise RuntimeError('never run')\n")
    with serving((tmp_path / "teacher.pkl").read_bytes()) as httpd:
        yield httpd


def ran_stages(stdout):
    return set(re.findall(r"Running stage '([^']+)'", stdout))


def changed_stages(project):
    status = json.loads(sh(["dvc", "status", "--json"], project).stdout or "{}")
    return set(status)


def write_params(project, params):
    # ruamel writes YAML 1.2 as DVC reads it: the string "1e-4" stays a string (PyYAML would write it bare)
    with open(project / "params.yaml", "w") as f:
        YAML(typ="safe", pure=True).dump(params, f)


def eval_metrics(project):
    """The evaluation metrics of every run, less the timings."""
    return {
        p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "images_per_s"}
        for p in (project / "metrics" / "eval").glob("*.json")
    }


def use_weights(project, name):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluation"]["feature_weights"] = {"path": name, "sha256": sha256(project / name)}
    write_params(project, params)


def test_micro_inception_profile_runs_end_to_end_and_reruns_exactly_the_feature_stages(tmp_path, teacher_server):
    project = new_project(tmp_path / "project")
    write_patch_zip(project / "patches.zip")
    write_random_inception(project / "inception-a.pth", seed=0)
    write_random_inception(project / "inception-b.pth", seed=1)
    params = yaml.safe_load((ROOT / "tests" / "data" / "micro-inception.yaml").read_text())
    params["data"].update(path="patches.zip", sha256=sha256(project / "patches.zip"))
    params["teacher"]["download"] = {
        "url": teacher_server.url,
        "sha256": hashlib.sha256(teacher_server.payload).hexdigest(),
    }
    write_params(project, params)
    use_weights(project, "inception-a.pth")
    sh(["distillery", "validate"], project)

    first = sh(["dvc", "repro"], project)
    assert {"data", "teacher", "report"} | FEATURE_STAGES <= ran_stages(first.stdout)
    assert len(teacher_server.requests) >= 1  # the teacher came over HTTP

    features = json.loads((project / "metrics" / "features.json").read_text())
    assert features["extractor"] == "inception-v3-compat"
    assert features["weights_sha256"] == sha256(project / "inception-a.pth") and features["feature_dim"] == 2048
    assert json.loads((project / "metrics" / "reference_stats.json").read_text()) == {
        "num_images": 48,
        "feature_dim": 2048,
    }
    teacher = json.loads((project / "metrics" / "teacher_samples.json").read_text())
    assert teacher["label_dim"] == 2 and teacher["kid_subset_size"] == 20  # 100 asked, 20 samples
    assert teacher["protocol"]["extractor"] == "inception-v3-compat"
    assert teacher["protocol"]["weights_sha256"] == sha256(project / "inception-a.pth")
    evaluation = json.loads((project / "metrics" / "eval" / "sid-1e-4.json").read_text())
    assert np.isfinite(evaluation["fid"]) and evaluation["kid_subset_size"] == 20
    report = (project / "reports" / "results.md").read_text()
    assert (
        "`inception-v3-compat` features through torch-fidelity (weights sha256 " + features["weights_sha256"][:12]
        in report
    )
    assert "KID over 5 subsets of 20 images, cut from evaluation.kid_subset_size 100 to the set sizes" in report
    assert "class-conditional teacher and students (2 classes)" in report
    assert "teacher as its official checkpoint was trained; SiD p = 0.12." in report

    again = sh(["dvc", "repro"], project)
    assert ran_stages(again.stdout) == set() and changed_stages(project) == set()

    # another extractor (other weights): exactly the stages that compute features rerun, and what reads their outputs
    first_metrics = eval_metrics(project)
    use_weights(project, "inception-b.pth")
    switched = ran_stages(sh(["dvc", "repro"], project).stdout)
    downstream = {"report", "preference@0", "preference_report"}
    assert switched - downstream == FEATURE_STAGES and "report" in switched
    assert json.loads((project / "metrics" / "features.json").read_text())["weights_sha256"] == sha256(
        project / "inception-b.pth"
    )

    # and back: the first build's numbers bit for bit (restored from DVC's run cache or recomputed)
    use_weights(project, "inception-a.pth")
    sh(["dvc", "repro"], project)
    assert eval_metrics(project) == first_metrics
    assert changed_stages(project) == set()
