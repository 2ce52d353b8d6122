"""Divergence is caught where it happens and never reads `ok`: the loops count non-finite steps (a NaN/Inf loss or
gradient before sanitising) and stop past the limit, naming the step and the loss; the stage still writes its
outputs, marked; non-finite images are never scored; the report says what happened; metric files are strict JSON."""

import copy
import json
import math
import socket

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from pipeline.io import write_json
from pipeline.params import parse_params

from distillery.checkpoint import Checkpoints, load_network, save_network
from distillery.data import load_digits_dataset, save_dataset
from distillery.extractors import DIGITS, FeatureNet, write_info
from distillery.features import save_digits_net, train_digits_classifier
from distillery.methods.sid import SiD
from distillery.metrics import extract_features, fid_statistics, load_stats_npz, save_stats_npz, to_uint8
from distillery.training import DistillResult, Divergence, distill, train_teacher

from conftest import ROOT
from toys import tiny_config, tiny_edm, tiny_run


def strict_json(path):
    """The file's JSON, refusing the NaN/Infinity that Python's json would accept."""

    def refuse(constant):
        raise ValueError(f"{path} holds {constant}")

    return json.loads(open(path).read(), parse_constant=refuse)


# --- The loops ------------------------------------------------------------------------------------------------------


class PoisonedSiD(SiD):
    """SiD whose `which` loss is NaN at the listed calls (0-based): isolated bad steps at chosen places. `value`: the
    loss alone is NaN, its gradients stay finite; else the gradients are NaN too."""

    def __init__(self, which, calls, value=False):
        super().__init__()
        self.which, self.calls, self.value, self.seen = which, set(calls), value, 0

    def poison(self, loss):
        self.seen += 1
        if self.seen - 1 not in self.calls:
            return loss
        return loss + float("nan") if self.value else loss * float("nan")

    def generator_loss(self, *args, **kwargs):
        loss = super().generator_loss(*args, **kwargs)
        return self.poison(loss) if self.which == "loss_g" else loss

    def aux_loss(self, *args, **kwargs):
        loss = super().aux_loss(*args, **kwargs)
        return self.poison(loss) if self.which == "loss_aux" else loss


def sid_run(method=None, lr=1e-3, duration_kimg=0.04, monitor=None, **settings):
    """A tiny SiD run (batch 8, so step k ends at 8k images); returns (result, teacher, losses per step)."""
    method = method or SiD()
    teacher = tiny_edm(dropout=0.1).eval().requires_grad_(False)
    generator, losses = method.make_generator(teacher), []
    result = distill(
        method,
        teacher,
        generator,
        method.make_aux(teacher),
        tiny_run(lr=lr, duration_kimg=duration_kimg, **settings),
        monitor=monitor,
        on_progress=lambda nimg, logs: losses.append(logs),
    )
    return result, teacher, losses


def same_weights(net, other):
    return all(torch.equal(v, other.state_dict()[k]) for k, v in net.state_dict().items())


def test_a_blown_up_sid_run_stops_past_the_limit_naming_the_step_and_the_loss():
    # SiD at lr 1e3: the first fake-score step ruins D_ψ, and every generator gradient after it is NaN (its loss
    # stays finite: the bad rows are zeroed); sanitising zeroes every update, so G never moves
    result, teacher, losses = sid_run(
        lr=1e3, duration_kimg=0.2, nonfinite_limit=3, monitor_kimg=0.016, monitor=lambda ema: float("inf")
    )
    assert result.diverged == Divergence(kimg=0.032, loss="loss_g", first_kimg=0.008)
    assert result.nonfinite_steps == 4 and len(losses) == 4  # stopped after the 4th of 25 steps
    assert all(math.isfinite(v) for logs in losses for v in logs.values())  # the gradients alone give it away
    assert result.history == [(0.016, float("inf"))] and result.best is None  # an infinite FID is never "best"
    assert same_weights(result.ema, teacher)
    # no tolerance: the first non-finite step stops the run
    assert sid_run(lr=1e3, duration_kimg=0.2, nonfinite_limit=0)[0].diverged == Divergence(0.008, "loss_g", 0.008)


