"""models/: build our model from a stream of named tensors, holding about one tensor beyond the model at a time.

Every loader (GGUF, Hugging Face folders, llama2.c, our checkpoints) ends here. The skeleton is allocated but
never initialised: its tensors are replaced or overwritten by the checkpoint, and the untouched pages of a fresh
allocation cost no resident memory. Building it on the meta device instead would run the embedding's
``normal_`` and RoPE's ``arange`` through torch's Python meta kernels, whose first use imports sympy and
torch._decomp: +170 MB peak RSS for a 538 MB model (measured, see benchmarks/results/load_memory.md).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from .heap import release_freed_memory
from .llama import CausalLM, ModelConfig

_INITS = ("kaiming_uniform_", "uniform_", "normal_", "zeros_", "ones_")
_GROUP = re.compile(r"^(model\.layers\.\d+\.)")


@contextlib.contextmanager
def skipped_init() -> Iterator[None]:
    """Module constructors inside allocate their tensors but leave them uninitialised (torch.nn.init is a no-op).
    Process-wide while it lasts: a module built on another thread meanwhile would be left uninitialised too."""
    saved = {n: getattr(nn.init, n) for n in _INITS}
    try:
        for n in _INITS:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def empty_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> CausalLM:
    """Our model with uninitialised float tensors of ``dtype`` (nothing resident until written)."""
    with skipped_init(), torch.no_grad():
        model = CausalLM(cfg)
        if dtype != torch.float32:
            model._apply(lambda t: torch.empty_like(t, dtype=dtype) if t.is_floating_point() else t)
    return model


def layer_groups(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive named tensors grouped by decoder layer (``model.layers.N.``; everything else alone), so a
    ``load_state_dict`` per group runs every module's load hooks while one layer at most is held twice."""
    group: dict[str, torch.Tensor] = {}
    key = None
    for name, t in items:
        m = _GROUP.match(name)
        k = m.group(1) if m else name
        if group and k != key:
            yield group
            group = {}
        key = k
        group[name] = t
    if group:
        yield group


def load_streamed(model: nn.Module, tensors, assign: bool = False, skip: Iterable[str] = ()
                  ) -> tuple[list[str], list[str]]:
    """``model.load_state_dict(tensors, strict=False)`` one layer group at a time: (missing, unexpected) keys.

    ``tensors`` may be a generator that reads or de-quantizes each tensor when asked, so the whole state dict
    never exists at once. ``skip``: names to drop (a tied LM head)."""
    skip = set(skip)
    expected = set(model.state_dict().keys())
    loaded: set[str] = set()
    unexpected: list[str] = []
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    for group in layer_groups((n, t) for n, t in pairs if n not in skip):
        _, unexp = model.load_state_dict(group, strict=False, assign=assign)
        unexpected += unexp
        loaded.update(group)
        del group
        release_freed_memory()
    missing = sorted(expected - loaded)
    return missing, unexpected

