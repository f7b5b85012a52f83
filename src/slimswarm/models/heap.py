"""models/: hand the C heap's free pages back to the system between the phases of a load or a run.

glibc's malloc serves blocks below its mmap threshold from one heap and keeps the pages of freed blocks resident
(it returns only the heap's top). The threshold grows to the size of the largest block freed so far (up to 32 MB),
so after a load has replaced its skeleton's tensors, every weight, KV cache and activation below a few MB lives in
that heap. Temporaries freed between tensors that live on (de-quantization scratch, a replaced KV cache, a
prefill's activations) then stay resident as holes: 0-30 MB over a 30-layer load, varying from run to run, 20-40 MB
after ``slimswarm bench``'s caches (benchmarks/results/load_memory.md). ``malloc_trim(0)`` returns those pages.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; elsewhere (musl, macOS) there is nothing to call
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """``malloc_trim(0)`` where the C library has it: the free pages inside the heap go back to the system.
    Well under a millisecond for a 135M model's heap; call it between phases, not per decode step."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
