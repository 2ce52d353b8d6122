"""Stage `evaluate@<method>-<lr>`: FID, IS, KID, rel-FID, NFE and images/s of a distilled generator."""

from pipeline.io import write_json
from pipeline.runtime import device

from distillery.checkpoint import load_config, load_network
from distillery.metrics import load_stats_npz

from stages.common import (
    RUN_ARGUMENTS,
    feature_net,
    measure,
    protocol,
    save_grid,
    save_samples,
    seed_blocks,
    study_run,
    study_run_tags,
)
from stages.paths import GRIDS, TEACHER_STATS, eval_metrics, run_dir, student_samples
from stages.skeleton import run_stage


def run(params, args, run):
    e = params.evaluation
    name = f"{args.method}-{args.lr}"
    method = params.method(args.method)  # how its student samples, and its NFE
    meta = load_config(run_dir(name))
    dev = device()
    teacher_stats = load_stats_npz(TEACHER_STATS)
    seeds = seed_blocks(params)[0]  # the first trial's seeds: stored samples, grid, IS/KID/rel-FID
    results = {}
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
        )
        if checkpoint == "best":
            save_samples(student_samples(name), samples.images, seeds, samples.labels)
            save_grid(GRIDS / f"{name}.png", samples.images, e.grid_size)

    summary = {
        "run": name,
        "method": args.method,
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
        "protocol": protocol(params, feature_net()),
    }
    write_json(eval_metrics(name), summary)
    run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    run.log_artifact(GRIDS / f"{name}.png")


if __name__ == "__main__":
    run_stage("evaluate", run, doc=__doc__, arguments=RUN_ARGUMENTS, instance=study_run, tags=study_run_tags)
