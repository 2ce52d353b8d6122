"""Stage `data`: the data set as one array file (images, labels): the bundled digits, or CIFAR-10."""

from pipeline.io import atomic_path, write_json
from pipeline.params import load_params_or_exit
from pipeline.pins import DOWNLOADS
from pipeline.tracking import stage_run

from distillery.data import load_cifar10_dataset, load_digits_dataset, save_dataset

DATASET = "data/dataset.npz"


def main():
    params = load_params_or_exit()
    with stage_run("data", params.model_dump()) as run:
        if params.data.source == "cifar10":
            images, labels = load_cifar10_dataset(DOWNLOADS)
        else:
            images, labels = load_digits_dataset()
        with atomic_path(DATASET) as tmp:
            save_dataset(tmp, images, labels, num_classes=int(labels.max()) + 1)
        info = {"num_images": len(images), "resolution": images.shape[-1], "channels": images.shape[1],
                "num_classes": int(labels.max()) + 1}
        write_json("metrics/data.json", info)
        run.log_metrics(info)


if __name__ == "__main__":
    main()
