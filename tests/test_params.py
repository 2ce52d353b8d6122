"""params.yaml is refused before any compute when a key, type or value is wrong, naming the key."""

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.dvc_keys import dvc_params_keys, missing_keys
from pipeline.params import ParamsError, load_params, parse_params

from conftest import dump_params

ROOT = Path(__file__).resolve().parents[1]


def toy():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_are_valid_and_list_the_study():
    params = load_params(ROOT / "params.yaml")
    assert params.profile == "toy"
    assert params.study.methods == ["sid", "sim", "diff_instruct", "gdd", "gdd_i"]
    assert [tuple(run[:3]) for run in params.runs()[:2]] == [("sid", 3e-4, "sid-3e-4"), ("sid", 3e-5, "sid-3e-5")]
    study, fewstep = params.runs()[:10], params.runs()[10:]
    assert tuple(study[-1][:3]) == ("gdd_i", 3e-5, "gdd_i-3e-5") and all(run.steps is None for run in study)
    # the few-step study: method × its own lr (fewstep.per_method) × K × variant, named as DVC names its stages
    assert [run.name for run in fewstep[:3]] == ["dmd2-3e-4-1-plain", "dmd2-3e-4-1-ddil", "dmd2-3e-4-2-plain"]
    assert len(fewstep) == 12 and {(run.method, run.lr_text, run.steps, run.variant) for run in fewstep} == {
        (m, lr, k, v) for m, lr in (("dmd2", "3e-4"), ("cd", "1e-4")) for k in (1, 2, 4) for v in ("plain", "ddil")
    }


def test_a_fewstep_run_takes_its_k_and_variant_over_its_methods_section():
    params = load_params(ROOT / "params.yaml")
    runs = {run.name: run for run in params.runs()}
    plain, ddil = params.settings(runs["cd-1e-4-4-plain"]), params.settings(runs["cd-1e-4-4-ddil"])
    assert (plain["steps"], plain["ddil"], plain["reflect"]) == (4, None, False)
    assert (ddil["steps"], ddil["ddil"], ddil["reflect"]) == (4, (1.0, 1.0, 1.0), True)
    assert params.method(runs["dmd2-3e-4-2-ddil"]).nfe == 2


def test_a_fewstep_run_its_method_cannot_take_is_refused_before_any_compute():
    raw = toy()
    raw["fewstep"].update(methods=["pd"], steps=[3], per_method={})
    raw["pd"] = {"teacher_steps": 16}
    with pytest.raises(
        ParamsError,
        match="fewstep.steps: run pd-2e-4-3-plain is refused by the pd section: teacher_steps / steps must be a power",
    ):
        parse_params(raw)
    raw["fewstep"].update(methods=["sid"], steps=[1])
    with pytest.raises(ParamsError, match="fewstep.methods"):
        parse_params(raw)


