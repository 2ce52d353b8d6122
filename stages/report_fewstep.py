"""The few-step part of the report: FID, precision and recall against NFE with and without DDIL, and the
covariate-shift table and figure (docs/methods.md §3.11)."""

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.io import atomic_path

from distillery.registry import METHODS

VARIANT_STYLE = {"plain": "-", "ddil": "--"}


def log_y(ax):
    """A log y axis when there is a value to show: the FIDs of runs that were not scored are null, and matplotlib
    cannot log-scale an axis without one. Returns whether the axis is logarithmic."""
    values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [[]])
    if not (np.isfinite(values) & (values > 0)).any():
        return False
    ax.set_yscale("log")
    return True


def fewstep_frame(params, evals):
    """One row per few-step run: method, lr, K, variant and its FID, precision and recall."""
    rows = []
    for run in params.runs():
        if run.steps is not None:
            m = evals[run.name]
            rows.append(
                dict(
                    method=run.method,
                    lr=run.lr_text,
                    K=run.steps,
                    variant=run.variant,
                    FID=m["fid"],
                    precision=m["precision"],
                    recall=m["recall"],
                )
            )
    return pd.DataFrame(rows, columns=["method", "lr", "K", "variant", "FID", "precision", "recall"])


def no_runs_figure(path, what):
    """The figure of a profile without few-step runs says so (DVC expects the file)."""
    fig = Figure(figsize=(6, 1.2))
    text = f"No few-step runs in this profile (fewstep.methods is empty):\nno {what}."  # two lines: fits 6 in
    fig.text(0.5, 0.5, text, ha="center", va="center", multialignment="center")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def fewstep_figure(frame, profile, path):
    """FID, precision and recall against NFE = K: one colour per method (and lr), solid plain, dashed DDIL."""
    if frame.empty:
        return no_runs_figure(path, "FID against NFE")
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    colours = {}
    for (method, lr, variant), group in frame.groupby(["method", "lr", "variant"], sort=False):
        colour = colours.setdefault((method, lr), f"C{len(colours)}")
        group = group.sort_values("K")
        label = f"{METHODS[method].display} lr {lr}, {'DDIL' if variant == 'ddil' else 'plain'}"
        for ax, column in zip(axes, ["FID", "precision", "recall"]):
            ax.plot(group["K"], group[column], VARIANT_STYLE[variant], marker="o", color=colour, label=label)
    for ax, column in zip(axes, ["FID (best checkpoint)", "precision", "recall"]):
        ax.set_xlabel("NFE (student steps K)")
        ax.set_ylabel(column)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(frame["K"].unique()), [str(k) for k in sorted(frame["K"].unique())])
        ax.grid(True, alpha=0.3)
    log_y(axes[0])
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.suptitle(f"Few-step students with and without DDIL — profile {profile}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def shift_frame(params, evals):
    """One row per few-step run and level k ≥ 1: the Fréchet distance between visited and training states."""
    rows = []
    for run in params.runs():
        for level in evals[run.name].get("covariate_shift") or []:
            rows.append(dict(method=run.method, lr=run.lr_text, K=run.steps, variant=run.variant, **level))
    return pd.DataFrame(rows, columns=["method", "lr", "K", "variant", "level", "sigma", "fd"])


def shift_table(frame):
    """Markdown: per method, lr, K and level, the distance of the plain run beside the DDIL run's."""
    if frame.empty:
        return "No few-step run has more than one step, so there is no intermediate state to compare."
    wide = frame.pivot_table(index=["method", "lr", "K", "level", "sigma"], columns="variant", values="fd")
    wide = wide.reset_index()
    wide["method"] = wide["method"].map(lambda m: METHODS[m].display)
    wide["sigma"] = wide["sigma"].map(lambda s: f"{s:.3g}")
    wide = wide.rename(columns={"level": "k", "sigma": "σ_k", "plain": "FD plain", "ddil": "FD DDIL"})
    distances = [column for column in ("FD plain", "FD DDIL") if column in wide]
    for column in distances:
        wide[column] = wide[column].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    return wide[["method", "lr", "K", "k", "σ_k", *distances]].to_markdown(index=False)


def shift_figure(frame, profile, path):
    """The distance against σ_k, one panel per method: a line per run (K), solid plain, dashed DDIL."""
    if frame.empty:
        return no_runs_figure(path, "intermediate states to compare")
    methods = list(dict.fromkeys(frame["method"]))
    fig = Figure(figsize=(4.6 * len(methods) + 1.6, 3.6))
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
        part = frame[frame["method"] == method]
        colours = {}
        for (lr, k, variant), group in part.groupby(["lr", "K", "variant"], sort=False):
            colour = colours.setdefault((lr, k), f"C{len(colours)}")
            label = f"K = {k}, lr {lr}, {'DDIL' if variant == 'ddil' else 'plain'}"
            ax.plot(group["sigma"], group["fd"], VARIANT_STYLE[variant], marker="o", color=colour, label=label)
        ax.set_title(METHODS[method].display)
        ax.set_xscale("log")
        ax.set_xlabel("σ_k of the student's level")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("FD(visited states, training states)")
    fig.suptitle(f"Covariate shift of the few-step students — profile {profile}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
