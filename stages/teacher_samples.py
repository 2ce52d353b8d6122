"""Stage `teacher_samples`: the teacher's Heun samples from seeds 0..N-1, its own metrics (FID over the
protocol's trials), and the statistics of its samples that rel-FID compares students against (docs/methods.md §5).

Under `torchrun` the ranks share out the sampling (docs/methods.md §2.1); rank 0 alone writes and logs."""

from pipeline.io import atomic_path, write_json
from pipeline.runtime import distributed

from distillery.checkpoint import load_network
from distillery.metrics import save_stats_npz
from distillery.sampling import heun

from stages.common import feature_net, measure, protocol, save_grid, save_samples, seed_blocks
from stages.paths import GRIDS, TEACHER_DIR, TEACHER_SAMPLES, TEACHER_STATS, metrics
from stages.skeleton import StageFailed, run_stage


def run(params, args, run):
    e = params.evaluation
    with distributed() as (rank, dev):
        teacher = load_network(TEACHER_DIR, device=dev)
        shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
        nfe = 2 * e.teacher_steps - 1
        info, samples, stats = measure(heun(teacher, e.teacher_steps), shape, teacher.label_dim, params, dev)
    if rank != 0:
        return  # rank 0 writes for all
    if stats is None:  # measure scores no set with blown-up images
        raise StageFailed(
            f"{info['blown_up_images']} of the teacher's samples are blown up (NaN/Inf or far outside the data range): "
            "nothing to compare with"
        )
    seeds = seed_blocks(params)[0]
    info.update(
        nfe=nfe,
        sampler="heun",
        steps=e.teacher_steps,
        seeds=f"0-{len(seeds) - 1}",
        batch=e.batch,
        device=dev.type,
        label_dim=teacher.label_dim,
        protocol=protocol(params, feature_net()),
    )
    save_samples(TEACHER_SAMPLES, samples.images, seeds, samples.labels)
    with atomic_path(TEACHER_STATS) as tmp:
        save_stats_npz(tmp, stats)
    save_grid(GRIDS / "teacher.png", samples.images, e.grid_size)
    write_json(metrics("teacher_samples"), info)
    run.log_metrics({k: v for k, v in info.items() if isinstance(v, (int, float))})
    run.log_artifact(GRIDS / "teacher.png")


def tags(params, args):
    return {"method": "teacher", "nfe": 2 * params.evaluation.teacher_steps - 1}


if __name__ == "__main__":
    run_stage("teacher_samples", run, doc=__doc__, tags=tags)