@pytest.mark.parametrize(
    "edit,key,words",
    [
        (lambda p: p["distill"].update(bacth=64), "distill.bacth", "Extra inputs are not permitted"),
        (lambda p: p["teacher"].update(batch="big"), "teacher.batch", "valid integer"),
        (lambda p: p["distill"].update(batch=-4), "distill.batch", "greater than 0"),
        (lambda p: p["teacher"]["network"].update(dropout=1.5), "teacher.network.dropout", "less than 1"),
        (lambda p: p["study"].update(methods=["sid", "nope"]), "study.methods.1", "sid"),
        (lambda p: p["study"].update(lrs=["1e-4", "0.0001"]), "study.lrs", "unique"),
        (lambda p: p["study"].update(lrs=["fast"]), "study.lrs.0", "expected a number"),
        (lambda p: p["study"].update(lrs=["1e-4", "0e-4"]), "study.lrs.1", "must be > 0"),
        (lambda p: p["study"].update(lrs=["1e-4 "]), "study.lrs.0", "expected a number written as a decimal string"),
        # a method's own learning rates: a method of its study, at least one rate, each once
        (
            lambda p: p["study"].update(per_method={"dmd2": {"lrs": ["1e-5"]}}),
            "study.per_method",
            "dmd2 is not in methods (sid, sim, diff_instruct, gdd, gdd_i): per_method gives a method of the study",
        ),
        (lambda p: p["study"].update(per_method={"sim": {"lrs": []}}), "study.per_method.sim.lrs", "at least 1 item"),
        (lambda p: p["study"].update(per_method={"sim": {"lr": ["1e-5"]}}), "study.per_method.sim.lr", "Extra inputs"),
        (
            lambda p: p["study"].update(per_method={"sim": {"lrs": ["1e-5", "0.00001"]}}),
            "study.per_method.sim.lrs",
            "unique",
        ),
        (
            lambda p: p["fewstep"].update(per_method={"pd": {"lrs": ["1e-5"]}}),
            "fewstep.per_method",
            "pd is not in methods",
        ),
        (
            lambda p: p["fewstep"].update(per_method={"sid": {"lrs": ["1e-5"]}}),
            "fewstep.per_method.sid",
            "'dmd2', 'cd'",
        ),
        (lambda p: p["sid"].update(t_max=2000), "sid.t_max", "less than or equal to 1000"),
        (lambda p: p["distill"]["per_method"].update(sid={"bacth": 8}), "distill.per_method.sid.bacth", "Extra inputs"),
        (lambda p: p["distill"]["per_method"].update(dmd={"batch": 8}), "distill.per_method.dmd", "sid"),
        (
            lambda p: p["distill"]["per_method"].update(sid={"batch": 100, "shards": 3}),
            "distill.per_method.sid.batch",
            "100 is not divisible by distill.per_method.sid.shards 3 (sid's runs)",
        ),
        (lambda p: p.update(data={"source": "edm-zip", "path": "d.zip"}), "data.resolution", "is required when"),
        (
            lambda p: p["sid"].update(augment_p=0.12),
            "sid.augment_p",
            "> 0 needs a teacher with EDM's augment",
        ),
        (lambda p: p["evaluation"].update(fid_aggregate="median"), "evaluation.fid_aggregate", "'min' or 'mean'"),
        # a feature net that measures nothing on the data, or weights that are not there or not pinned
        (
            lambda p: (p.update(data={"source": "cifar10"}), p["teacher"]["network"].update(attn_resolutions=[16])),
            "evaluation.feature_extractor",
            "distillery-digits is a classifier of scikit-learn's digits and measures "
            "nothing on cifar10 images; choose inception-v3-compat (choices: distillery-digits, inception-v3-compat)",
        ),
        (
            lambda p: p["evaluation"].update(feature_extractor="inception-v3-compat"),
            "evaluation.feature_extractor",
            "inception-v3-compat needs RGB images, and sklearn-digits has 1 channel",
        ),
        (
            lambda p: (
                p.update(data={"source": "cifar10"}),
                p["teacher"]["network"].update(attn_resolutions=[16]),
                p["evaluation"].update(
                    feature_extractor="inception-v3-compat", feature_weights={"path": "no/such.pth", "sha256": "0" * 64}
                ),
            ),
            "evaluation.feature_weights",
            "path 'no/such.pth': no such file",
        ),
        (
            lambda p: p["evaluation"].update(feature_weights={"url": "https://example.org/inception.pth"}),
            "evaluation.feature_weights.sha256",
            "Field required",
        ),
        (
            lambda p: p["evaluation"].update(feature_weights={"path": "params.yaml", "sha256": "0" * 64}),
            "evaluation.feature_weights",
            "is for inception-v3-compat",
        ),
        (
            lambda p: p["evaluation"].update(reference="edm-npz", reference_download={"url": "https://e.org/r.npz"}),
            "evaluation.reference",
            "edm-npz holds Inception statistics",
        ),
        # a network the images cannot go through, or attention at no level of it
        (
            lambda p: p["teacher"]["network"].update(channel_mult=[1, 2, 2, 2, 2]),
            "teacher.network.channel_mult",
            "has 5 levels: the resolution 8 (data.source sklearn-digits) must be divisible by 2^4 (use at most 4",
        ),
        (
            lambda p: p["teacher"]["network"].update(attn_resolutions=[16]),
            "teacher.network.attn_resolutions",
            "[16] match no level of this 8×8 network (levels [8, 4] of teacher.network.channel_mult [1, 2] on the "
            "images of data.source sklearn-digits)",
        ),
        # a teacher trained here: augmentation and augment map go together
        (
            lambda p: p["teacher"]["network"].update(augment_dim=9),
            "teacher.network.augment_dim",
            "9 with teacher.augment_p 0: the augment map would never train",
        ),
        (lambda p: p["teacher"].update(augment_p=0.12), "teacher.augment_p", "needs teacher.network.augment_dim 9"),
        (lambda p: p["teacher"]["network"].update(augment_dim=4), "teacher.network.augment_dim", "must be 0 or 9"),
    ],
)
def test_bad_value_is_refused_naming_the_key(edit, key, words):
    raw = toy()
    edit(raw)
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    message = str(e.value)
    assert f"  {key}: " in message and words in message


