"""Progress for long work: a rich bar on a terminal, plain timestamped lines (about every 10%) in logs and CI,
nothing when SLIMSWARM_QUIET is set."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(it: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    if os.environ.get("SLIMSWARM_QUIET"):
        yield from it
        return
    if total is None and hasattr(it, "__len__"):
        total = len(it)  # type: ignore[arg-type]
    if not sys.stderr.isatty():
        yield from _lines(it, desc, total)
        return
    from rich.progress import track

    yield from track(it, description=desc, total=total, console=None, transient=True)


def _lines(it: Iterable[T], desc: str, total: int | None) -> Iterator[T]:
    t0 = time.perf_counter()
    every = max(1, (total or 10) // 10)
    i = 0
    for i, x in enumerate(it, 1):
        yield x
        if i % every == 0 or i == total:
            of = f"/{total}" if total else ""
            print(f"  {desc}: {i}{of} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