@pytest.mark.parametrize("which, value", [("loss_g", True), ("loss_aux", False)], ids=["loss_g-value", "loss_aux"])
def test_isolated_non_finite_steps_below_the_limit_are_survived_and_one_more_stops_the_run(which, value):
    result, teacher, losses = sid_run(PoisonedSiD(which, [1, 3], value), nonfinite_limit=2)  # steps 2 and 4 of 5
    assert result.diverged is None and result.nonfinite_steps == 2 and len(losses) == 5
    assert math.isnan(losses[1][which]) and math.isfinite(losses[2][which])
    assert not same_weights(result.ema, teacher)
    result, _, losses = sid_run(PoisonedSiD(which, [1, 3], value), nonfinite_limit=1)
    assert result.diverged == Divergence(kimg=0.032, loss=which, first_kimg=0.016) and len(losses) == 4


def test_the_non_finite_count_is_resumed_with_the_run(tmp_path):
    class Interrupt(Exception):
        pass

    def run(on_progress=None):
        teacher = tiny_edm(dropout=0.1).eval().requires_grad_(False)
        method = SiD()
        return distill(
            method,
            teacher,
            method.make_generator(teacher),
            method.make_aux(teacher),
            tiny_run(lr=1e3, duration_kimg=0.064, checkpoint_kimg=0.016, nonfinite_limit=7),
            checkpoints=Checkpoints(tmp_path / "distill", "f"),
            on_progress=on_progress,
        )

    def interrupt(nimg, _):
        if nimg >= 24:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(on_progress=interrupt)
    assert Checkpoints(tmp_path / "distill", "f").latest()["nonfinite"] == {"count": 2, "first": (0.008, "loss_g")}
    resumed = run()
    # every one of the 8 steps is non-finite: uninterrupted or resumed, the 8th passes the limit of 7
    assert resumed.diverged == Divergence(kimg=0.064, loss="loss_g", first_kimg=0.008)
    assert resumed.nonfinite_steps == 8


class PoisonedNet(torch.nn.Module):
    """A teacher under training whose output is NaN at the listed forward calls."""

    def __init__(self, net, calls):
        super().__init__()
        self.net, self.calls, self.seen = net, set(calls), 0

    def forward(self, *args, **kwargs):
        self.seen += 1
        out = self.net(*args, **kwargs)
        return out * float("nan") if self.seen - 1 in self.calls else out


def teacher_run(calls, limit):
    torch.manual_seed(1)
    return train_teacher(
        PoisonedNet(tiny_edm(), calls),
        torch.rand(64, 1, 8, 8) * 2 - 1,
        None,
        batch=16,
        lr=1e-3,
        lr_rampup_kimg=0,
        duration_kimg=0.08,
        ema_halflife_kimg=0.05,
        ema_rampup_ratio=0.05,
        nonfinite_limit=limit,
    )


def test_the_teacher_loop_survives_isolated_non_finite_steps_and_stops_past_the_limit():
    survived = teacher_run([1], limit=1)
    assert survived.diverged is None and survived.nonfinite_steps == 1
    assert all(v.isfinite().all() for v in survived.ema.state_dict().values())
    stopped = teacher_run([1, 2], limit=1)
    assert stopped.diverged == Divergence(kimg=0.048, loss="loss", first_kimg=0.032) and stopped.nonfinite_steps == 2


