"""Stage `evaluate@<run>` (and `evaluate_fewstep@<run>`): FID, IS, KID, precision, recall, rel-FID, NFE and
images/s of a distilled generator.

A generator that makes any blown-up image (NaN/Inf, or values far outside the data range), and every generator of
a run that diverged, is not scored: its metrics are null and `not_scored` says why (the samples and grid are still
written).

Under `torchrun` the ranks share out the sampling (docs/methods.md §2.1); rank 0 alone writes, logs and measures
the covariate shift."""

import torch

from pipeline import events
from pipeline.io import write_json
from pipeline.runtime import distributed

from distillery.checkpoint import load_config, load_network
from distillery.data import load_dataset
from distillery.metrics import load_stats_npz
from distillery.sampling import BLOWN_UP
from distillery.shift import covariate_shift

from stages.common import (
    RUN_ARGUMENTS,
    feature_net,
    find_run,
    measure,
    protocol,
    run_params,
    run_stage_name,
    run_tags,
    save_grid,
    save_samples,
    seed_blocks,
)
from stages.paths import DATASET, GRIDS, TEACHER_DIR, TEACHER_STATS, eval_metrics, run_dir, student_samples
from stages.skeleton import run_stage


def run(params, args, run):
    e = params.evaluation
    this = find_run(params, args.run)
    name = this.name
    method = params.method(this)  # how its student samples, and its NFE
    meta = load_config(run_dir(name))
    teacher_stats = load_stats_npz(TEACHER_STATS)
    seeds = seed_blocks(params)[0]  # the first trial's seeds: stored samples, grid, IS/KID/rel-FID
    results, not_scored = {}, []
    if meta["diverged"]:
        not_scored.append(f"the run diverged at {meta['diverged_kimg']:g} kimg ({meta['diverged_loss']})")
    with distributed() as (rank, dev):
        for checkpoint in ("best", "last"):
            generator = load_network(run_dir(name), name=checkpoint, device=dev)
            shape = [generator.img_channels, generator.img_resolution, generator.img_resolution]
            results[checkpoint], samples, _ = measure(
                method.sampler(generator),
                shape,
                generator.label_dim,
                params,
                dev,
                teacher_stats=teacher_stats,
                score=not meta["diverged"],
            )
            if results[checkpoint]["blown_up_images"]:
                n, total = results[checkpoint]["blown_up_images"], len(seeds) * e.fid_trials
                blown = f"blown up (NaN/Inf or beyond ±{BLOWN_UP:g})"
                not_scored.append(f"{n} of {total} images of the {checkpoint} checkpoint are {blown}")
            if checkpoint == "best":
                best = samples
    if rank != 0:
        return  # rank 0 writes for all
    save_samples(student_samples(name), best.images, seeds, best.labels)
    save_grid(GRIDS / f"{name}.png", best.images, e.grid_size)

    shift = None
    # a few-step student: how far its inference states are from its training states (when its samples are scored)
    if this.steps is not None and results["best"]["fid"] is not None:
        images, labels, _ = load_dataset(DATASET)
        label_dim = generator.label_dim
        one_hot = torch.eye(label_dim)[torch.from_numpy(labels)] if label_dim else None
        shift = covariate_shift(
            method,
            load_network(run_dir(name), name="best", device=dev),
            load_network(TEACHER_DIR, device=dev),
            torch.from_numpy(images).to(dev),
            None if one_hot is None else one_hot.to(dev),
            feature_net(),
            e.num_samples,
            seed=params.seed,
            batch=e.batch,
        )

    summary = {
        "run": name,
        "method": this.method,
        "steps": this.steps,
        "variant": this.variant,
        "lr": meta["lr"],
        "nfe": method.nfe,
        "kimg": meta["kimg"],
        "best_kimg": meta["best_kimg"],
        "seeds": f"0-{len(seeds) - 1}",
        "batch": e.batch,
        "device": dev.type,
        **results["best"],
        "fid_last": results["last"]["fid"],
        "fid_last_std": results["last"]["fid_std"],
        "rel_fid_last": results["last"]["rel_fid"],
        "blown_up_images_last": results["last"]["blown_up_images"],
        "not_scored": "; ".join(not_scored) or None,
        "protocol": protocol(params, feature_net()),
        "covariate_shift": shift,
    }
    write_json(eval_metrics(name), summary)
    measured = {
        k: v
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_MEASURED
    }
    run.log_metrics(measured)
    run.log_artifact(GRIDS / f"{name}.png")
    events.emit(
        "table",
        key=f"evaluate-{name}",
        description=f"{name}: the best checkpoint (the last one: *_last); protocol in {eval_metrics(name)}",
        table=[{"metric": k, "value": v} for k, v in measured.items()],
    )


NOT_MEASURED = {"lr", "nfe", "kimg", "best_kimg", "batch", "steps"}  # settings, logged as params


if __name__ == "__main__":
    run_stage(
        "evaluate",
        run,
        doc=__doc__,
        arguments=RUN_ARGUMENTS,
        instance=run_stage_name("evaluate"),
        tags=run_tags,
        logged=run_params,
    )
