"""Progress bars for long work (rich), quiet when output is not a terminal or SLIMSWARM_QUIET is set."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(it: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    if os.environ.get("SLIMSWARM_QUIET") or not sys.stderr.isatty():
        yield from it
        return
    from rich.progress import track

    yield from track(it, description=desc, total=total, console=None, transient=True)