def ddp_worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result, _, _ = sid_run(lr=1e3, duration_kimg=0.2, nonfinite_limit=2, shards=2)
        torch.save({"diverged": tuple(result.diverged), "steps": result.nonfinite_steps}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_ddp_rank_stops_at_the_same_step_as_one_process(tmp_path):
    torch.set_num_threads(1)
    single, _, _ = sid_run(lr=1e3, duration_kimg=0.2, nonfinite_limit=2, shards=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(port, tmp_path / "rank"), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank.{r}", weights_only=True) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"diverged": (0.024, "loss_g", 0.008), "steps": 3}
    assert tuple(single.diverged) == ranks[0]["diverged"]


# --- The stages -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A project directory with what `distill` and `evaluate` read: a tiny teacher, the digits feature net (one
    epoch), the reference statistics and features of the digits, and the teacher's statistics."""
    root = tmp_path_factory.mktemp("project")
    images, labels = load_digits_dataset()
    net, _ = train_digits_classifier(images, labels, seed=0, epochs=1)
    save_digits_net(net, root / "models" / "features")
    write_info(root / "models" / "features", DIGITS, "digits", feature_dim=net.config["feature_dim"])
    feats = extract_features(to_uint8(torch.from_numpy(images)), FeatureNet.load(root / "models" / "features"))
    (root / "stats").mkdir()
    for name in ("reference", "teacher"):
        save_stats_npz(root / "stats" / f"{name}.npz", fid_statistics(feats["features"]))
    np.savez(root / "stats" / "reference_features.npz", features=feats["features"])
    save_network(root / "models" / "teacher", tiny_edm(dropout=0.1), tiny_config(dropout=0.1))
    return root


@pytest.fixture
def in_project(measured, monkeypatch):
    """Run a stage's body in this process, in the project directory; the torch flags its seeding sets (deterministic
    algorithms) are put back afterwards."""
    monkeypatch.chdir(measured)
    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield measured
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])


def micro_params(**distill):
    raw = yaml.safe_load((ROOT / "profiles" / "micro.yaml").read_text())
    raw["study"]["lrs"] = ["1e3", "1e-4"]
    raw["distill"].update(distill)
    return parse_params(raw)


class Args:
    def __init__(self, run):
        self.run = run


def test_a_diverged_run_writes_its_outputs_marked_and_is_not_scored(in_project):
    from stages import distill as distill_stage
    from stages import evaluate as evaluate_stage
    from stages.report import status
    from stages.skeleton import Silent

    measured = in_project
    params = micro_params(nonfinite_limit=2, checkpoint_kimg=0.016)  # batch 16: a checkpoint after every step
    distill_stage.run(params, Args("sid-1e3"), Silent())
    train = strict_json(measured / "metrics" / "distill" / "sid-1e3.json")
    assert (train["diverged"], train["diverged_kimg"], train["diverged_loss"]) == (True, 0.048, "loss_g")
    assert (train["nonfinite_steps"], train["diverged_first_kimg"], train["unmoved"]) == (3, 0.016, True)
    assert train["best_kimg"] is None and train["best_monitor_fid"] is None and train["final_monitor_fid"] is None
    best, last = (load_network(measured / "runs" / "sid-1e3", name=n) for n in ("best", "last"))
    assert same_weights(best, last)  # no monitored value: the best is the EMA where the run stopped
    # the last checkpoint before the stop, its fingerprint as the stage wrote it
    manifest = json.loads((measured / "checkpoints" / "distill-sid-1e3" / "manifest.json").read_text())
    state = Checkpoints(measured / "checkpoints" / "distill-sid-1e3", manifest["fingerprint"]).latest()
    assert state["nimg"] == 32 and state["nonfinite"]["count"] == 2
    assert (measured / "plots" / "fid" / "sid-1e3.csv").read_text() == "kimg,fid,method,lr\n"

    evaluate_stage.run(params, Args("sid-1e3"), Silent())
    m = strict_json(measured / "metrics" / "eval" / "sid-1e3.json")
    assert m["not_scored"] == "the run diverged at 0.048 kimg (loss_g)"
    assert [m[k] for k in ("fid", "is", "kid", "precision", "recall", "rel_fid", "fid_last")] == [None] * 7
    assert (measured / "samples" / "sid-1e3.npz").exists() and (measured / "reports" / "grids" / "sid-1e3.png").exists()
    assert status(train, m, factor=3.0) == "diverged at 0.048 kimg (loss_g)"


