"""Stage `distill@<method>-<lr>`: one distillation run of the study, resumable, FID over training.

Under `torchrun` (more than one GPU for the stage) every rank trains its share of the batch shards
and rank 0 alone monitors, logs and writes the outputs.
"""

import argparse
import contextlib
import copy
import csv
import time

import torch

from pipeline.io import atomic_path, write_json
from pipeline.params import load_params_or_exit
from pipeline.runtime import CHECKPOINT_DIR, distributed, fingerprint, kimg_bar, seed_everything
from pipeline.tracking import stage_run

from distillery.checkpoint import load_config, load_network, save_network
from distillery.data import load_dataset
from distillery.metrics import extract_features, fid_from_statistics, fid_statistics
from distillery.methods import METHODS
from distillery.sampling import generate, one_step
from distillery.training import distill

from stages.common import feature_net, reference
from stages.data import DATASET
from stages.teacher import TEACHER_DIR


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True)
    parser.add_argument("--lr", required=True, help="learning rate, as written in params.yaml")
    return parser.parse_args()


def run_paths(name):
    return f"runs/{name}", f"plots/fid/{name}.csv", f"metrics/distill/{name}.json"


def fid_monitor(params, method, teacher, dev):
    """Small-sample FID of the EMA generator against the data, from fixed seeds (lower is better)."""
    ref_stats, _ = reference()
    features = feature_net(params)
    shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
    seeds = list(range(params.distill.monitor_samples))

    def monitor(ema):
        samples = generate(one_step(ema, method.sigma_init), seeds, shape, teacher.label_dim,
                           batch=params.evaluation.batch, device=dev)
        if samples.nonfinite:
            return float("inf")  # a blown-up generator: never "best", marked diverged in the report
        feats = extract_features(samples.images, features, batch_size=params.evaluation.batch)
        return fid_from_statistics(fid_statistics(feats[features.fid_key]), ref_stats)

    return monitor


def write_outputs(name, method_name, lr_text, lr, method, d, ema, best, history, config, seconds):
    out_dir, curve_path, metrics_path = run_paths(name)
    meta = {"method": method_name, "lr": lr, "sigma_init": method.sigma_init, "kimg": d.duration_kimg,
            "batch": d.batch,
            "best_kimg": best["kimg"], "best_monitor_fid": best["value"]}
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_network(tmp, ema, config, name="last", meta=meta)
        best_net = copy.deepcopy(ema)
        best_net.load_state_dict(best["ema"])
        save_network(tmp, best_net, config, name="best", meta=meta)
    with atomic_path(curve_path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["kimg", "fid", "method", "lr"])
            writer.writerows([(f"{k:g}", f"{v:.6g}", method_name, lr_text) for k, v in history])
    summary = {**meta, "final_monitor_fid": history[-1][1], "train_seconds": round(seconds, 1),
               "kimg_per_s": d.duration_kimg / seconds, "monitor_samples": d.monitor_samples,
               "diverged": not all(v < float("inf") for _, v in history)}
    write_json(metrics_path, summary)
    return summary


def main():
    args = parse_args()
    params = load_params_or_exit()
    name = f"{args.method}-{args.lr}"  # the DVC stage suffix: distill@<name>
    runs = {run: lr for _, lr, run in params.runs()}
    if name not in runs:
        raise SystemExit(f"distill: {name} is not a run of study.methods × study.lrs ({', '.join(runs)})")
    lr, d = runs[name], params.distill.for_method(args.method)
    method_params = getattr(params, args.method)
    method = METHODS[args.method](**method_params.model_dump())

    with distributed() as (rank, dev):
        teacher = load_network(TEACHER_DIR, device=dev)
        config = load_config(TEACHER_DIR)["network"]
        seed_everything(params.seed)
        generator = method.make_generator(teacher)  # every method starts G from the teacher
        aux = method.make_aux(teacher)
        real_images = real_labels = None
        if method.needs_real_data:
            images, labels, _ = load_dataset(DATASET, keep_uint8=True)
            real_images = torch.from_numpy(images)
            real_labels = torch.from_numpy(labels) if teacher.label_dim else None

        tags = {"method": args.method, "lr": args.lr, "batch": d.batch, "seed": params.seed}
        tracking = stage_run(f"distill@{name}", params.model_dump(), tags=tags) if rank == 0 else contextlib.nullcontext()
        with tracking as run:
            bar = kimg_bar(d.duration_kimg, f"distill {name}") if rank == 0 else None
            logged = [0]
            monitor = fid_monitor(params, method, teacher, dev)

            def progress(nimg, metrics):
                bar.n = nimg / 1000
                bar.update(0)
                if nimg - logged[0] >= 1000:
                    run.log_metrics(metrics, step=nimg // 1000)
                    logged[0] = nimg

            def tracked_monitor(ema):
                value = monitor(ema)
                bar.set_postfix(fid=f"{value:.3f}")
                run.log_metrics({"monitor_fid": value}, step=round(bar.n))
                return value

            ckpt = CHECKPOINT_DIR / f"distill-{name}.pt"
            start = time.perf_counter()
            ema, best, history = distill(
                method, teacher if method.needs_teacher else None, generator, aux, batch=d.batch, lr=lr,
                betas=d.adam_betas, generator_betas=d.generator_adam_betas, eps=d.adam_eps, duration_kimg=d.duration_kimg,
                ema_halflife_kimg=d.ema_halflife_kimg, ema_rampup_ratio=d.ema_rampup_ratio,
                label_dim=teacher.label_dim, real_images=real_images, real_labels=real_labels,
                seed=params.seed, shards=d.shards, checkpoint_path=ckpt, checkpoint_kimg=d.checkpoint_kimg,
                fingerprint=fingerprint({"seed": params.seed, "lr": lr, "method": args.method,
                                         "distill": d.model_dump(), "method_params": method_params.model_dump()},
                                        [TEACHER_DIR]),
                monitor=tracked_monitor, monitor_kimg=d.monitor_kimg, on_progress=progress)
            if rank == 0:
                bar.close()
                summary = write_outputs(name, args.method, args.lr, lr, method, d, ema, best, history, config,
                                        time.perf_counter() - start)
                run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
                ckpt.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
