"""Stage `data`: the data set as one array file (images, labels): the bundled digits, CIFAR-10, or a data set
zip in EDM's format (FFHQ, AFHQv2, ImageNet at 64×64)."""

from contextlib import nullcontext

from pipeline.io import atomic_path, write_json
from pipeline.pins import DOWNLOADS, fetch, file_sha256

from distillery.data import load_cifar10_dataset, load_digits_dataset, load_edm_zip, save_dataset

from stages.paths import DATASET, metrics
from stages.skeleton import StageFailed, run_stage


def run(params, args, run):
    d, digest = params.data, None
    if d.source == "cifar10":
        images, labels = load_cifar10_dataset(DOWNLOADS)
    elif d.source == "edm-zip":
        source = fetch(d.download) if d.download else nullcontext((d.path, file_sha256(d.path)))
        with source as (path, digest):  # a downloaded zip's first-use pin is recorded once it loaded
            if d.path and d.sha256 and digest != d.sha256:
                raise StageFailed(f"{d.path} has sha256 {digest}, but data.sha256 pins {d.sha256}")
            images, labels = load_edm_zip(path, d.resolution)
    else:
        images, labels = load_digits_dataset()
    with atomic_path(DATASET) as tmp:
        save_dataset(tmp, images, labels, num_classes=int(labels.max()) + 1)
    info = {
        "num_images": len(images),
        "resolution": images.shape[-1],
        "channels": images.shape[1],
        "num_classes": int(labels.max()) + 1,
    }
    write_json(metrics("data"), {**info, "sha256": digest} if digest else info)
    run.log_metrics(info)


if __name__ == "__main__":
    run_stage("data", run, doc=__doc__)
