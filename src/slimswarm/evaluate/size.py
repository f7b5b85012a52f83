"""Bytes of a model's weights in memory and of a checkpoint on disk; bytes read per decoded token."""

from __future__ import annotations

from pathlib import Path

import torch


def _leaves(t: torch.Tensor):
    """The plain tensors holding ``t``'s data: a wrapper subclass (torchao's quantized tensors) holds its packed
    data and scales in inner tensors, and has no storage of its own to measure."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _leaves(getattr(t, n))
    else:
        yield t


def _unique_tensors(model: torch.nn.Module, skip: set[int] = frozenset()):
    seen = set()
    for top in list(model.parameters()) + list(model.buffers()):
        if id(top) in skip:
            continue
        for t in _leaves(top):
            key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
            if key in seen:
                continue
            seen.add(key)
            yield t


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's persistent weights (tied tensors counted once; KV cache and RoPE tables excluded)."""
    skip = {id(b) for m in model.modules() for n, b in m.named_buffers(recurse=False)
            if n in m._non_persistent_buffers_set}
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model, skip))


def decode_bytes_per_token(model) -> int:
    """Weight bytes one batch-1 decode step reads: all weights except the embedding table, plus one of its rows.

    With tied embeddings the table is read once in full by the LM head, so it counts once."""
    total = weight_bytes(model)
    if not model.config.tie_word_embeddings:
        table = sum(t.numel() * t.element_size() for t in model.model.embed_tokens.state_dict().values())
        total -= table - table // model.config.vocab_size  # a lookup reads one row
    return total


def disk_bytes(path: str | Path) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size
