"""Stage `evaluate@<method>-<lr>`: FID, IS, KID, rel-FID, NFE and images/s of a distilled generator."""

import argparse

from pipeline.io import write_json
from pipeline.params import load_params_or_exit
from pipeline.runtime import device
from pipeline.tracking import stage_run

from distillery.checkpoint import load_config, load_network
from distillery.metrics import load_stats_npz
from distillery.sampling import one_step

from stages.common import GRIDS, TEACHER_STATS, feature_net, measure, protocol, save_grid, save_samples, seed_blocks
from stages.distill import run_paths


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True)
    parser.add_argument("--lr", required=True)
    args = parser.parse_args()
    params = load_params_or_exit()
    e = params.evaluation
    name = f"{args.method}-{args.lr}"  # the DVC stage suffix: evaluate@<name>
    run_dir, _, _ = run_paths(name)
    meta = load_config(run_dir)
    dev = device()
    teacher_stats = load_stats_npz(TEACHER_STATS)
    seeds = seed_blocks(params)[0]  # the first trial's seeds: stored samples, grid, IS/KID/rel-FID

    tags = {"method": args.method, "lr": args.lr, "batch": meta["batch"], "seed": params.seed}
    with stage_run(f"evaluate@{name}", params.model_dump(), tags=tags) as run:
        results = {}
        for checkpoint in ("best", "last"):
            generator = load_network(run_dir, name=checkpoint, device=dev)
            shape = [generator.img_channels, generator.img_resolution, generator.img_resolution]
            results[checkpoint], samples, _ = measure(one_step(generator, meta["sigma_init"]), shape,
                                                      generator.label_dim, params, dev, teacher_stats=teacher_stats)
            if checkpoint == "best":
                save_samples(f"samples/{name}.npz", samples.images, seeds, samples.labels)
                save_grid(GRIDS / f"{name}.png", samples.images, e.grid_size)

        summary = {"run": name, "method": args.method, "lr": meta["lr"], "nfe": 1, "kimg": meta["kimg"],
                   "best_kimg": meta["best_kimg"], "seeds": f"0-{len(seeds) - 1}", "batch": e.batch,
                   "device": dev.type, **results["best"],
                   "fid_last": results["last"]["fid"], "fid_last_std": results["last"]["fid_std"],
                   "rel_fid_last": results["last"]["rel_fid"], "protocol": protocol(params, feature_net(params))}
        write_json(f"metrics/eval/{name}.json", summary)
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        run.log_artifact(GRIDS / f"{name}.png")


if __name__ == "__main__":
    main()
