"""The report marks blown-up and unmoved runs instead of dropping them, and keeps published numbers apart and
sourced."""

from pipeline.published import PUBLISHED, published_rows

from stages.report import status

TRAIN = {
    "diverged": False,
    "diverged_kimg": None,
    "diverged_loss": None,
    "monitor_blown_up": False,
    "unmoved": False,
    "nonfinite_steps": 0,
    "final_monitor_fid": 10.0,
    "best_monitor_fid": 8.0,
    "best_kimg": 0.128,
    "kimg": 0.512,
    "monitor_fids": [[0.128, 8.0], [0.256, 9.0], [0.384, 12.0], [0.512, 10.0]],
}


def of(evaluation=None, **train):
    return status({**TRAIN, **train}, {"blown_up_images": 0, **(evaluation or {})}, factor=3.0)


def test_a_healthy_run_is_ok():
    assert of() == "ok"


def test_a_run_stopped_by_non_finite_steps_shows_where_and_which_loss():
    assert of(diverged=True, diverged_kimg=0.088, diverged_loss="loss_aux") == "diverged at 0.088 kimg (loss_aux)"


def test_non_finite_samples_mark_a_run_diverged_where_they_appeared():
    nan_at_256 = [[0.128, 8.0], [0.256, None], [0.384, None], [0.512, None]]
    assert of(monitor_blown_up=True, monitor_fids=nan_at_256) == "diverged at 0.256 kimg (blown-up images)"
    assert of({"blown_up_images": 3}) == "diverged at 0.128 kimg (blown-up images)"  # the best checkpoint
    assert of({"blown_up_images_last": 200}) == "diverged at 0.512 kimg (blown-up images)"  # the last one


def test_a_generator_that_never_moved_is_unmoved():
    assert of(unmoved=True) == "unmoved"


def test_a_run_with_tolerated_non_finite_steps_is_not_ok():
    assert of(nonfinite_steps=5) == "unstable (5 non-finite steps)"


def test_a_run_away_final_fid_marks_a_run_diverged_from_where_it_stayed_away():
    away = [[0.128, 8.0], [0.256, 30.0], [0.384, 12.0], [0.512, 26.0], [0.64, 25.0]]
    assert of(final_monitor_fid=25.0, monitor_fids=away) == "diverged at 0.512 kimg (FID > 3× best)"
    assert of(final_monitor_fid=23.0, monitor_fids=[*away[:-1], [0.64, 23.0]]) == "ok"


def test_published_rows_carry_sources_and_leave_out_unverified_numbers():
    assert published_rows("toy") == []
    rows = published_rows("cifar10-uncond")
    assert {"SiD (α = 1.2)", "SIM", "GDD-I"} <= {r["method"] for r in rows}
    assert all(r["source"] for profile in PUBLISHED for r in published_rows(profile))
    # docs/methods.md §4 marks Diff-Instruct 4.53 and GDD 1.66 on CIFAR-10 "unconfirmed": they must not appear
    assert not [r for r in rows if r["FID"] in (4.53, 1.66)]


def test_fids_of_different_protocols_are_refused_in_one_column():
    from stages.report import common_protocol
    from stages.skeleton import StageFailed

    p = {
        "extractor": "inception-v3-compat",
        "weights_sha256": "a",
        "num_samples": 50000,
        "seeds": "0-49999",
        "reference_sha256": "b",
    }
    assert common_protocol({"teacher": {"protocol": p}, "sid-1e-5": {"protocol": dict(p)}}) == p
    try:
        common_protocol({"teacher": {"protocol": p}, "sid-1e-5": {"protocol": {**p, "num_samples": 10000}}})
    except StageFailed as e:
        assert "different protocols" in str(e) and "sid-1e-5" in str(e)
    else:
        raise AssertionError("mixed protocols were accepted")


def test_augmentation_is_stated_per_method_and_lr_and_kid_as_used(tmp_path, monkeypatch):
    import json

    from pipeline.params import parse_params

    from stages.report import augmentation_text, kid_text

    params = parse_params({"study": {"methods": ["sid", "gdd"], "lrs": ["1e-4", "3e-5"]}})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics" / "distill").mkdir(parents=True)
    for name, p in {"sid-1e-4": 0.12, "sid-3e-5": 0.0, "gdd-1e-4": 0.0, "gdd-3e-5": 0.0}.items():
        (tmp_path / "metrics" / "distill" / f"{name}.json").write_text(json.dumps({"augment_p": p}))
    text = augmentation_text(params, {"augment_p": 0.12})
    assert text.endswith("teacher p = 0.12; SiD p = 0.12 (lr 1e-4); SiD none (lr 3e-5); GDD none.")
    assert augmentation_text(params, {}).split(": ")[1].startswith("teacher as its official checkpoint was trained")
    (tmp_path / "metrics" / "distill" / "sid-1e-4.json").write_text(json.dumps({"augment_p": 0.0}))
    assert augmentation_text(params, {"augment_p": 0.0}).endswith("none, for the teacher and every student.")

    assert kid_text(params, {"kid_subset_size": 500}) == "KID over 50 subsets of 500 images"
    assert kid_text(params, {"kid_subset_size": 40}).endswith(
        "cut from evaluation.kid_subset_size 500 to the set sizes"
    )
    assert kid_text(params, {}).startswith("no KID")


def test_lr_robustness_plots_each_method_at_its_own_learning_rates(tmp_path, monkeypatch):
    import pandas as pd
    from matplotlib.figure import Figure

    from pipeline.params import parse_params

    from stages.report import lr_robustness_figure

    params = parse_params(
        {"study": {"methods": ["sid", "sim"], "lrs": ["1e-4", "3e-5"], "per_method": {"sim": {"lrs": ["1e-5"]}}}}
    )
    runs = params.runs()
    assert [run.name for run in runs] == ["sid-1e-4", "sid-3e-5", "sim-1e-5"]
    table = pd.DataFrame({"FID": [2.0, 5.0, 7.0, 9.0]})  # the teacher's row, then one row per run
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: drawn.append(fig) or open(path, "wb").close())
    lr_robustness_figure(params, table, tmp_path / "lr.png")
    (ax,) = drawn[0].axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"SiD": ([3e-5, 1e-4], [7.0, 5.0]), "SIM": ([1e-5], [9.0])}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1e-5", "3e-5", "1e-4"]  # as written in params.yaml
