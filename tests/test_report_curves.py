"""reports/fid_curves.png: the monitoring FID of every run of the study from its plots/fid CSV, one panel per method,
one line per lr as written in params.yaml (per K and variant for few-step runs); the same bytes for the same data."""

import csv

import pytest

from pipeline.params import parse_params

from stages.report_curves import fid_curves_figure, read_curves, write_fid_curves

STUDY = {
    "profile": "unit",
    "study": {"methods": ["sid", "gdd"], "lrs": ["3e-4", "0.00003"]},  # "0.00003": not 3e-05, as written
    "fewstep": {"methods": ["cd"], "lrs": ["2e-4"], "steps": [1, 2], "variants": ["plain", "ddil"]},
    "distill": {"monitor_samples": 250},
}


def write_curve(root, name, method, lr, points):
    """A plots/fid/<name>.csv as stages/distill.py writes it."""
    path = root / "plots" / "fid" / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kimg", "fid", "method", "lr"])
        writer.writerows([(f"{k:g}", f"{v:.6g}", method, lr) for k, v in points])


def points(seed):
    return [(2.0 * (i + 1), 400.0 / (i + 1) + seed) for i in range(4)]


@pytest.fixture
def study(tmp_path, monkeypatch):
    params = parse_params(STUDY)
    for i, run in enumerate(params.runs()):
        write_curve(tmp_path, run.name, run.method, run.lr_text, points(i))
    write_curve(tmp_path, "sid-1e-4", "sid", "1e-4", points(99))  # left by a run no longer in params.yaml
    monkeypatch.chdir(tmp_path)
    return params


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_one_panel_per_method_one_line_per_run_labelled_as_written(study):
    fig = fid_curves_figure(read_curves(study), study.profile, study.distill.monitor_samples)
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["SiD — one step", "GDD — one step", "CD — K-step students"]
    assert fig.get_suptitle() == "Monitoring FID (EMA generator) over training — profile unit"
    for ax in axes:
        assert ax.get_xlabel() == "training images (kimg)"
        assert ax.get_ylabel() == "FID (250 samples, log)"
        assert ax.get_yscale() == "log"
    sid, gdd, cd = axes
    assert legend(sid) == legend(gdd) == ["lr 3e-4", "lr 0.00003"]
    assert legend(cd) == [
        "lr 2e-4, K = 1, plain",
        "lr 2e-4, K = 1, DDIL",
        "lr 2e-4, K = 2, plain",
        "lr 2e-4, K = 2, DDIL",
    ]
    # each line is its run's CSV; the stale sid-1e-4 file is not drawn
    for i, line in enumerate(line for ax in axes for line in ax.get_lines()):
        assert list(line.get_xdata()) == [k for k, _ in points(i)]
        assert list(line.get_ydata()) == pytest.approx([v for _, v in points(i)], rel=1e-5)
    assert sum(len(ax.get_lines()) for ax in axes) == len(study.runs()) == 8
    # few-step runs: one colour per K, solid plain, dashed DDIL
    k1_plain, k1_ddil, k2_plain, k2_ddil = cd.get_lines()
    assert [line.get_linestyle() for line in cd.get_lines()] == ["-", "--", "-", "--"]
    assert k1_plain.get_color() == k1_ddil.get_color() != k2_plain.get_color() == k2_ddil.get_color()
    assert sid.get_lines()[0].get_color() != sid.get_lines()[1].get_color()


def test_the_png_is_the_same_bytes_every_time_and_written_atomically(study, tmp_path):
    first = write_fid_curves(study, tmp_path / "out" / "a.png")
    second = write_fid_curves(study, tmp_path / "out" / "b.png")
    data = first.read_bytes()
    assert data.startswith(b"\x89PNG") and data == second.read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]  # no temporary left
    chunks, i = [], 8
    while i < len(data):
        size = int.from_bytes(data[i : i + 4], "big")
        chunks.append((data[i + 4 : i + 8], data[i + 8 : i + 8 + size]))
        i += 12 + size
    assert b"tIME" not in {kind for kind, _ in chunks}
    texts = [body for kind, body in chunks if kind in (b"tEXt", b"iTXt", b"zTXt")]
    assert not [t for t in texts if t.split(b"\0")[0].lower() in (b"creation time", b"date", b"modification time")]