def test_a_diverged_teacher_fails_its_stage_naming_the_step_and_the_loss(in_project):
    from stages import teacher as teacher_stage
    from stages.skeleton import Silent, StageFailed

    measured = in_project
    images, labels = load_digits_dataset()
    (measured / "data").mkdir(exist_ok=True)
    save_dataset(measured / "data" / "dataset.npz", images[:256], labels[:256], 10)
    raw = yaml.safe_load((ROOT / "profiles" / "micro.yaml").read_text())
    raw["teacher"].update(lr=1e4, lr_rampup_kimg=0, duration_kimg=0.64, nonfinite_limit=1)
    before = (measured / "models" / "teacher" / "network.safetensors").read_bytes()
    with pytest.raises(StageFailed, match=r"the teacher diverged at (\S+) kimg \(loss\): 2 steps .* the first at "):
        teacher_stage.run(parse_params(raw), None, Silent())
    assert (measured / "models" / "teacher" / "network.safetensors").read_bytes() == before  # nothing written
    assert not (measured / "metrics" / "teacher.json").exists()


def outcome(name, result, initial):
    from stages.distill import Outcome

    return Outcome(name, "sid", "1e-4", 1e-4, 2.5, 0.0, tiny_run(), 100, result, tiny_config(), 2.0, initial)


def test_a_generator_that_never_moved_is_flagged_unmoved(measured, monkeypatch):
    from stages.distill import write_outputs

    monkeypatch.chdir(measured)
    teacher = tiny_edm()
    initial = {k: v.clone() for k, v in teacher.state_dict().items()}
    best = {"value": 5.0, "kimg": 0.016, "ema": teacher.state_dict()}
    moved = copy.deepcopy(teacher)
    with torch.no_grad():
        next(moved.parameters()).add_(1e-6)
    unmoved = write_outputs(outcome("sid-1e-4", DistillResult(teacher, best, [(0.016, 5.0), (0.032, 6.0)]), initial))
    assert unmoved["unmoved"] and not unmoved["diverged"]
    # the best EMA is the teacher copy although the last moved: what the main columns measure never moved
    assert write_outputs(outcome("sid-1e-4", DistillResult(moved, best, [(0.016, 5.0)]), initial))["unmoved"]
    best = {**best, "ema": moved.state_dict()}
    summary = write_outputs(outcome("sid-1e-4", DistillResult(moved, best, [(0.016, 5.0), (0.032, math.inf)]), initial))
    assert not summary["unmoved"] and summary["monitor_blown_up"] and summary["final_monitor_fid"] is None
    assert strict_json(measured / "metrics" / "distill" / "sid-1e-4.json") == summary
    assert (measured / "plots" / "fid" / "sid-1e-4.csv").read_text().splitlines()[1:] == [
        "0.016,5,sid,1e-4",
        "0.032,,sid,1e-4",
    ]


def test_measure_never_scores_a_set_with_non_finite_images(measured, monkeypatch):
    from stages.common import measure

    monkeypatch.chdir(measured)
    params = micro_params()  # 2 trials of 200 samples

    def clamped(latents, labels, noise=None):
        return latents.clamp(-1, 1)

    shape, stats = [1, 8, 8], {"teacher_stats": None}
    scored, _, _ = measure(clamped, shape, 0, params, "cpu", **stats)
    assert scored["blown_up_images"] == 0 and scored["fid"] > 0 and len(scored["fid_trials"]) == 2
    assert scored["precision"] is not None and scored["is"] > 0

    def one_nan_in_the_second_block(latents, labels, noise=None):
        x = latents.clamp(-1, 1)
        if len(latents) and one_nan_in_the_second_block.calls == 1:
            x[7] = float("nan")
        one_nan_in_the_second_block.calls += 1
        return x

    one_nan_in_the_second_block.calls = 0
    unscored, first, fid_stats = measure(one_nan_in_the_second_block, shape, 0, params, "cpu", **stats)
    assert unscored["blown_up_images"] == 1 and fid_stats is None and unscored["fid_trials"] == []
    assert [unscored[k] for k in ("fid", "fid_std", "is", "kid", "precision", "recall")] == [None] * 6
    assert len(first.images) == 200  # the samples and grid are still written from the first block
    # a diverged run: sampled (its samples and grid are outputs) but never scored, NaN or not
    teacher_stats = load_stats_npz(measured / "stats" / "teacher.npz")
    skipped, _, _ = measure(clamped, shape, 0, params, "cpu", teacher_stats=teacher_stats, score=False)
    assert skipped["fid"] is None and skipped["rel_fid"] is None and skipped["blown_up_images"] == 0


