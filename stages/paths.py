"""Where every artifact of the DAG lives, relative to the repository root (dvc.yaml names the same paths)."""

from pathlib import Path

DATASET = "data/dataset.npz"
TEACHER_DIR = "models/teacher"
FEATURES_DIR = "models/features"
REFERENCE_STATS = "stats/reference.npz"
REFERENCE_FEATURES = "stats/reference_features.npz"
TEACHER_STATS = "stats/teacher.npz"
TEACHER_SAMPLES = "samples/teacher.npz"
GRIDS = Path("reports/grids")
RESULTS_MD = "reports/results.md"
RESULTS_CSV = "reports/results.csv"
LR_FIGURE = "reports/lr_robustness.png"
FID_CURVES_FIGURE = "reports/fid_curves.png"
FEWSTEP_FIGURE = "reports/fewstep.png"
SHIFT_FIGURE = "reports/covariate_shift.png"
SHIFT_CSV = "reports/covariate_shift.csv"
PREFERENCE_REPORT = "reports/preference.md"


def metrics(stage):
    """The metrics file of a stage that has one run: metrics/<stage>.json."""
    return f"metrics/{stage}.json"


def run_dir(run):
    """The distilled generators (best and last EMA) of study run `<method>-<lr>`."""
    return f"runs/{run}"


def fid_curve(run):
    return f"plots/fid/{run}.csv"


def distill_metrics(run):
    return f"metrics/distill/{run}.json"


def eval_metrics(run):
    return f"metrics/eval/{run}.json"


def student_samples(run):
    return f"samples/{run}.npz"
