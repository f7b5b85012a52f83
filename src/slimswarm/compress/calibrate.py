"""Calibration text from the data folder's training splits (never the WikiText-2 test text used for evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import data_dir
from ..errors import SlimswarmError


def default_calibration_text(max_chars: int = 400_000) -> str:
    """GSM8K train (question + answer), AG News train and SST-2 train, interleaved so every source is represented."""
    d = data_dir()
    parts: list[list[str]] = []
    gsm = [json.loads(line) for line in (d / "tasks/gsm8k/train.jsonl").read_text().splitlines()[:2000]]
    parts.append([f"Question: {r['question']}\nAnswer: {r['answer']}" for r in gsm])
    for rel in ("tasks/agnews/train.tsv", "tasks/sst2/train.tsv"):
        rows = (d / rel).read_text().splitlines()
        parts.append([r.rsplit("\t", 1)[0] for r in rows[1:3000] if "\t" in r])
    out, n, i = [], 0, 0
    while n < max_chars and any(i < len(p) for p in parts):
        for p in parts:
            if i < len(p):
                out.append(p[i])
                n += len(p[i])
        i += 1
    return "\n\n".join(out)


def calibration_batch(tokenizer, text: str | None = None, samples: int = 64, seq_len: int = 256,
                      source: str = "calibration text") -> torch.Tensor:
    """[samples, seq_len] token ids cut from the text; a clear error when it is too short."""
    text = default_calibration_text() if text is None else text
    ids = tokenizer.encode(text)
    need = samples * seq_len
    if len(ids) < need:
        raise SlimswarmError(f"{source}: {len(ids)} tokens, calibration needs {samples} x {seq_len} = {need}")
    return torch.tensor(ids[:need]).view(samples, seq_len)


def read_calibration(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise SlimswarmError(f"--calib: no such file: {p}")
    return p.read_text(encoding="utf-8")
