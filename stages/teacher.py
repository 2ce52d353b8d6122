"""Stage `teacher`: an official EDM checkpoint, downloaded (pinned) and converted without running its
pickled code (`teacher.source: url`), or a small EDM teacher trained on the data set (toy), resumable.

A trained teacher that diverges (more than `teacher.nonfinite_limit` non-finite steps) fails the stage (exit 1):
no student can distil it. Its last checkpoint stays on disk."""

import pickle
import time

import torch

from pipeline.events import Progress
from pipeline.io import atomic_path, write_json
from pipeline.pins import fetch
from pipeline.runtime import fingerprint, kimg_bar, seed_everything, stage_checkpoints

from distillery.augment import AugmentPipe
from distillery.checkpoint import CheckpointError, Checkpoints, save_network
from distillery.data import load_dataset
from distillery.edm_pickle import convert_edm_pickle
from distillery.networks import build_network, edm_config
from distillery.training import train_teacher

from stages.paths import DATASET, TEACHER_DIR, metrics
from stages.skeleton import StageFailed, run_stage


def teacher_config(params, resolution, channels, num_classes):
    n = params.teacher.network
    return edm_config(
        n.arch,
        resolution,
        channels,
        label_dim=num_classes if n.label_conditional else 0,
        model_channels=n.model_channels,
        channel_mult=n.channel_mult,
        channel_mult_emb=n.channel_mult_emb,
        num_blocks=n.num_blocks,
        attn_resolutions=n.attn_resolutions,
        dropout=n.dropout,
        augment_dim=n.augment_dim,
    )


def convert_official(params, run):
    """Download the pinned EDM pickle and convert it once into our network format (a first-use pin is recorded
    only once the pickle converted)."""
    spec = params.teacher.download
    with fetch(spec) as (path, digest):
        try:
            with atomic_path(TEACHER_DIR, is_dir=True) as tmp:
                config = convert_edm_pickle(path, tmp, meta={"source": spec.url, "sha256": digest})
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise StageFailed(f"{spec.url} is not a usable EDM pickle: {e}") from None
    info = {
        "source": spec.url,
        "sha256": digest,
        "architecture": config["model_type"],
        "label_dim": config["label_dim"],
        "parameters": sum(p.numel() for p in build_network(config).parameters()),
    }
    write_json(metrics("teacher"), info)
    run.log_metrics({"parameters": info["parameters"]})


def train(params, run):
    """EDM training of a small teacher on the data set, resumable from its checkpoint."""
    t = params.teacher
    images, labels, num_classes = load_dataset(DATASET)
    config = teacher_config(params, images.shape[-1], images.shape[1], num_classes)
    seed_everything(params.seed)
    net = build_network(config)
    images = torch.from_numpy(images)
    labels = torch.eye(num_classes)[torch.from_numpy(labels)] if config["label_dim"] else None
    bar = kimg_bar(t.duration_kimg, "teacher")
    live = Progress("teacher", t.duration_kimg)
    log_every = max(t.batch, int(t.duration_kimg * 1000) // 200)  # ~200 points on the loss curve
    last_logged = [-log_every]

    def progress(nimg, losses):
        bar.n = nimg / 1000
        bar.set_postfix(loss=f"{losses['loss']:.4f}", refresh=False)
        bar.update(0)
        live.update(nimg / 1000)
        if nimg - last_logged[0] >= log_every:
            run.log_metrics(losses, step=nimg)  # step: images seen
            last_logged[0] = nimg

    start = time.perf_counter()
    checkpoints = Checkpoints(
        stage_checkpoints("teacher"),
        # how many are kept does not change the run: resuming survives a change of checkpoint_keep
        fingerprint({"seed": params.seed, "teacher": t.model_dump(exclude={"checkpoint_keep"})}, [DATASET]),
        keep=t.checkpoint_keep,
    )
    try:
        result = train_teacher(
            net,
            images,
            labels,
            batch=t.batch,
            lr=t.lr,
            lr_rampup_kimg=t.lr_rampup_kimg,
            duration_kimg=t.duration_kimg,
            ema_halflife_kimg=t.ema_halflife_kimg,
            ema_rampup_ratio=t.ema_rampup_ratio,
            P_mean=t.P_mean,
            P_std=t.P_std,
            augment_pipe=AugmentPipe.edm(t.augment_p) if t.augment_p > 0 else None,
            checkpoints=checkpoints,
            checkpoint_kimg=t.checkpoint_kimg,
            on_progress=progress,
            nonfinite_limit=t.nonfinite_limit,
        )
    except CheckpointError as e:
        raise StageFailed(str(e)) from None
    bar.close()
    stop = result.diverged
    if stop is not None:
        run.log_metrics({"nonfinite_steps": result.nonfinite_steps})
        run.set_tag("diverged", f"at {stop.kimg:g} kimg ({stop.loss})")
        n = result.nonfinite_steps
        raise StageFailed(
            f"the teacher diverged at {stop.kimg:g} kimg ({stop.loss}): {n} step{'s' if n > 1 else ''} with a NaN/Inf "
            f"loss or gradient, more than teacher.nonfinite_limit {t.nonfinite_limit}, the first at "
            f"{stop.first_kimg:g} kimg; nothing written"
            + (f", the last checkpoints kept in {checkpoints.directory}" if checkpoints.directory.exists() else "")
            + " (lower teacher.lr?)"
        )
    ema = result.ema
    with atomic_path(TEACHER_DIR, is_dir=True) as tmp:
        save_network(tmp, ema, config, meta={"source": "train", "kimg": t.duration_kimg})
    info = {
        "kimg": t.duration_kimg,
        "augment_p": t.augment_p,
        "label_dim": config["label_dim"],
        "parameters": sum(p.numel() for p in ema.parameters()),
        "train_seconds": round(time.perf_counter() - start, 1),
        "nonfinite_steps": result.nonfinite_steps,
    }
    write_json(metrics("teacher"), info)
    run.log_metrics(info)
    checkpoints.remove()


def run(params, args, run):
    if params.teacher.source == "url":
        convert_official(params, run)
    else:
        train(params, run)


def tags(params, args):
    return {"method": "edm", **({"source": params.teacher.download.url} if params.teacher.source == "url" else {})}


if __name__ == "__main__":
    run_stage("teacher", run, doc=__doc__, tags=tags)
