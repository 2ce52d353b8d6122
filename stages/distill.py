"""Stage `distill@<method>-<lr>` (and `distill_fewstep@<method>-<lr>-<K>-<variant>`): one distillation run,
resumable, FID over training.

Under `torchrun` (more than one GPU for the stage) every rank trains its share of the batch shards
and rank 0 alone monitors, logs and writes the outputs.

A run that diverges (more than `distill.nonfinite_limit` non-finite steps) stops there and still writes its
outputs, marked `diverged`; its last checkpoint stays on disk. A run whose generator never moved from the teacher
copy it started as is marked `unmoved` (docs/methods.md §3.12).
"""

import copy
import csv
import math
import time
from typing import NamedTuple

import torch

from pipeline.events import Progress
from pipeline.io import atomic_path, write_json
from pipeline.runtime import distributed, fingerprint, kimg_bar, seed_everything, stage_checkpoints
from pipeline.tracking import METRIC_COLUMNS

from distillery.checkpoint import CheckpointError, Checkpoints, load_config, load_network, save_network
from distillery.data import load_dataset, load_labels
from distillery.metrics import extract_features, fid_from_statistics, fid_statistics
from distillery.sampling import generate
from distillery.training import DistillConfig, TrainingData, distill

from stages.common import RUN_ARGUMENTS, feature_net, find_run, reference, run_params, run_stage_name, run_tags
from stages.paths import DATASET, TEACHER_DIR, distill_metrics, fid_curve, run_dir
from stages.skeleton import StageFailed, run_stage


def training_config(params, method_name, lr):
    d = params.distill.for_method(method_name)
    return DistillConfig(
        batch=d.batch,
        lr=lr,
        betas=d.adam_betas,
        eps=d.adam_eps,
        duration_kimg=d.duration_kimg,
        ema_halflife_kimg=d.ema_halflife_kimg,
        ema_rampup_ratio=d.ema_rampup_ratio,
        generator_betas=d.generator_adam_betas,
        seed=params.seed,
        shards=d.shards,
        checkpoint_kimg=d.checkpoint_kimg,
        monitor_kimg=d.monitor_kimg,
        nonfinite_limit=d.nonfinite_limit,
    )


def training_data(method, label_dim):
    """The data set as the method needs it: real images for GDD, the labels of a conditional teacher's data set."""
    if method.needs_real_data:
        images, labels, _ = load_dataset(DATASET, keep_uint8=True)
        return TrainingData(torch.from_numpy(images), torch.from_numpy(labels) if label_dim else None)
    return TrainingData(labels=torch.from_numpy(load_labels(DATASET)) if label_dim else None)


def fid_monitor(params, method, teacher, dev):
    """Small-sample FID of the EMA generator against the data, from fixed seeds (lower is better)."""
    features = feature_net()
    ref_stats, _ = reference(features)
    shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
    seeds = list(range(params.distill.monitor_samples))

    def monitor(ema):
        samples = generate(
            method.sampler(ema), seeds, shape, teacher.label_dim, batch=params.evaluation.batch, device=dev
        )
        if samples.blown_up:
            return float("inf")  # a blown-up generator: never "best"; null in the metrics, an empty cell in the curve
        feats = extract_features(samples.images, features, batch_size=params.evaluation.batch)
        return fid_from_statistics(fid_statistics(feats[features.fid_key]), ref_stats)

    return monitor


class Outcome(NamedTuple):
    """What a finished run writes: its generators, FID curve and summary."""

    name: str
    method_name: str
    lr_text: str
    lr: float
    sigma_init: float
    augment_p: float  # EDM's augmentation in the method's loss (0: none)
    config: DistillConfig
    monitor_samples: int
    result: object  # distillery.training.DistillResult
    network_config: dict
    seconds: float
    initial: dict  # the generator's weights before training (CPU state dict)


def bit_equal(net, state):
    """Whether `net` holds exactly the weights of the CPU state dict `state`."""
    return all(torch.equal(v.cpu(), state[k]) for k, v in net.state_dict().items())


def finite(value):
    """A monitor value as the metrics hold it: None unless finite (a generator that made blown-up samples)."""
    return value if math.isfinite(value) else None


