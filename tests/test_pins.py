"""Pins of downloads: a first-use pin is recorded in downloads.lock.json only once the file proved usable (the EDM
pickle converted), and a downloads.lock.json that is not a map of URL to sha256 stops the stage (exit 2, one line
naming the file) before any download. Served by a real HTTP server on 127.0.0.1; real stage processes."""

import json
import os
import pickle
from pathlib import Path

import pytest
import yaml
from test_download import serving
from test_teacher_url import run_teacher_stage

from pipeline.pins import recorded_pins

from conftest import ROOT, dump_params

OTHER = {"https://example.org/other.pkl": "ab" * 32}


def url_teacher(project, url):
    project.mkdir(exist_ok=True)
    params = yaml.safe_load((ROOT / "profiles" / "micro.yaml").read_text())
    params["teacher"].update(source="url", download={"url": url})  # no sha256: trust on first use
    dump_params(project / "params.yaml", params)


def test_a_pickle_that_fails_conversion_records_no_pin_and_keeps_nothing(tmp_path):
    project = tmp_path / "project"
    with serving(pickle.dumps({"ema": os.getcwd})) as httpd:  # a global the restricted unpickler refuses
        url_teacher(project, httpd.url)
        (project / "downloads.lock.json").write_text(json.dumps(OTHER))
        before = (project / "downloads.lock.json").read_bytes()
        result = run_teacher_stage(project)
        assert httpd.requests  # it was downloaded
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"teacher: {httpd.url} is not a usable EDM pickle: ") and "getcwd" in line, line
    assert "Traceback" not in result.stderr and "recorded" not in result.stderr
    assert (project / "downloads.lock.json").read_bytes() == before
    assert not (project / "downloads" / "teacher.pkl").exists()  # unpinned bytes that failed are not kept
    assert not (project / "models" / "teacher").exists()


def test_a_broken_pins_file_exits_2_naming_it_before_any_download(tmp_path):
    project = tmp_path / "project"
    text = '{"https://example.org/a.pkl": "ab'  # cut short
    with serving(b"never fetched") as httpd:
        url_teacher(project, httpd.url)
        (project / "downloads.lock.json").write_text(text)
        result = run_teacher_stage(project)
        assert httpd.requests == []
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after MLflow's own log lines
    assert line.startswith("downloads.lock.json: not valid JSON (") and "git checkout downloads.lock.json" in line, line
    assert "Traceback" not in result.stderr
    assert (project / "downloads.lock.json").read_text() == text


@pytest.mark.parametrize("pins", [{"https://example.org/a.pkl": "not a sha256"}, ["ab" * 32]], ids=["hash", "list"])
def test_pins_that_are_not_a_map_of_url_to_sha256_are_refused(tmp_path, monkeypatch, capsys, pins):
    monkeypatch.chdir(tmp_path)
    Path("downloads.lock.json").write_text(json.dumps(pins))
    with pytest.raises(SystemExit) as exit:
        recorded_pins()
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        "downloads.lock.json: not a mapping of URL to sha256 (64 hex digits); restore it "
        "(git checkout downloads.lock.json) or correct it\n"
    )


def test_valid_pins_are_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert recorded_pins() == {}
    Path("downloads.lock.json").write_text(json.dumps(OTHER))
    assert recorded_pins() == OTHER
