"""Distillation: the KD loss by hand, exact resume after a kill, 2-process data parallel = 1 process, bad input."""

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slimswarm.compress.distill import DistillConfig, distill, drop_layers, kd_loss
from slimswarm.errors import SlimswarmError

ROOT = Path(__file__).resolve().parents[1]


def test_kd_loss_matches_hand_computation():
    # two tokens, vocabulary of three; the second token's label is ignored
    s = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]])
    t = torch.tensor([[[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]])
    y = torch.tensor([[1, -100]])
    a, T = 0.3, 2.0

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    ce = -math.log(softmax([1.0, 2.0, 0.5])[1])
    ps, pt = softmax([0.5, 1.0, 0.25]), softmax([1.0, 0.0, 0.5])
    kl = sum(q * math.log(q / p) for q, p in zip(pt, ps))
    expect = a * ce + (1 - a) * T * T * kl
    got = kd_loss(s, t, y, alpha=a, T=T)
    assert got.item() == pytest.approx(expect, rel=1e-6)
    assert kd_loss(s, None, y, alpha=1.0, T=T).item() == pytest.approx(ce, rel=1e-6)
    with pytest.raises(SlimswarmError, match="needs teacher logits"):
        kd_loss(s, None, y, alpha=0.5, T=T)


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, seq_len=32, lr=1e-3, warmup=2, save_every=3, seed=0)
    base.update(kw)
    return DistillConfig(**base)


def _text():
    return (Path(os.environ.get("SLIMSWARM_DATA", ROOT.parent / "shared" / "data")) /
            "text/tinystories-sample.txt").read_text()


class Killed(Exception):
    pass


def test_resume_after_kill_continues_the_same_curve(stories, tmp_path):
    teacher = stories.model
    text = _text()
    full = distill(teacher, drop_layers(teacher, [0, 2, 4]), stories.tokenizer, _cfg(), tmp_path / "a", text)
    losses = [r["loss"] for r in full.history]
    assert len(losses) == 6

    def die(rec):
        if rec["step"] == 4:  # after the step-3 checkpoint: step 4 is lost, as in a kill
            raise Killed

    with pytest.raises(Killed):
        distill(teacher, drop_layers(teacher, [0, 2, 4]), stories.tokenizer, _cfg(), tmp_path / "b", text, on_step=die)
    student = drop_layers(teacher, [0, 2, 4])
    res = distill(teacher, student, stories.tokenizer, _cfg(), tmp_path / "b", text)
    assert res.resumed_from == 3
    assert [r["loss"] for r in res.history] == losses  # bit-identical continuation
    logged = [json.loads(line)["loss"] for line in (tmp_path / "b" / "loss.jsonl").read_text().splitlines()]
    assert logged == losses
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000
    # a different run pointed at the same folder is refused and overwrites nothing
    before = (tmp_path / "b" / "train_state.pt").read_bytes()
    with pytest.raises(SlimswarmError, match="different run"):
        distill(teacher, drop_layers(teacher, [0, 2, 4]), stories.tokenizer, _cfg(alpha=0.9), tmp_path / "b", text)
    assert (tmp_path / "b" / "train_state.pt").read_bytes() == before


def test_student_tokenizer_must_match(stories, smollm2, tmp_path):
    with pytest.raises(SlimswarmError, match="same tokenizer"):
        distill(stories.model, copy.deepcopy(stories.model), stories.tokenizer, _cfg(steps=1), tmp_path,
                _text(), student_tokenizer=smollm2.tokenizer)


def test_kd_beats_nothing_and_ce_mode_needs_no_teacher(stories, tmp_path):
    student = drop_layers(stories.model, [0, 1, 2, 3])
    res = distill(None, student, stories.tokenizer, _cfg(mode="ce", steps=4, save_every=0), tmp_path, _text())
    assert res.history[-1]["kl"] == 0.0 and res.student_dir is not None
    assert (res.student_dir / "slimswarm.json").exists()


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    os.environ["SLIMSWARM_QUIET"] = "1"
    from slimswarm import load
    from slimswarm.compress.distill import DistillConfig, distill, drop_layers
    m = load("stories260k")
    text = open(sys.argv[2]).read()
    cfg = DistillConfig(steps=3, batch_size=4, seq_len=32, lr=1e-3, warmup=0, save_every=0, seed=0)
    student = drop_layers(m.model, [0, 2, 4])
    distill(m.model, student, m.tokenizer, cfg, sys.argv[1], text)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(student.state_dict(), os.path.join(sys.argv[1], "final.pt"))
""")


def test_two_process_ddp_equals_one_process_on_the_double_batch(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    text = Path(os.environ.get("SLIMSWARM_DATA", ROOT.parent / "shared" / "data")) / "text/tinystories-sample.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), str(text)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29611",
                          str(script), str(tmp_path / "two"), str(text)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = torch.load(tmp_path / "one" / "final.pt")
    b = torch.load(tmp_path / "two" / "final.pt")
    assert a.keys() == b.keys()
    from slimswarm import load

    init = drop_layers(load("stories260k").model, [0, 2, 4]).state_dict()
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    # the same update up to float summation order (Adam divides by sqrt(v), which magnifies rounding a little)
    assert moved > 1e-3 and worst < 0.02 * moved, (worst, moved)
    la = [json.loads(x)["loss"] for x in (tmp_path / "one" / "loss.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "two" / "loss.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)