# --- The report and the metric files --------------------------------------------------------------------------------


def test_rows_without_scores_render_as_dashes_and_the_status_key_is_written():
    from stages.report import formatted, status_text

    row = {"method": "SiD", "lr": "1e3", "batch": 16, "NFE": 1, "FID": None, "FID std": None, "IS": None}
    rows = [{**row, "FID": 3.0, "FID std": 0.5, "IS": 2.0}, row, {**row, "lr": "1e-4", "FID": 4.0, "FID std": 0.2}]
    table = pd.DataFrame(rows)
    table = table.sort_values("FID")  # a null FID sorts (last) like any other
    for col in ["KID", "precision", "recall", "rel-FID", "images/s", "kimg", "FID (last)", "states"]:
        table[col] = None
    table["status"] = ["ok", "ok", "diverged at 0.048 kimg (loss_g)"]
    lines = formatted(table, {"trials": 2, "aggregate": "mean"}).splitlines()
    assert "3.000 ± 0.500" in lines[2] and "4.000 ± 0.200" in lines[3]
    cells = [c.strip() for c in lines[4].split("|")]
    assert cells[cells.index("1e3") + 3 : cells.index("1e3") + 5] == ["—", "—"]  # FID, IS
    key = "\n".join(status_text(micro_params()))
    shown = ["`diverged at <kimg> kimg (<loss>)`", "`diverged at <kimg> kimg (blown-up images)`", "`unmoved`", "`ok`"]
    shown.append("`—`")
    assert all(status in key for status in [*shown, "`unstable (<n> non-finite steps)`"])
    assert "`distill.nonfinite_limit` (2)" in key and "`diverged at <kimg> kimg (FID > 3× best)`" in key


def test_metric_files_are_strict_json(tmp_path):
    write_json(tmp_path / "ok.json", {"fid": None, "steps": 3})
    assert strict_json(tmp_path / "ok.json") == {"fid": None, "steps": 3}
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="JSON compliant"):
            write_json(tmp_path / "bad.json", {"nested": [1.0, bad]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json"]  # nothing partial left


def test_the_figures_draw_a_study_whose_runs_were_all_left_unscored(tmp_path):
    from stages.report import lr_robustness_figure
    from stages.report_fewstep import fewstep_figure

    params = micro_params()
    lr_robustness_figure(params, pd.DataFrame({"FID": [2.0, None, None]}), tmp_path / "lr.png")
    unscored = dict(method="cd", lr="1e-4", variant="plain", FID=None, precision=None, recall=None)
    fewstep_figure(pd.DataFrame([{**unscored, "K": 1}, {**unscored, "K": 2}]), "micro", tmp_path / "fewstep.png")
    assert (tmp_path / "lr.png").stat().st_size and (tmp_path / "fewstep.png").stat().st_size


def test_finite_images_far_outside_the_data_range_count_as_blown_up():
    from distillery.sampling import BLOWN_UP, generate

    def scaled(factor):
        return lambda latents, labels, noise: (latents * factor).clamp(-2 * BLOWN_UP, 2 * BLOWN_UP)

    shape = [1, 8, 8]
    assert generate(scaled(5), range(20), shape).blown_up == 0  # a coarse sampler's overshoot: scored as usual
    assert generate(scaled(1e3), range(20), shape).blown_up == 20  # finite, in the thousands: a blown-up net