def test_each_method_takes_its_own_lrs_from_per_method():
    raw = toy()
    raw["study"].update(methods=["sid", "sim"], lrs=["1e-4"], per_method={"sim": {"lrs": ["1e-5", "3e-6"]}})
    raw["fewstep"].update(steps=[2], variants=["plain"], per_method={"cd": {"lrs": ["1e-4"]}})
    params = parse_params(raw)
    assert [(run.method, run.lr, run.name) for run in params.runs()] == [
        ("sid", 1e-4, "sid-1e-4"),
        ("sim", 1e-5, "sim-1e-5"),
        ("sim", 3e-6, "sim-3e-6"),
        ("dmd2", 2e-4, "dmd2-2e-4-2-plain"),  # the few-step study's lrs
        ("cd", 1e-4, "cd-1e-4-2-plain"),
    ]


UNQUOTED = [
    (
        lambda p: p["study"].update(lrs=[1e-4, "3e-5"]),
        'study.lrs: write learning rates quoted, as written: ["0.0001", "3e-5"] (an unquoted 0.0001 is read as the '
        "number 0.0001 and would name the runs sid-0.0001)",
    ),
    (
        lambda p: p["study"].update(per_method={"sim": {"lrs": ["1e-4", 3e-6]}}),
        'study.per_method.sim.lrs: write learning rates quoted, as written: ["1e-4", "3e-6"] (an unquoted 3e-6 is read '
        "as the number 3e-06 and would name the runs sim-3e-06)",
    ),
    (
        lambda p: p["fewstep"].update(lrs=[2e-4]),
        'fewstep.lrs: write learning rates quoted, as written: ["0.0002"] (an unquoted 0.0002 is read as the number '
        "0.0002 and would name the runs dmd2-0.0002-1-plain)",
    ),
    (
        lambda p: p["fewstep"].update(per_method={"cd": {"lrs": [1]}}),
        'fewstep.per_method.cd.lrs: write learning rates quoted, as written: ["1"] (an unquoted 1 is read as the '
        "number 1 and would name the runs cd-1-1-plain)",
    ),
]


@pytest.mark.parametrize("edit,line", UNQUOTED)
def test_an_unquoted_learning_rate_is_refused_showing_it_quoted(edit, line):
    raw = toy()
    edit(raw)
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert str(e.value) == f"params.yaml: invalid parameters\n  {line}"


def test_validate_and_stages_refuse_an_unquoted_learning_rate_quoting_it_as_written(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    for old, new in [
        ('lrs: ["3e-4", "3e-5"]', 'lrs: [3e-4, "3e-5"]'),
        ('dmd2: {lrs: ["3e-4"]}', "dmd2: {lrs: [3.0e-4]}"),
    ]:
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "params.yaml").write_text(text)
    expected = [
        'study.lrs: write learning rates quoted, as written: ["3e-4", "3e-5"] (an unquoted 3e-4 is read as the number '
        "0.0003 and would name the runs sid-0.0003)",
        'fewstep.per_method.dmd2.lrs: write learning rates quoted, as written: ["3.0e-4"] (an unquoted 3.0e-4 is read '
        "as the number 0.0003 and would name the runs dmd2-0.0003-1-plain)",
    ]
    for args in (["-m", "pipeline.cli", "validate"], ["-m", "stages.data"]):
        result = run(args, tmp_path)
        assert result.returncode == 2 and all(f"  {line}" in result.stderr.splitlines() for line in expected), (
            result.stderr
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # refused before anything was written


def run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)


