"""Stage `report`: the results table, the learning-rate robustness figure and the published numbers,
built from the DVC-tracked metric and plot files only."""

import json
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from pipeline.io import atomic_path, write_text
from pipeline.published import published_rows
from pipeline.tracking import mark_current

from distillery.registry import METHODS

from stages.paths import (
    FEWSTEP_FIGURE,
    LR_FIGURE,
    RESULTS_CSV,
    RESULTS_MD,
    SHIFT_CSV,
    SHIFT_FIGURE,
    distill_metrics,
    eval_metrics,
    metrics,
)
from stages.report_curves import write_fid_curves
from stages.report_fewstep import fewstep_figure, fewstep_frame, log_y, shift_figure, shift_frame, shift_table
from stages.skeleton import StageFailed, run_stage

COLUMNS = [
    "method",
    "states",
    "lr",
    "batch",
    "NFE",
    "FID",
    "FID std",
    "IS",
    "KID",
    "precision",
    "recall",
    "rel-FID",
    "images/s",
    "kimg",
    "checkpoint",
    "FID (last)",
    "status",
]


def read_json(path):
    return json.loads(Path(path).read_text())


def teacher_row(m):
    return {
        "method": f"teacher (EDM Heun, {m['steps']} steps)",
        "states": None,
        "lr": None,
        "batch": None,
        "NFE": m["nfe"],
        "FID": m["fid"],
        "FID std": m["fid_std"],
        "IS": m["is"],
        "KID": m["kid"],
        "precision": m.get("precision"),
        "recall": m.get("recall"),
        "rel-FID": 0.0,
        "images/s": m["images_per_s"],
        "kimg": None,
        "checkpoint": "ema",
        "FID (last)": None,
        "status": "",
    }


def runaway_since(history, factor):
    """The kimg from which the monitoring FID stayed above `factor` × its best (the start of the final run-away)."""
    best = min(v for _, v in history)
    since = None
    for kimg, value in history:
        since = (since or kimg) if value > factor * best else None
    return since


def status(train, evaluation, factor):
    """What became of a run, from its distill and evaluate metrics (docs/methods.md §3.12); status_text says what
    each status means. `ok` only when none of the others applies; every `diverged` names the kimg it happened at."""
    if train["diverged"]:
        return f"diverged at {train['diverged_kimg']:g} kimg ({train['diverged_loss']})"
    history = train["monitor_fids"]
    bad = [kimg for kimg, value in history if value is None]
    if evaluation.get("blown_up_images"):  # the evaluated best checkpoint (the last one when none was best)
        bad.append(train["best_kimg"] if train["best_kimg"] is not None else train["kimg"])
    if evaluation.get("blown_up_images_last"):
        bad.append(train["kimg"])
    if bad:
        return f"diverged at {min(bad):g} kimg (blown-up images)"
    if train["unmoved"]:
        return "unmoved"
    best, final = train["best_monitor_fid"], train["final_monitor_fid"]
    if best is not None and final is not None and final > factor * best:
        return f"diverged at {runaway_since(history, factor):g} kimg (FID > {factor:g}× best)"
    n = train["nonfinite_steps"]
    if n:  # tolerated, so the run went on (a short run never reaches the limit)
        return f"unstable ({n} non-finite step{'s' if n > 1 else ''})"
    return "ok"


def status_text(params):
    """The report's key to the status column, as markdown lines."""
    limit, factor = params.distill.nonfinite_limit, params.report.diverged_factor
    return [
        "Status (docs/methods.md §3.12):",
        "",
        f"- `diverged at <kimg> kimg (<loss>)`: more than `distill.nonfinite_limit` ({limit}) training steps had a "
        "NaN/Inf loss or gradient, so the run stopped at that point; `<loss>` went non-finite first (`loss_g` the "
        "generator's, `loss_aux` the fake score's or discriminator's, `loss_reg` GDD's R1). The run is not scored.",
        "- `diverged at <kimg> kimg (blown-up images)`: the monitoring sample set at that point, or an evaluated "
        "checkpoint of it, held images with NaN/Inf values or values far outside the data range (docs/methods.md). "
        "A checkpoint with any is not scored.",
        "- `unmoved`: a saved generator is bit for bit the teacher copy it started from (every update was zeroed), "
        "so its scores are the teacher's as a one-step sampler.",
        f"- `diverged at <kimg> kimg (FID > {factor:g}× best)`: the final monitoring FID ran away from the best one; "
        "from that point on it stayed above that bound.",
        "- `unstable (<n> non-finite steps)`: the run had steps with a NaN/Inf loss or gradient, within the limit: "
        "they were sanitised (updates zeroed or clipped) and the run went on.",
        "- `ok`: none of these.",
        "",
        "`—`: a score that was not computed.",
    ]


