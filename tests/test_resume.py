"""An interrupted and resumed run ends with exactly the bits of an uninterrupted one (CPU)."""

import copy
import json

import pytest
import torch

from distillery.checkpoint import Checkpoints
from distillery.methods.sid import SiD
from distillery.training import distill, train_teacher

from toys import tiny_edm, tiny_run


class Interrupt(Exception):
    pass


def interrupt_after(kimg):
    def progress(nimg, _):
        if nimg >= kimg * 1000:
            raise Interrupt

    return progress


def assert_same_bits(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def teacher_run(tmp_path, on_progress=None):
    torch.manual_seed(1)
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    net = tiny_edm(dropout=0.1)
    kwargs = dict(
        batch=16,
        lr=1e-3,
        lr_rampup_kimg=0.05,
        duration_kimg=0.16,
        ema_halflife_kimg=0.05,
        ema_rampup_ratio=0.05,
        checkpoints=Checkpoints(tmp_path / "teacher", "f"),
        checkpoint_kimg=0.064,
    )
    return train_teacher(net, images, None, on_progress=on_progress, **kwargs).ema


def test_teacher_resume_is_bit_identical(tmp_path):
    reference = teacher_run(tmp_path / "a")
    with pytest.raises(Interrupt):  # dies after the 0.064-kimg checkpoint, before the next one
        teacher_run(tmp_path / "b", on_progress=interrupt_after(0.096))
    assert (tmp_path / "b" / "teacher" / "nimg-000000064.pt").exists()
    resumed = teacher_run(tmp_path / "b")
    assert_same_bits(reference, resumed)
    # and the comparison is sensitive: a run from another seed differs
    torch.manual_seed(7)
    other, _, _ = train_teacher(
        tiny_edm(dropout=0.1),
        torch.rand(64, 1, 8, 8) * 2 - 1,
        None,
        batch=16,
        lr=1e-3,
        lr_rampup_kimg=0.05,
        duration_kimg=0.16,
        ema_halflife_kimg=0.05,
        ema_rampup_ratio=0.05,
    )
    assert not torch.equal(
        other.state_dict()["model.map_layer0.weight"], reference.state_dict()["model.map_layer0.weight"]
    )


def distill_run(tmp_path, fingerprint="f", on_progress=None, lr=1e-4):
    teacher = tiny_edm(dropout=0.1).eval().requires_grad_(False)
    torch.manual_seed(2)
    generator = copy.deepcopy(teacher).requires_grad_(True)
    fake = SiD().make_aux(teacher)
    values = iter(range(100, 0, -1))  # a monitor whose "FID" improves each call
    return distill(
        SiD(),
        teacher,
        generator,
        fake,
        tiny_run(lr=lr, duration_kimg=0.064, checkpoint_kimg=0.024, monitor_kimg=0.016),
        checkpoints=Checkpoints(tmp_path / "distill", fingerprint),
        monitor=lambda ema: next(values) + torch.rand(()).item(),
        on_progress=on_progress,
    )


def test_distill_resume_is_bit_identical(tmp_path, capsys):
    ema_a, best_a, history_a, _, _ = distill_run(tmp_path / "a")
    with pytest.raises(Interrupt):
        distill_run(tmp_path / "b", on_progress=interrupt_after(0.04))
    ema_b, best_b, history_b, _, _ = distill_run(tmp_path / "b")
    assert_same_bits(ema_a, ema_b)
    assert history_a[-1][0] == history_b[-1][0] == 0.064
    assert best_a["kimg"] == best_b["kimg"]
    # a checkpoint written under another fingerprint is not resumed into this run: the other run trains at
    # another lr, so resuming its weights would change the bits
    with pytest.raises(Interrupt):
        distill_run(tmp_path / "c", fingerprint="other", on_progress=interrupt_after(0.04), lr=1e-3)
    other = json.loads((tmp_path / "c" / "distill" / "manifest.json").read_text())
    assert other["fingerprint"] == "other" and [e["nimg"] for e in other["checkpoints"]] == [24]
    capsys.readouterr()
    ema_c, _, history_c, _, _ = distill_run(tmp_path / "c")
    assert "checkpoints of another run (other params or inputs), removed" in capsys.readouterr().err
    assert [k for k, _ in history_c] == [k for k, _ in history_a]
    assert_same_bits(ema_a, ema_c)
