"""Stage `evaluate@<method>-<lr>`: FID, IS, KID, rel-FID, NFE and images/s of a distilled generator."""

import argparse

from pipeline.io import write_json
from pipeline.params import load_params_or_exit
from pipeline.runtime import device
from pipeline.tracking import stage_run

from distillery.checkpoint import load_config, load_network
from distillery.evaluation import image_set_metrics
from distillery.metrics import load_stats_npz
from distillery.sampling import generate, one_step

from stages.common import GRIDS, TEACHER_STATS, feature_net, protocol, reference, save_grid, save_samples
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
    seeds = list(range(e.num_samples))
    ref_stats, ref_features = reference()
    teacher_stats = load_stats_npz(TEACHER_STATS)

    tags = {"method": args.method, "lr": args.lr, "batch": params.distill.batch, "seed": params.seed}
    with stage_run(f"evaluate@{name}", params.model_dump(), tags=tags) as run:
        results = {}
        for checkpoint in ("best", "last"):
            generator = load_network(run_dir, name=checkpoint, device=dev)
            shape = [generator.img_channels, generator.img_resolution, generator.img_resolution]
            images, labels, seconds, nonfinite = generate(one_step(generator, meta["sigma_init"]), seeds, shape,
                                                          generator.label_dim, batch=e.batch, device=dev)
            metrics, _ = image_set_metrics(images, feature_net(params), ref_stats, ref_features,
                                           kid_subset_size=e.kid_subset_size, kid_subsets=e.kid_subsets,
                                           is_splits=e.is_splits, teacher_stats=teacher_stats, batch_size=e.batch)
            metrics.update(images_per_s=len(seeds) / seconds, nonfinite_images=nonfinite)
            results[checkpoint] = metrics
            if checkpoint == "best":
                save_samples(f"samples/{name}.npz", images, seeds, labels)
                save_grid(GRIDS / f"{name}.png", images, e.grid_size)

        summary = {"run": name, "method": args.method, "lr": meta["lr"], "nfe": 1, "kimg": meta["kimg"],
                   "best_kimg": meta["best_kimg"], "seeds": f"0-{len(seeds) - 1}", "batch": e.batch,
                   "device": dev.type, **results["best"],
                   "fid_last": results["last"]["fid"], "rel_fid_last": results["last"]["rel_fid"],
                   "protocol": protocol(params, feature_net(params), len(seeds))}
        write_json(f"metrics/eval/{name}.json", summary)
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        run.log_artifact(GRIDS / f"{name}.png")


if __name__ == "__main__":
    main()
