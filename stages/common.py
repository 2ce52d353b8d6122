"""What several stages share: the feature network, the FID protocol and its seeds, sample files and grids."""

import hashlib
from pathlib import Path

import numpy as np
import torch.distributed as dist
from PIL import Image

from pipeline.io import atomic_path

from distillery.evaluation import aggregate_fids, fid_only, image_set_metrics
from distillery.extractors import FeatureNet
from distillery.metrics import load_stats_npz
from distillery.sampling import generate, image_grid

from stages.paths import FEATURES_DIR, REFERENCE_FEATURES, REFERENCE_STATS
from stages.skeleton import InvalidInput, StageFailed

# the argument of the stages of one distillation run (distill@<run>, evaluate@<run>, and their _fewstep twins)
RUN_ARGUMENTS = {"--run": "a run of params.yaml: <method>-<lr> (study) or <method>-<lr>-<K>-<variant> (fewstep)"}


def find_run(params, name):
    """The run `name`, refused unless params.yaml defines it."""
    runs = {r.name: r for r in params.runs()}
    if name not in runs:
        raise InvalidInput(
            f"{name} is not a run of the study (each method × its lrs) or of the few-step study (each method × its "
            f"lrs × steps × variants) in params.yaml ({', '.join(runs)})"
        )
    return runs[name]


def run_stage_name(stage):
    """The DVC name of `stage` for the run of `--run` (distill@sid-3e-4, distill_fewstep@cd-1e-4-2-ddil)."""

    def name(params, args):
        run = find_run(params, args.run)
        return f"{stage}{'' if run.steps is None else '_fewstep'}@{run.name}"

    return name


def run_tags(params, args):
    run = find_run(params, args.run)
    tags = {"method": run.method, "lr": run.lr_text, "batch": params.distill.for_method(run.method).batch}
    if run.steps is not None:
        tags.update(steps=run.steps, ddil=run.variant == "ddil")
    return {**tags, "seed": params.seed}


def run_params(params, args):
    """What a run's MLflow run logs as params: the shared settings it trains and samples with and its own method's
    settings, none of another method's (so that runs of different methods compare on what they have)."""
    run = find_run(params, args.run)
    return {
        "profile": params.profile,
        "seed": params.seed,
        "distill": params.distill.for_method(run.method).model_dump(exclude={"per_method"}),
        "evaluation": params.evaluation.model_dump(),
        run.method: params.settings(run),
    }


def feature_net():
    """The FID/IS/KID feature network the `features` stage made (its identity is in the DVC-tracked directory,
    never read from params, so that no stage measures with another extractor than the one DVC recorded)."""
    return FeatureNet.load(FEATURES_DIR)


def seed_blocks(params):
    """The seeds of each FID trial: trial k draws seeds [k·N, (k+1)·N) (docs/methods.md §2.1)."""
    n = params.evaluation.num_samples
    return [list(range(k * n, (k + 1) * n)) for k in range(params.evaluation.fid_trials)]


def measure(sampler, shape, label_dim, params, dev, teacher_stats=None, score=True):
    """Metrics of a sampler under the profile's protocol: FID aggregated over the seed blocks; IS, KID, rel-FID
    and images/s from the first block. Returns (metrics, first block's SampleSet, its FID statistics).

    Under torchrun the ranks share out each block's batches (distillery.sampling.generate) and every rank scores the
    gathered images alike, so that no rank waits in a collective while another scores; rank 0 keeps the result.

    Blown-up images (NaN/Inf, or values far outside the data range: distillery.sampling.BLOWN_UP) are counted
    over all blocks (`blown_up_images`). A set with any of them is not scored, nor is any set when `score` is False
    (a diverged run): its FID, IS, KID, precision, recall and rel-FID are None, and so are the statistics; uint8
    conversion would turn such values into pixels that score."""
    e = params.evaluation
    # not distillery.training.world(): importing training would make its code a DVC dependency of every evaluation
    ranks = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if score:
        features = feature_net()
        ref_stats, ref_features = reference(features)
    fids, first, metrics, stats, blown_up = [], None, None, None, 0
    for seeds in seed_blocks(params):
        samples = generate(sampler, seeds, shape, label_dim, batch=e.batch, device=dev, ranks=ranks)
        blown_up += samples.blown_up
        if not score or blown_up:
            first = first or samples
            continue  # sampled all the same: the count covers every block
        if first is None:
            first = samples
            metrics, stats = image_set_metrics(
                samples.images,
                features,
                ref_stats,
                ref_features,
                kid_subset_size=e.kid_subset_size,
                kid_subsets=e.kid_subsets,
                is_splits=e.is_splits,
                teacher_stats=teacher_stats,
                batch_size=e.batch,
            )
            fids.append(metrics["fid"])
        else:
            fids.append(fid_only(samples.images, features, ref_stats, batch_size=e.batch))
    if score and not blown_up:
        metrics.update(aggregate_fids(fids, e.fid_aggregate))
    else:
        metrics, stats = unscored(len(first.images), teacher_stats is not None), None
    metrics.update(images_per_s=len(first.images) / first.seconds, blown_up_images=blown_up)
    return metrics, first, stats


def unscored(num_samples, rel_fid):
    """The metrics of a set that is not scored: every score None."""
    scores = "fid fid_std is is_std kid kid_std precision recall".split() + (["rel_fid"] if rel_fid else [])
    return {**dict.fromkeys(scores), "fid_trials": [], "num_samples": num_samples}


def protocol(params, feature, reference_path=REFERENCE_STATS):
    """What an FID number depends on; the report refuses to put FIDs of different protocols in one column."""
    e = params.evaluation
    return {
        "extractor": feature.extractor,
        "weights_sha256": feature.weights_sha256,
        "num_samples": e.num_samples,
        "seeds": f"0-{e.num_samples * e.fid_trials - 1}",
        "trials": e.fid_trials,
        "aggregate": e.fid_aggregate,
        "reference_sha256": hashlib.sha256(Path(reference_path).read_bytes()).hexdigest(),
    }


def reference(features):
    """(FID statistics, features) of the real data, refused unless they come from the extractor `features`."""
    stats = load_stats_npz(REFERENCE_STATS)
    dim = len(stats["mu"])
    if dim != features.feature_dim:
        raise StageFailed(
            f"{REFERENCE_STATS} holds {dim}-d features, but {features.extractor} gives {features.feature_dim}-d: "
            f"the reference statistics are not of this extractor (rerun `dvc repro`)"
        )
    with np.load(REFERENCE_FEATURES, allow_pickle=False) as f:
        return stats, f["features"]


def save_samples(path, images_uint8, seeds, labels=None):
    with atomic_path(path) as tmp:
        arrays = {"images": images_uint8.numpy(), "seeds": np.asarray(seeds, dtype=np.int64)}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        np.savez(tmp, **arrays)


def save_grid(path, images_uint8, rows, scale=4):
    grid = Image.fromarray(image_grid(images_uint8, rows))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
