"""The monitoring FID over training of every run, read from the DVC-tracked `plots/fid/<run>.csv`: one panel per
method (the one-step study's and the few-step study's), one line per learning rate (per K and variant for the
few-step students). An image that `dvc plots show` embeds as it is: the page needs no script."""

import math

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from pipeline.io import atomic_path

from distillery.registry import METHODS

from stages.paths import FID_CURVES_FIGURE, fid_curve
from stages.report_fewstep import VARIANT_STYLE

COLUMNS = 4  # panels per row


def read_curves(params, path=fid_curve):
    """(run, curve) for every run of the study, in params order; the curve's `lr` is the text of params.yaml.

    Files left by runs removed from params.yaml are ignored, as in the results table."""
    curves = []
    for run in params.runs():
        curve = pd.read_csv(path(run.name), dtype={"lr": str, "method": str})
        curves.append((run, curve.sort_values("kimg", kind="stable")))
    return curves


def panel_title(method, fewstep):
    return f"{METHODS[method].display} — K-step students" if fewstep else f"{METHODS[method].display} — one step"


def line_label(run, curve):
    lrs = list(dict.fromkeys(curve["lr"].dropna()))
    lr = lrs[0] if len(lrs) == 1 else run.lr_text  # a curve without points still names its run's lr
    if run.steps is None:
        return f"lr {lr}"
    return f"lr {lr}, K = {run.steps}, {'DDIL' if run.variant == 'ddil' else 'plain'}"


def fid_curves_figure(curves, profile, monitor_samples):
    """The Figure (no pyplot, no global state): panels in the order the runs come, one-step methods first."""
    panels = {}  # (method, few-step?) -> [(run, curve)]
    for run, curve in curves:
        panels.setdefault((run.method, run.steps is not None), []).append((run, curve))
    cols = min(len(panels), COLUMNS)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(max(4.4 * cols, 6.4), 3.6 * rows))  # one panel: room for the title still
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, ((method, fewstep), lines) in zip(axes, panels.items()):
        colours = {}
        for run, curve in lines:
            # one colour per lr (and K); a few-step run's variant is its line style, as in fewstep.png
            colour = colours.setdefault((run.lr_text, run.steps), f"C{len(colours)}")
            style = VARIANT_STYLE[run.variant] if fewstep else "-"
            ax.plot(curve["kimg"], curve["fid"], style, marker=".", color=colour, label=line_label(run, curve))
        ax.set_title(panel_title(method, fewstep))
        ax.set_xlabel("training images (kimg)")
        ax.set_ylabel(f"FID ({monitor_samples} samples, log)")
        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(LogFormatter(labelOnlyBase=False))  # 20, 30, 60 rather than 2×10¹ within a decade
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7 if fewstep else 8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"Monitoring FID (EMA generator) over training — profile {profile}")
    fig.tight_layout()
    return fig


def write_fid_curves(params, path=FID_CURVES_FIGURE):
    """Write the figure of the current study's runs to `path` (PNG, atomically; the same bytes for the same data);
    returns `path`."""
    fig = fid_curves_figure(read_curves(params), params.profile, params.distill.monitor_samples)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
