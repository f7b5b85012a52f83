"""``python -m slimswarm.models.warm_tokenizer {gguf|hf} PATH``: load a tokenizer through transformers once, which
writes its replay cache (models/tokenizer.py), and exit. A process that finds nothing cached runs this as a child,
so transformers' import and conversion (~85 MB resident for SmolLM2's GGUF vocabulary) never sit beside its
weights. Exit 0 when the load ran; 1 when it failed (the parent then loads in-process and reports why)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def warm(kind: str, path: str) -> None:
    """Load the tokenizer once, in-process here: with nothing cached, transformers converts it and the cache is
    written (the parent checks that it replays)."""
    os.environ["SLIMSWARM_TOKENIZER_CHILD"] = "0"  # never recurse
    if kind == "gguf":
        from . import gguf

        cfg, _ = gguf.open_gguf(path)
        gguf.gguf_tokenizer(path, cfg)
    elif kind == "hf":
        from .hf import read_hf_tokenizer

        read_hf_tokenizer(Path(path), None)
    else:
        raise ValueError(f"unknown kind {kind!r} (gguf or hf)")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m slimswarm.models.warm_tokenizer {gguf|hf} PATH", file=sys.stderr)
        return 2
    try:
        warm(*argv)
        return 0
    except Exception as e:  # noqa: BLE001 - any failure: the parent loads in-process and reports it
        print(f"warm_tokenizer: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