def states_text(run, params):
    """Where a few-step student's training states came from (empty for one-step runs)."""
    if run.steps is None:
        return None
    if run.variant == "ddil":
        return (
            "DDIL " + ":".join(f"{b:g}" for b in params.fewstep.ddil) + (" reflected" if params.fewstep.reflect else "")
        )
    return "backward sim." if run.method == "dmd2" else "diffused data"


def student_row(m, train, factor, states=None):
    return {
        "method": METHODS[m["method"]].display,
        "states": states,
        "lr": m["lr"],
        "batch": train["batch"],
        "NFE": m["nfe"],
        "FID": m["fid"],
        "FID std": m["fid_std"],
        "IS": m["is"],
        "KID": m["kid"],
        "precision": m.get("precision"),
        "recall": m.get("recall"),
        "rel-FID": m["rel_fid"],
        "images/s": m["images_per_s"],
        "kimg": m["kimg"],
        "checkpoint": "last (no best)" if m["best_kimg"] is None else f"best @ {m['best_kimg']:g} kimg",
        "FID (last)": m["fid_last"],
        "status": status(train, m, factor),
    }


def common_protocol(named_metrics):
    """The one FID protocol of all rows; numbers measured differently never share a column."""
    protocols = {json.dumps(m["protocol"], sort_keys=True) for m in named_metrics.values()}
    if len(protocols) > 1:
        lines = [f"  {name}: {json.dumps(m['protocol'], sort_keys=True)}" for name, m in named_metrics.items()]
        raise StageFailed("refusing to put FIDs of different protocols in one column:\n" + "\n".join(lines))
    return named_metrics["teacher"]["protocol"]


def results_table(params):
    teacher = read_json(metrics("teacher_samples"))
    # exactly the runs of the current study: files left by runs removed from params.yaml are ignored
    runs = params.runs()
    evals = {run.name: read_json(eval_metrics(run.name)) for run in runs}
    protocol = common_protocol({"teacher": teacher, **evals})
    rows = [teacher_row(teacher)]
    for run in runs:
        train = read_json(distill_metrics(run.name))
        row = student_row(evals[run.name], train, params.report.diverged_factor, states_text(run, params))
        rows.append({**row, "lr": run.lr_text})  # as written in params.yaml
    table = pd.DataFrame(rows, columns=COLUMNS)
    if not params.fewstep.methods:
        table = table.drop(columns="states")
    return table, protocol, evals


