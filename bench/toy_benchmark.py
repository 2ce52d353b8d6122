"""Student vs teacher on the built toy pipeline: sampling throughput at the same batch, and FID ratio.

Run after `make demo` (or `dvc repro`), from the repository root:
    .venv/bin/python bench/toy_benchmark.py [--repeats 3]
It reads the artifacts of that one run: the teacher, the best student of the study (lowest FID in
metrics/eval), and their metric files; throughput is re-timed here with both at the same batch.
"""

import argparse
import json
from pathlib import Path

import torch

from pipeline.params import load_params
from pipeline.runtime import device

from distillery.checkpoint import load_config, load_network
from distillery.sampling import generate, heun, one_step


def throughput(sampler, shape, label_dim, batch, repeats, dev):
    seeds = list(range(batch))
    generate(sampler, seeds, shape, label_dim, batch=batch, device=dev)  # warm-up
    best = 0.0
    for _ in range(repeats):
        seconds = generate(sampler, seeds, shape, label_dim, batch=batch, device=dev).seconds
        best = max(best, batch / seconds)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, help="default: evaluation.batch of params.yaml")
    args = parser.parse_args()
    params = load_params()
    batch = args.batch or params.evaluation.batch
    dev = device()
    torch.set_grad_enabled(False)

    teacher_metrics = json.loads(Path("metrics/teacher_samples.json").read_text())
    students = {run.name: json.loads(Path(f"metrics/eval/{run.name}.json").read_text()) for run in params.runs()}
    best_name = min(students, key=lambda n: students[n]["fid"])
    best = students[best_name]

    teacher = load_network("models/teacher", device=dev)
    student = load_network(f"runs/{best_name}", name="best", device=dev)
    shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
    steps = teacher_metrics["steps"]
    t_ips = throughput(heun(teacher, steps), shape, teacher.label_dim, batch, args.repeats, dev)
    s_ips = throughput(
        one_step(student, load_config(f"runs/{best_name}")["sigma_init"]),
        shape,
        student.label_dim,
        batch,
        args.repeats,
        dev,
    )

    print(f"device {dev.type}, batch {batch}, torch threads {torch.get_num_threads()}")
    print(
        f"teacher  (Heun {steps} steps, NFE {2 * steps - 1}): {t_ips:10.1f} images/s   FID {teacher_metrics['fid']:.3f}"
    )
    print(f"student  ({best_name}, NFE 1, {best['kimg']:g} kimg):     {s_ips:10.1f} images/s   FID {best['fid']:.3f}")
    print(f"throughput ratio student/teacher: {s_ips / t_ips:.1f}x")
    print(f"FID ratio best student/teacher:   {best['fid'] / teacher_metrics['fid']:.3f}  (target <= 1.0)")
    for name, m in students.items():
        print(
            f"  {name}: FID {m['fid']:.3f} (last {m['fid_last']:.3f}), rel-FID {m['rel_fid']:.3f}, "
            f"best @ {m['best_kimg']:g} kimg"
        )


if __name__ == "__main__":
    main()
