"""Stage `features` (toy profile): the digits classifier that torch-fidelity uses as FID/IS/KID extractor.

It is an evaluation network only: no training loss anywhere reads it.
"""

import torch

from pipeline.io import atomic_path, write_json
from pipeline.runtime import seed_everything

from distillery.data import load_dataset
from distillery.features import save_digits_net, train_digits_classifier

from stages.paths import DATASET, FEATURES_DIR, metrics
from stages.skeleton import run_stage


def run(params, args, run):
    if params.evaluation.feature_extractor != "distillery-digits":
        # a published extractor (Inception): nothing to train, the output names it for the DAG
        with atomic_path(FEATURES_DIR, is_dir=True) as tmp:
            write_json(
                tmp / "extractor.json",
                {"extractor": params.evaluation.feature_extractor, "weights": params.evaluation.feature_weights},
            )
        return
    f = params.features
    images, labels, _ = load_dataset(DATASET)
    seed_everything(params.seed)
    net, info = train_digits_classifier(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        seed=params.seed,
        epochs=f.epochs,
        batch_size=f.batch,
        lr=f.lr,
    )
    with atomic_path(FEATURES_DIR, is_dir=True) as tmp:
        save_digits_net(net, tmp)
    write_json(metrics("features"), info)
    run.log_metrics(info)


if __name__ == "__main__":
    run_stage("features", run, doc=__doc__)
