"""Stage `teacher_samples`: the teacher's Heun samples from seeds 0..N-1, its own metrics, and the
statistics of its samples that rel-FID compares students against (ALGORITHMS.md §5)."""

from pipeline.io import atomic_path, write_json
from pipeline.params import load_params_or_exit
from pipeline.runtime import device
from pipeline.tracking import stage_run

from distillery.checkpoint import load_network
from distillery.evaluation import image_set_metrics
from distillery.metrics import save_stats_npz
from distillery.sampling import generate, heun

from stages.common import (GRIDS, TEACHER_SAMPLES, TEACHER_STATS, feature_net, protocol, reference, save_grid,
                           save_samples)
from stages.teacher import TEACHER_DIR


def main():
    params = load_params_or_exit()
    e = params.evaluation
    dev = device()
    teacher = load_network(TEACHER_DIR, device=dev)
    seeds = list(range(e.num_samples))
    shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
    nfe = 2 * e.teacher_steps - 1
    with stage_run("teacher_samples", params.model_dump(), tags={"method": "teacher", "nfe": nfe}) as run:
        images, labels, seconds, _ = generate(heun(teacher, e.teacher_steps), seeds, shape, teacher.label_dim,
                                           batch=e.batch, device=dev)
        ref_stats, ref_features = reference()
        metrics, stats = image_set_metrics(images, feature_net(params), ref_stats, ref_features,
                                           kid_subset_size=e.kid_subset_size, kid_subsets=e.kid_subsets,
                                           is_splits=e.is_splits, batch_size=e.batch)
        metrics.update(nfe=nfe, images_per_s=len(seeds) / seconds, sampler="heun", steps=e.teacher_steps,
                       seeds=f"0-{len(seeds) - 1}", batch=e.batch, device=dev.type,
                       protocol=protocol(params, feature_net(params), len(seeds)))
        save_samples(TEACHER_SAMPLES, images, seeds, labels)
        with atomic_path(TEACHER_STATS) as tmp:
            save_stats_npz(tmp, stats)
        save_grid(GRIDS / "teacher.png", images, e.grid_size)
        write_json("metrics/teacher_samples.json", metrics)
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_artifact(GRIDS / "teacher.png")


if __name__ == "__main__":
    main()
