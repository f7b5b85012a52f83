"""Finds the shared real data: $SLIMSWARM_DATA, ../shared/data beside the project, or a built-in fallback."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SlimswarmError

_PROJECT = Path(__file__).resolve().parents[2]

# Used only when no data folder exists (a wheel installed far from the repo): a short public-domain text.
FALLBACK_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters. "
) * 8


def data_dir(required: bool = True) -> Path | None:
    """The data folder, or None (or an error when ``required``) if there is none."""
    env = os.environ.get("SLIMSWARM_DATA")
    candidates = [Path(env)] if env else []
    candidates += [_PROJECT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    if required:
        where = env or str(_PROJECT.parent / "shared" / "data")
        raise SlimswarmError(f"data folder not found: {where} (set SLIMSWARM_DATA)")
    return None


def data_path(rel: str) -> Path:
    """A file inside the data folder, with a clear error when it is missing."""
    p = data_dir() / rel
    if not p.exists():
        raise SlimswarmError(f"data file not found: {p}")
    return p


def default_eval_text() -> tuple[str, str]:
    """(text, name): WikiText-2 test when the data folder has it, else the built-in fallback."""
    d = data_dir(required=False)
    if d is not None and (d / "text/wikitext-2-raw-test.txt").exists():
        p = d / "text/wikitext-2-raw-test.txt"
        return p.read_text(encoding="utf-8"), str(p)
    return FALLBACK_TEXT, "built-in fallback text"