def lr_robustness_figure(params, table, path):
    """FID of the best checkpoint against the learning rate, one line per one-step method: how much each method's
    result depends on its rate (each method at its own rates, study.per_method)."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    fids = table["FID"].iloc[1:]  # the rows after the teacher's are the runs, in params.runs() order
    one_step = [(run, fid) for run, fid in zip(params.runs(), fids) if run.steps is None]
    for method in params.study.methods:
        points = sorted((run.lr, fid) for run, fid in one_step if run.method == method)
        ax.plot([lr for lr, _ in points], [fid for _, fid in points], marker="o", label=METHODS[method].display)
    lrs = sorted({(run.lr, run.lr_text) for run, _ in one_step})
    ax.set_xscale("log")
    ax.set_xticks([x for x, _ in lrs], [text for _, text in lrs])
    ax.minorticks_off()
    if log_y(ax):
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(LogFormatter(labelOnlyBase=False))  # 20, 30, 40 rather than 2×10¹ within a decade
    if not any(pd.notna(fid) for _, fid in one_step):  # an empty axis with ticks around 0 would read as FIDs
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no run was scored: see the status column", transform=ax.transAxes, ha="center")
    ax.set_xlabel("learning rate (as written in params.yaml)")
    ax.set_ylabel("FID (best checkpoint)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1))
    ax.set_title(f"Learning-rate robustness — profile {params.profile}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def cell(value, fmt, missing=""):
    if isinstance(value, str):
        return value
    return missing if pd.isna(value) else fmt.format(value)


def formatted(table, protocol):
    shown = table.copy()
    if protocol["trials"] > 1 and protocol["aggregate"] == "mean":  # SiD's protocol: mean ± std over trials
        shown["FID"] = [None if pd.isna(f) else f"{f:.3f} ± {s:.3f}" for f, s in zip(shown["FID"], shown["FID std"])]
    shown = shown.drop(columns="FID std")
    for col, fmt in [
        ("FID", "{:.3f}"),
        ("FID (last)", "{:.3f}"),
        ("IS", "{:.2f}"),
        ("KID", "{:.4g}"),
        ("precision", "{:.3f}"),
        ("recall", "{:.3f}"),
        ("rel-FID", "{:.3f}"),
        ("images/s", "{:.0f}"),
        ("kimg", "{:g}"),
        ("batch", "{:.0f}"),
    ]:
        missing = "—" if col in SCORE_COLUMNS else ""  # a score not computed, beside a setting that does not apply
        shown[col] = shown[col].map(lambda v, fmt=fmt, missing=missing: cell(v, fmt, missing))
    for col in ("states", "lr"):
        if col in shown:
            shown[col] = shown[col].map(lambda v: cell(v, "{}"))
    # the cells are formatted above: no number parsing, which would print lr 1e-4 as 0.0001
    align = ["left" if col in TEXT_COLUMNS else "right" for col in shown.columns]
    return shown.to_markdown(index=False, disable_numparse=True, colalign=align)


TEXT_COLUMNS = {"method", "states", "checkpoint", "status"}
SCORE_COLUMNS = {"FID", "FID (last)", "IS", "KID", "precision", "recall", "rel-FID"}


def published_section(profile):
    rows = published_rows(profile)
    if not rows:
        return [
            f"No published numbers match the `{profile}` profile (its data set and feature network are "
            f"this pipeline's own), so none are shown beside ours."
        ]
    return [
        "Published numbers for this setting (Inception FID, 50k samples; from the papers' repositories "
        "and abstracts, not produced by this pipeline):",
        "",
        pd.DataFrame(rows).to_markdown(index=False),
    ]


def fid_protocol_text(protocol):
    n, trials = protocol["num_samples"], protocol["trials"]
    if trials == 1:
        return f"{n} samples from seeds {protocol['seeds']}"
    blocks = ", ".join(f"{k * n}–{(k + 1) * n - 1}" for k in range(trials))
    how = "the minimum (EDM)" if protocol["aggregate"] == "min" else "the mean ± standard deviation (SiD)"
    return f"{trials} trials of {n} samples (seeds {blocks}), reported as {how}"


def kid_text(params, teacher):
    e = params.evaluation
    used = teacher.get("kid_subset_size")
    if used is None:
        return "no KID (the published reference statistics carry no features)"
    cut = (
        f", cut from evaluation.kid_subset_size {e.kid_subset_size} to the set sizes"
        if used < e.kid_subset_size
        else ""
    )
    return f"KID over {e.kid_subsets} subsets of {used} images{cut}"


def conditioning_text(teacher_samples):
    classes = teacher_samples["label_dim"]
    if not classes:
        return "Conditioning: unconditional teacher and students."
    return (
        f"Conditioning: class-conditional teacher and students ({classes} classes); every image of the evaluation "
        f"is sampled with a class drawn uniformly from its seed, and the students train on the data set's labels."
    )


def augmentation_text(params, teacher_stage):
    """EDM's augmentation as each model was trained with it (the teacher's metrics, each run's metrics)."""
    teacher = "as its official checkpoint was trained"
    if "augment_p" in teacher_stage:
        teacher = f"p = {teacher_stage['augment_p']:g}" if teacher_stage["augment_p"] else "none"
    by_method = {}  # method -> p -> the lrs (as written) that trained with it
    for run in params.runs():
        p = read_json(distill_metrics(run.name)).get("augment_p", 0.0)
        by_method.setdefault(METHODS[run.method].display, {}).setdefault(p, []).append(
            run.name.removeprefix(run.method + "-")
        )
    what = "EDM's non-leaking geometric pipeline with probability p, its labels conditioning the augment map"
    if teacher == "none" and not any(p for ps in by_method.values() for p in ps):
        return f"Augmentation ({what}): none, for the teacher and every student."
    students = [
        f"{display} {f'p = {p:g}' if p else 'none'}" + (f" (lr {', '.join(lrs)})" if len(ps) > 1 else "")
        for display, ps in by_method.items()
        for p, lrs in ps.items()
    ]
    return f"Augmentation ({what}; for the score methods in the fake score's loss): teacher {teacher}; " + (
        "; ".join(students) + "."
    )