def test_cli_and_stage_exit_nonzero_before_any_compute(tmp_path):
    raw = toy()
    raw["teacher"]["duration_kimg"] = 0
    dump_params(tmp_path / "params.yaml", raw)
    result = run(["-m", "pipeline.cli", "validate"], tmp_path)
    assert result.returncode == 2 and "teacher.duration_kimg" in result.stderr
    # a stage validates first: it exits without writing anything
    result = run(["-m", "stages.data"], tmp_path)
    assert result.returncode == 2 and "teacher.duration_kimg" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_unreadable_yaml_is_a_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text("teacher: [unclosed\n")
    with pytest.raises(ParamsError, match="cannot read parameters"):
        load_params(tmp_path / "params.yaml")


def test_per_method_settings_override_only_their_own_keys_and_method():
    raw = toy()
    raw["distill"]["per_method"] = {
        "sid": {"batch": 8192, "ema_halflife_kimg": 2000, "generator_adam_betas": [0.9, 0.999]}
    }
    d = parse_params(raw).distill
    sid, sim = d.for_method("sid"), d.for_method("sim")
    assert (sid.batch, sid.ema_halflife_kimg, sid.generator_adam_betas) == (8192, 2000, (0.9, 0.999))
    assert (sid.duration_kimg, sid.adam_betas, sid.monitor_kimg) == (d.duration_kimg, d.adam_betas, d.monitor_kimg)
    assert (sim.batch, sim.ema_halflife_kimg, sim.generator_adam_betas) == (d.batch, d.ema_halflife_kimg, None)
    # the toy's GDD runs use GDD's Adam betas (docs/methods.md §3.3), the score methods the common ones
    toy_d = load_params(ROOT / "params.yaml").distill
    assert toy_d.for_method("gdd").adam_betas == (0.0, 0.99) and toy_d.for_method("sid").adam_betas == (0.0, 0.999)


@pytest.mark.parametrize("path", sorted([*(ROOT / "profiles").glob("*.yaml"), ROOT / "params.yaml"]), ids=str)
def test_every_profile_holds_every_params_key_dvc_reads(path):
    raw = yaml.safe_load(path.read_text())
    keys = dvc_params_keys((ROOT / "dvc.yaml").read_text(), raw)
    assert {"seed", "distill", "evaluation.batch", "fewstep.ddil"} <= keys
    assert {*raw["study"]["methods"], *raw["fewstep"]["methods"]} <= keys  # ${item.method} of each study's runs
    assert missing_keys((ROOT / "dvc.yaml").read_text(), yaml.safe_load(path.read_text())) == []