def write_outputs(o):
    """The networks (`last`: the EMA at the end or where the run stopped; `best`: the EMA of the lowest finite
    monitoring FID, else the last), the FID curve and the summary, also for a run that diverged."""
    r, stop = o.result, o.result.diverged
    best_net = copy.deepcopy(r.ema)
    if r.best is not None:
        best_net.load_state_dict(r.best["ema"])
    meta = {
        "method": o.method_name,
        "lr": o.lr,
        "sigma_init": o.sigma_init,
        "kimg": o.config.duration_kimg,
        "batch": o.config.batch,
        "best_kimg": r.best["kimg"] if r.best else None,
        "best_monitor_fid": r.best["value"] if r.best else None,
        "augment_p": o.augment_p,
        "diverged": stop is not None,
        "diverged_kimg": stop.kimg if stop else None,
        "diverged_loss": stop.loss if stop else None,
        # SiD at lr 1e3 zeroes every update of G from the first step on: the teacher copy would be scored as the run
        "unmoved": bit_equal(best_net, o.initial) or bit_equal(r.ema, o.initial),
    }
    with atomic_path(run_dir(o.name), is_dir=True) as tmp:
        save_network(tmp, r.ema, o.network_config, name="last", meta=meta)
        save_network(tmp, best_net, o.network_config, name="best", meta=meta)
    with atomic_path(fid_curve(o.name)) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["kimg", "fid", "method", "lr"])
            # a non-finite monitor value is an empty cell: no point on the curve
            rows = [(f"{k:g}", f"{v:.6g}" if math.isfinite(v) else "", o.method_name, o.lr_text) for k, v in r.history]
            writer.writerows(rows)
    summary = {
        **meta,
        "final_monitor_fid": finite(r.history[-1][1]) if r.history else None,
        "monitor_blown_up": not all(math.isfinite(v) for _, v in r.history),  # a monitor sample set was blown up
        "monitor_fids": [[k, finite(v)] for k, v in r.history],  # [kimg, FID or null]: when a run went wrong
        "nonfinite_steps": r.nonfinite_steps,
        "diverged_first_kimg": stop.first_kimg if stop else None,
        "train_seconds": round(o.seconds, 1),
        "kimg_per_s": (stop.kimg if stop else o.config.duration_kimg) / o.seconds,
        "monitor_samples": o.monitor_samples,
    }
    write_json(distill_metrics(o.name), summary)
    return summary


def run(params, args, run):
    this = find_run(params, args.run)
    name, lr = this.name, this.lr
    method = params.method(this)
    config = training_config(params, this.method, lr)
    with distributed() as (rank, dev):
        teacher = load_network(TEACHER_DIR, device=dev)
        seed_everything(params.seed)
        generator = method.make_generator(teacher)  # every method starts G from the teacher
        initial = {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()} if rank == 0 else None
        aux = method.make_aux(teacher)
        data = training_data(method, teacher.label_dim)
        bar = kimg_bar(config.duration_kimg, f"distill {name}") if rank == 0 else None
        live = Progress(run_stage_name("distill")(params, args), config.duration_kimg)
        log_every = max(config.batch, int(config.duration_kimg * 1000) // 200)  # ~200 points per loss curve
        seen = {"nimg": 0, "logged": -log_every}
        monitor = fid_monitor(params, method, teacher, dev)

        def progress(nimg, losses):
            seen["nimg"] = nimg
            bar.n = nimg / 1000
            bar.update(0)
            live.update(nimg / 1000)
            if nimg - seen["logged"] >= log_every:
                run.log_metrics(losses, step=nimg)  # step: images seen, so short runs still resolve
                seen["logged"] = nimg

        def tracked_monitor(ema):
            value = monitor(ema)
            bar.set_postfix(fid=f"{value:.3f}")
            run.log_metrics({"fid": value}, step=seen["nimg"])
            live.update(seen["nimg"] / 1000, fid=value, force=True)
            return value

        settings = params.settings(this)
        d = params.distill.for_method(this.method)
        checkpoints = Checkpoints(
            stage_checkpoints(f"distill@{name}"),
            fingerprint(
                {
                    "seed": params.seed,
                    "lr": lr,
                    "method": this.method,
                    # how many are kept does not change the run: resuming survives a change of checkpoint_keep
                    "distill": d.model_dump(exclude={"checkpoint_keep"}),
                    "method_params": settings,
                },
                [TEACHER_DIR],
            ),
            keep=d.checkpoint_keep,
        )
        start = time.perf_counter()
        try:
            result = distill(
                method,
                teacher if method.needs_teacher else None,
                generator,
                aux,
                config,
                data=data,
                label_dim=teacher.label_dim,
                checkpoints=checkpoints,
                monitor=tracked_monitor,
                on_progress=progress,
            )
        except CheckpointError as e:
            raise StageFailed(str(e)) from None
        if rank == 0:
            bar.close()
            summary = write_outputs(
                Outcome(
                    name,
                    this.method,
                    this.lr_text,
                    lr,
                    method.sigma_init,
                    settings.get("augment_p", 0.0),
                    config,
                    params.distill.monitor_samples,
                    result,
                    load_config(TEACHER_DIR)["network"],
                    time.perf_counter() - start,
                    initial,
                )
            )
            logged = {k: summary[k] for k in [*METRIC_COLUMNS["distill"], "nonfinite_steps"]}
            run.log_metrics({k: v for k, v in logged.items() if v is not None})
            stop = result.diverged
            if stop is None:
                checkpoints.remove()
            else:  # the outputs say so, and the last checkpoints before the blow-up stay for a look
                run.set_tag("diverged", f"at {stop.kimg:g} kimg ({stop.loss})")
                kept = f"; last checkpoints kept in {checkpoints.directory}" if checkpoints.directory.exists() else ""
                print(
                    f"distill {name}: diverged at {stop.kimg:g} kimg ({result.nonfinite_steps} non-finite steps from "
                    f"{stop.first_kimg:g} kimg on, {stop.loss} first); outputs written, marked diverged{kept}"
                )


if __name__ == "__main__":
    run_stage(
        "distill",
        run,
        doc=__doc__,
        arguments=RUN_ARGUMENTS,
        instance=run_stage_name("distill"),
        tags=run_tags,
        logged=run_params,
    )
