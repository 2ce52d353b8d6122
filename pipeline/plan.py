"""`distillery plan`: what a profile will run, fetch, store and cost, before anything is started.

The DAG is DVC's own, rendered from the profile in a scratch copy of dvc.yaml; the compute estimate
comes from generator steps timed here, on the present device, with the profile's network.
"""

import copy
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

# Published download sizes (MB) of files whose size is known before fetching them.
KNOWN_SIZES_MB = {
    "cifar10": 163,  # cifar-10-python.tar.gz (torchvision)
    "inception-v3-compat": 91,  # torch-fidelity's weights-inception-2015-12-05
    # ImageNet weights of the projected discriminator's backbones (torchvision's files; timm's: fp32 parameters)
    "vgg16_bn": 528,
    "efficientnet_b0": 21,
    "tf_efficientnet_lite0": 19,
    "deit_base_distilled_patch16_224": 349,
}


def dag(project_root, profile_path):
    """{stage: [upstream stages]} of dvc.yaml rendered with the profile as params.yaml (and its runs.yaml)."""
    from dvc.repo import Repo

    from pipeline.flow import topological
    from pipeline.params import load_params
    from pipeline.runs_file import write

    with tempfile.TemporaryDirectory() as scratch:
        shutil.copy(Path(project_root) / "dvc.yaml", Path(scratch) / "dvc.yaml")
        shutil.copy(profile_path, Path(scratch) / "params.yaml")
        write(scratch, load_params(profile_path))
        repo = Repo.init(scratch, no_scm=True)
        try:
            graph = repo.index.graph
            stages = {s.name: sorted(u.name for u in graph.successors(s)) for s in graph.nodes}
        finally:
            repo.close()
    return {name: stages[name] for name in topological(stages)}


def downloads(params):
    rows = []
    if params.data.source == "cifar10":
        rows.append(
            (
                "CIFAR-10 training set (torchvision)",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                KNOWN_SIZES_MB["cifar10"],
                "torchvision's md5",
            )
        )
    if params.data.source == "edm-zip":
        where = params.data.download.url if params.data.download else f"local file {params.data.path}"
        rows.append(
            (
                "data set zip (EDM dataset_tool format)",
                where,
                None,
                pin_text(params.data.download) if params.data.download else "read in place",
            )
        )
    if params.teacher.source == "url":
        rows.append(("EDM teacher", params.teacher.download.url, None, pin_text(params.teacher.download)))
    e = params.evaluation
    if e.feature_extractor == "inception-v3-compat" and e.weights().url:
        rows.append(
            (
                "Inception-v3 weights (torch-fidelity's release)",
                e.weights().url,
                KNOWN_SIZES_MB["inception-v3-compat"],
                pin_text(e.weights()),
            )
        )
    if e.reference == "edm-npz":
        rows.append(("FID reference statistics", e.reference_download.url, 33, pin_text(e.reference_download)))
    backbones = sorted(
        {
            b
            for m in params.study.methods
            if m.startswith("gdd") and getattr(params, m).discriminator == "projected"
            for b in getattr(params, m).backbones
        }
    )
    for b in backbones:
        rows.append(
            (
                f"ImageNet weights of {b} (projected discriminator)",
                "fetched by torchvision / timm on first use",
                KNOWN_SIZES_MB[b],
                "the library's",
            )
        )
    return rows


# Images and classes of the data sets the profiles name (EDM's dataset zips: FFHQ and AFHQv2 unlabelled).
KNOWN_DATASETS = {
    "cifar10": (50000, 10),
    "sklearn-digits": (1797, 10),
    "ffhq-64x64": (70000, 1),
    "afhqv2-64x64": (15803, 1),
    "imagenet-64x64": (1281167, 1000),
}


def known_dataset(params):
    """(images, classes) of the profile's data set; a zip of another name counts as empty, labelled as ImageNet."""
    d = params.data
    if d.source != "edm-zip":
        return KNOWN_DATASETS[d.source]
    return KNOWN_DATASETS.get(Path(urlparse(d.download.url).path if d.download else d.path).stem, (0, 1000))


def pin_text(spec):
    return f"sha256 {spec.sha256[:12]}…" if spec.sha256 else "sha256 recorded on first download"


def network(params):
    """The teacher network the profile describes, built as the `teacher` stage builds it."""
    from distillery.networks import build_network

    from stages.teacher import teacher_config

    resolution, channels = params.data.shape()
    return build_network(teacher_config(params, resolution, channels, known_dataset(params)[1]))


