"""Stage `features` (toy profile): the digits classifier that torch-fidelity uses as FID/IS/KID extractor.

It is an evaluation network only: no training loss anywhere reads it.
"""

import torch

from pipeline.io import atomic_path, write_json
from pipeline.params import load_params_or_exit
from pipeline.runtime import seed_everything
from pipeline.tracking import stage_run

from distillery.data import load_dataset
from distillery.features import save_digits_net, train_digits_classifier

from stages.common import FEATURES_DIR
from stages.data import DATASET


def main():
    params = load_params_or_exit()
    if params.evaluation.feature_extractor != "distillery-digits":
        # a published extractor (Inception): nothing to train, the output names it for the DAG
        with atomic_path(FEATURES_DIR, is_dir=True) as tmp:
            write_json(tmp / "extractor.json", {"extractor": params.evaluation.feature_extractor,
                                                "weights": params.evaluation.feature_weights})
        return
    f = params.features
    images, labels, _ = load_dataset(DATASET)
    seed_everything(params.seed)
    with stage_run("features", params.model_dump()) as run:
        net, metrics = train_digits_classifier(torch.from_numpy(images), torch.from_numpy(labels), seed=params.seed,
                                               epochs=f.epochs, batch_size=f.batch, lr=f.lr)
        with atomic_path(FEATURES_DIR, is_dir=True) as tmp:
            save_digits_net(net, tmp)
        write_json("metrics/features.json", metrics)
        run.log_metrics(metrics)


if __name__ == "__main__":
    main()