def fewstep_section(params, shift):
    if not params.fewstep.methods:
        return []
    f = params.fewstep
    weights = ":".join(f"{b:g}" for b in f.ddil)
    return [
        "## Few-step students",
        "",
        f"Rows with a `states` entry are K-step students (NFE = K): `backward sim.` (DMD2's own states), `diffused "
        f"data` (CD's and PD's), or `DDIL {weights}` — our adaptation of DDIL to EDM teachers in pixel space "
        f"(no DDIL code or mixing weights are published): training states drawn from the forward-diffused data, the "
        f"teacher's ODE rollout and the student's own rollout in the proportions {weights}"
        + (", x̂ clipped to the data range in rollouts and sampling (reflected)." if f.reflect else "."),
        "",
        "![FID, precision and recall against NFE, with and without DDIL](fewstep.png)",
        "",
        "Covariate shift: at each level σ_k (k ≥ 1) of a student, the Fréchet distance (same features) between the "
        "states its sampler visits and the states it was trained on, both clipped to the data range and drawn fresh "
        f"from the final best checkpoint ({params.evaluation.num_samples} states each; also in covariate_shift.csv).",
        "",
        shift_table(shift),
        "",
        "![Covariate shift against σ_k](covariate_shift.png)",
        "",
    ]


def markdown(table, params, teacher, n_real, protocol, teacher_stage, shift):
    e, d = params.evaluation, params.distill
    against = f"{n_real} real images" if n_real else "the published reference statistics"
    runs = [run.name for run in params.runs()]
    return "\n".join(
        [
            f"# Results — profile `{params.profile}`",
            "",
            formatted(table, protocol),
            "",
            f"FID protocol: {fid_protocol_text(protocol)}, uint8 round trip, "
            f"`{protocol['extractor']}` features through torch-fidelity (weights sha256 "
            f"{protocol['weights_sha256'][:12]}), against {against} (sha256 {protocol['reference_sha256'][:12]})"
            + (
                " — the toy's own feature network: not comparable with Inception FIDs"
                if protocol["extractor"] == "distillery-digits"
                else ""
            )
            + f"; IS over {e.is_splits} splits; {kid_text(params, teacher)}; precision and recall: improved "
            f"precision/recall (k = 3) against the real features. rel-FID: FID against the "
            f"teacher's own samples (same seeds). Images/s measured at batch {e.batch} on {teacher['device']}.",
            "",
            f"- {conditioning_text(teacher)}",
            f"- {augmentation_text(params, teacher_stage)}",
            "",
            f"Students: every run distils at the batch and for the kimg of its row. The EMA generator with the "
            f"lowest monitoring FID ({d.monitor_samples} samples, every {d.monitor_kimg:g} kimg) is the `best` "
            f"checkpoint, on which the main columns are measured; `FID (last)` is the final EMA.",
            "",
            *status_text(params),
            "",
            *fewstep_section(params, shift),
            "## Learning-rate robustness",
            "",
            "![FID of the best checkpoint against the learning rate, per method](lr_robustness.png)",
            "",
            "## FID over training",
            "",
            "![Monitoring FID over training images, per method and learning rate](fid_curves.png)",
            "",
            "## Published",
            "",
            *published_section(params.profile),
            "",
            "## Samples",
            "",
            "First images of the evaluation seeds (best checkpoint):",
            "",
            *[f"- {name}: ![{name}](grids/{name}.png)" for name in ["teacher", *runs]],
            "",
        ]
    )


def run(params, args, run):
    table, protocol, evals = results_table(params)
    teacher = read_json(metrics("teacher_samples"))
    n_real = read_json(metrics("reference_stats"))["num_images"]
    shift = shift_frame(params, evals)
    lr_robustness_figure(params, table, LR_FIGURE)
    run.log_artifact(write_fid_curves(params))
    fewstep_figure(fewstep_frame(params, evals), params.profile, FEWSTEP_FIGURE)
    shift_figure(shift, params.profile, SHIFT_FIGURE)
    write_text(SHIFT_CSV, shift.to_csv(index=False))
    write_text(RESULTS_CSV, table.to_csv(index=False))
    write_text(RESULTS_MD, markdown(table, params, teacher, n_real, protocol, read_json(metrics("teacher")), shift))
    for path in (RESULTS_MD, RESULTS_CSV, LR_FIGURE, FEWSTEP_FIGURE, SHIFT_FIGURE, SHIFT_CSV):
        run.log_artifact(path)
    run.log_table(table, "results_table.json")  # MLflow's table view of the results
    mark_current()  # DVC has recorded every upstream stage: tag the runs it points to, under plain `dvc repro` too
    print(Path(RESULTS_MD).read_text())


if __name__ == "__main__":
    run_stage("report", run, doc=__doc__)