def seconds_per_image(method, teacher, micro_batch, device, steps=1):
    """Wall time of one distillation iteration (aux + generator update) per image, timed here."""
    import torch

    from distillery.training import DistillConfig, TrainingData, distill

    generator, aux = method.make_generator(teacher), method.make_aux(teacher)
    real = torch.rand(micro_batch, teacher.img_channels, teacher.img_resolution, teacher.img_resolution) * 2 - 1
    data = TrainingData(images=real if method.needs_real_data else None)
    config = DistillConfig(
        batch=micro_batch,
        lr=1e-5,
        betas=(0.0, 0.999),
        eps=1e-8,
        duration_kimg=micro_batch / 1000,
        ema_halflife_kimg=1,
        ema_rampup_ratio=0.05,
    )
    teacher = teacher if method.needs_teacher else None
    distill(method, teacher, generator, aux, config, data=data, label_dim=generator.label_dim)  # warm-up
    start = time.perf_counter()
    distill(
        method,
        teacher,
        generator,
        aux,
        config._replace(duration_kimg=steps * micro_batch / 1000),
        data=data,
        label_dim=generator.label_dim,
    )
    return (time.perf_counter() - start) / (steps * micro_batch)


def estimate(params, micro_batch=None):
    """{method: seconds per image} of every method of the study, and the teacher's seconds per sample."""
    import torch

    from pipeline.runtime import device

    from distillery.registry import METHODS
    from distillery.sampling import generate, heun

    dev = device()
    micro_batch = micro_batch or (8 if dev.type == "cuda" else 1)
    torch.manual_seed(0)
    teacher = network(params).to(dev).eval().requires_grad_(False)
    per_image = {}
    for m in params.study.methods:
        # random backbones: the compute of the ImageNet weights, nothing to download
        offline = {"backbone_weights": None} if "backbone_weights" in METHODS[m].settings.model_fields else {}
        per_image[m] = seconds_per_image(
            METHODS[m].build(getattr(params, m), **offline), copy.deepcopy(teacher), micro_batch, dev
        )
    shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
    sampling = generate(heun(teacher, 2), [0, 1], shape, teacher.label_dim, batch=2, device=dev).seconds / 2
    heun_per_sample = sampling / 3 * (2 * params.evaluation.teacher_steps - 1)  # 3 denoiser calls timed above
    return dev, per_image, heun_per_sample, sum(p.numel() for p in teacher.parameters())


def disk_gb(params, n_params):
    res, ch = params.data.shape()
    image = res * res * ch  # bytes per uint8 image
    runs = len(params.runs())
    dataset = known_dataset(params)[0] * image
    samples = (runs + 1) * params.evaluation.num_samples * image
    networks = (1 + 2 * runs) * n_params * 4
    checkpoints = min(runs, 8) * 7 * n_params * 4  # G, aux, EMA and two Adam moments of the stages running at once
    return {
        "data set": dataset,
        "sample sets": samples,
        "networks (teacher, best and last per run)": networks,
        "resumable checkpoints (running stages)": checkpoints,
    }


def print_plan(project_root, profile_path, params, measure=True):
    gb = 1e9
    print(f"profile {params.profile} ({profile_path}): valid")
    print("\nDAG (DVC stages, upstream first):")
    for name, upstream in dag(project_root, profile_path).items():
        print(f"  {name:<28} <- {', '.join(upstream) or '(none)'}")
    print("\nDownloads:")
    for what, url, mb, pin in downloads(params) or [("none", "", 0, "")]:
        print(f"  {what}: {url} ({f'{mb} MB' if mb else 'size known on download'}; {pin})")
    if not measure:
        return
    dev, per_image, heun_per_sample, n_params = estimate(params)
    print(f"\nDisk (teacher network {n_params / 1e6:.1f} M parameters):")
    sizes = disk_gb(params, n_params)
    for what, size in sizes.items():
        print(f"  {what:<42} {size / gb:8.2f} GB")
    print(f"  {'total':<42} {sum(sizes.values()) / gb:8.2f} GB")
    print(f"\nCompute on this device ({dev.type}; timed here with the profile's network), device-hours:")
    total = 0.0
    for method, seconds in per_image.items():
        kimg, n_lrs = params.distill.for_method(method).duration_kimg, len(params.study.lrs_of(method))
        hours = seconds * kimg * 1000 * n_lrs / 3600
        total += hours
        print(f"  {f'distill {method}: {1 / seconds:.2f} images/s × {kimg:g} kimg × {n_lrs} lrs':<62} {hours:12.1f}")
    e = params.evaluation
    nfe, samples = 2 * e.teacher_steps - 1, e.num_samples * e.fid_trials
    sampling = heun_per_sample * samples / 3600
    # students: best and last checkpoint of every run, K denoiser calls per sample (1 for one-step runs)
    calls = sum(run.steps or 1 for run in params.runs())
    students = heun_per_sample / nfe * samples * 2 * calls / 3600
    total += sampling + students
    print(f"  {f'teacher samples: {samples} × NFE {nfe}':<62} {sampling:12.1f}")
    runs = len(params.runs())
    print(f"  {f'student samples: {samples} × 2 checkpoints × {runs} runs (Σ NFE {calls})':<62} {students:12.1f}")
    fewstep = [run.name for run in params.runs() if run.steps is not None]
    if fewstep:
        print(f"  few-step runs ({len(fewstep)}): their training is not timed here")
    print(f"  {'total device-hours (split over --gpus; FID features not included)':<62} {total:12.1f}")