def validate(params_path):
    """`distillery validate --params <params_path>` in-process: (exit status, stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["validate", "--params", str(params_path)])
    return status, err.getvalue().splitlines()


def write_micro(folder, edit=lambda p: None):
    """profiles/micro.yaml, edited, as `folder`/params.yaml."""
    raw = yaml.safe_load((ROOT / "profiles" / "micro.yaml").read_text())
    edit(raw)
    dump_params(folder / "params.yaml", raw)
    return folder / "params.yaml"


@pytest.mark.parametrize("section", ["teacher", "distill", "evaluation", "seed", "preference", "sid"])
def test_a_missing_section_is_refused_naming_it(tmp_path, monkeypatch, section):
    monkeypatch.chdir(tmp_path)
    write_micro(tmp_path, lambda p: p.pop(section))
    why = "study.methods names sid, so its settings" if section == "sid" else "write it out (every stage reads"
    status, lines = validate("params.yaml")
    assert status == 2 and len(lines) == 2 and lines[1].startswith(f"  {section}: missing section: {why}")


def test_a_stage_refuses_a_deleted_section_before_any_compute(tmp_path):
    write_micro(tmp_path, lambda p: p.pop("teacher"))  # the schema's default teacher trains 100 kimg
    result = run(["-m", "stages.teacher"], tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "params.yaml: invalid parameters",
        "  teacher: missing section: write it out (every stage reads its params from the file, none from a default)",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # refused before anything was written


def test_validate_refuses_each_key_dvc_reads_that_the_file_lacks_one_line_each(tmp_path, monkeypatch):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    write_micro(tmp_path, lambda p: (p["fewstep"].pop("reflect"), p["evaluation"].pop("feature_weights")))
    assert validate("params.yaml") == (
        2,
        [
            "params.yaml: invalid parameters",
            *(
                f"  {key}: missing: dvc.yaml's stages read it (write it out, even with its default value)"
                for key in ("evaluation.feature_weights", "fewstep.reflect")
            ),
        ],
    )


def edm_zip(raw, path):
    """The micro profile on an RGB data set zip at `path`, measured with Inception features."""
    raw["data"].update(source="edm-zip", path=path, resolution=8)
    raw["evaluation"]["feature_extractor"] = "inception-v3-compat"


def set_key(raw, key, value):
    *path, last = key.split(".")
    node = raw
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = value


@pytest.mark.parametrize(
    "key,value,line",
    [
        # no inf or nan anywhere, also in a method's section or written as text
        ("distill.duration_kimg", float("inf"), "Input should be a finite number (got inf)"),
        ("distill.duration_kimg", float("nan"), "Input should be a finite number (got nan)"),
        ("distill.duration_kimg", "inf", "Input should be a finite number (got 'inf')"),
        ("sid.alpha", float("-inf"), "Input should be a finite number (got -inf)"),
        ("preference.confidence", float("nan"), "Input should be a finite number (got nan)"),
        ("study.lrs.0", "1e999", "must be ≤ 10000 (got '1e999')"),
        # and bounded by what a profile could ever need, the bound named
        ("distill.duration_kimg", 1e12, "Input should be less than or equal to 10000000 (got 1000000000000.0)"),
        ("distill.batch", 10**9, "Input should be less than or equal to 65536 (got 1000000000)"),
        ("teacher.network.model_channels", 10**6, "Input should be less than or equal to 1024 (got 1000000)"),
        ("evaluation.num_samples", 10**8, "Input should be less than or equal to 1000000 (got 100000000)"),
        ("study.lrs.0", "1e5", "must be ≤ 10000 (got '1e5')"),
        ("seed", 2**40, "Input should be less than or equal to 2147483647 (got 1099511627776)"),
    ],
)
def test_every_number_is_finite_and_bounded(tmp_path, monkeypatch, key, value, line):
    monkeypatch.chdir(tmp_path)
    write_micro(tmp_path, lambda p: set_key(p, key, value))
    assert validate("params.yaml") == (2, ["params.yaml: invalid parameters", f"  {key}: {line}"])


def test_learning_rates_up_to_the_fault_tests_divergent_ones_are_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_micro(
        tmp_path, lambda p: (p["study"].update(lrs=["10", "1e3"]), p["preference"]["pairs"][0].update(b="sid-10"))
    )
    assert validate("params.yaml")[0] == 0


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("data.path", "{outside}/digits.zip", "input path must be inside the repository or under a data_roots entry"),
        ("data.path", "../digits.zip", "input path must be inside the repository or under a data_roots entry"),
        ("data.path", "link/digits.zip", "input path must be inside the repository or under a data_roots entry"),
        (
            "preference.samples_dir",
            "../samples",
            "input path must be inside the repository or under a data_roots entry",
        ),
        ("preference.output_dir", "{outside}", "output path must be inside the repository"),
        ("preference.output_dir", "../preference", "output path must be inside the repository"),
        ("preference.output_dir", "{root}/../x", "output path must be inside the repository"),
        ("preference.output_dir", "{data_root}/preference", "output path must be inside the repository"),
        ("preference.votes_dir", "votes/../../votes", "output path must be inside the repository"),
        ("preference.votes_dir", "link", "output path must be inside the repository"),
    ],
)
def test_a_path_outside_the_repository_is_refused_naming_the_key(tmp_path, monkeypatch, key, value, allowed):
    root, outside = tmp_path / "repo", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "link").symlink_to(outside)  # resolved before the check
    monkeypatch.chdir(root)
    value = value.format(outside=outside, root=root, data_root=outside)

    def edit(p):
        p["data_roots"] = [str(outside / "data")]
        if key == "data.path":
            edm_zip(p, value)
        set_key(p, key, value)

    write_micro(root, edit)
    status, lines = validate("params.yaml")
    assert status == 2 and len(lines) == 2 and lines[1].startswith(f"  {key}: {value!r} is ")
    assert lines[1].endswith(allowed) and f", outside {root}:" in lines[1]


def test_inputs_may_lie_under_a_data_root_and_inside_the_repository(tmp_path, monkeypatch):
    root, shared = tmp_path / "repo", tmp_path / "shared"
    (root / "samples").mkdir(parents=True), shared.mkdir()
    (root / "inside").symlink_to(root / "samples")
    monkeypatch.chdir(root)

    def edit(p):
        p["data_roots"] = [str(shared)]
        edm_zip(p, str(shared / "sub" / ".." / "digits.zip"))
        p["preference"].update(samples_dir=str(shared / "samples"), output_dir="inside/./studies", votes_dir=".")

    write_micro(root, edit)
    assert validate("params.yaml") == (0, [])
    params = load_params("params.yaml")
    assert params.data_roots == [str(shared)] and params.preference.output_dir == "inside/./studies"
    # a data root is an absolute folder: a relative one would be inside the repository already
    write_micro(root, lambda p: p.update(data_roots=["shared"]))
    status, lines = validate("params.yaml")
    assert status == 2 and lines[1].startswith("  data_roots.0: must be an absolute path")


@pytest.mark.parametrize(
    "edit,line",
    [
        (
            lambda p: p["preference"]["pairs"][0].update(b="sid-9e-9"),
            "  preference.pairs.0.b: 'sid-9e-9' names no sample set the DAG makes: the teacher's or a run's of "
            "study.methods × study.lrs or fewstep.methods × fewstep.lrs × fewstep.steps × fewstep.variants (each "
            "method's own lrs from per_method): teacher, sid-1e-4, sid-3e-5; nor is samples/sid-9e-9.npz there",
        ),
        (
            lambda p: p["evaluation"].update(num_samples=7),
            "  preference.items: 6 + preference.attention_checks 2 need as many seeds, but each sample set holds "
            "evaluation.num_samples 7",
        ),
        (
            lambda p: p["evaluation"].update(is_splits=300),
            "  evaluation.is_splits: 300 is more than evaluation.num_samples 200: each Inception Score split needs "
            "images",
        ),
        (
            lambda p: p.update(profile="../x"),
            "  profile: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]*$' (got '../x')",
        ),
    ],
)
def test_keys_that_must_agree_are_refused_naming_both(tmp_path, monkeypatch, edit, line):
    monkeypatch.chdir(tmp_path)
    write_micro(tmp_path, edit)
    assert validate("params.yaml") == (2, ["params.yaml: invalid parameters", line])


def test_a_pair_may_name_the_samples_of_a_former_run_while_they_are_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_micro(tmp_path, lambda p: p["study"].update(lrs=["2e-4", "3e-5"]))  # sid-1e-4, the pair's b, is gone
    status, lines = validate("params.yaml")
    assert status == 2 and lines[1].startswith("  preference.pairs.0.b: 'sid-1e-4' names no sample set")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "sid-1e-4.npz").write_bytes(b"")  # built before the lr changed
    assert validate("params.yaml")[0] == 0


@pytest.mark.parametrize("value", ["", "votes\0"])
def test_a_path_no_file_system_takes_is_refused_not_a_traceback(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    write_micro(tmp_path, lambda p: p["preference"].update(votes_dir=value))
    assert validate("params.yaml") == (
        2,
        [
            "params.yaml: invalid parameters",
            f"  preference.votes_dir: String should match pattern '^[^\\x00]+$' (got {value!r})",
        ],
    )
