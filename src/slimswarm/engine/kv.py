"""KV-cache bookkeeping for the engine: its own cache, row moves (keeping active rows packed), a block prefix cache.

The engine owns one ``KVCache`` per layer, [rows, kv_heads, slots, head_dim], and installs it in the model only
around its own forwards (``installed``), so other users of the same model (``generate_ids``, a second engine)
can neither overwrite the engine's rows nor have theirs overwritten. Active sequences always occupy rows
0..n-1, so a decode step reads plain slices, never a gathered copy; when a sequence leaves, the last row moves
into its place (one copy of that row's used slots).

The prefix cache keeps the KV of 16-token blocks of past prompts, keyed by a hash chained over every token
before the block's end and the adapter that computed it (a LoRA on k/v changes the cache). A prompt that starts
with cached blocks copies them into its row and prefills only the rest; the reused tokens are counted.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from contextlib import contextmanager

import torch

from ..models.llama import KVCache

BLOCK = 16


def kv_bytes_per_token(model, dtype: "torch.dtype | str | None" = None) -> int:
    """Bytes of K and V one token occupies across all layers (int8: codes plus one fp32 scale per head)."""
    kind = model.kv_storage(dtype)
    size, scale = {"fp32": (4, 0), "bf16": (2, 0), "fp16": (2, 0), "int8": (1, 4)}[kind]
    return sum(2 * layer.self_attn.n_kv * (layer.self_attn.head_dim * size + scale) for layer in model.model.layers)


def make_caches(model, rows: int, max_len: int, dtype: "torch.dtype | str | None" = None) -> list[KVCache]:
    """One zeroed cache per decoder layer, outside inference mode so it is writable from anywhere."""
    dtype = model.kv_storage(dtype)
    with torch.inference_mode(False), torch.no_grad():
        return [KVCache(rows, layer.self_attn.n_kv, max_len, layer.self_attn.head_dim, dtype, model.device)
                for layer in model.model.layers]


@contextmanager
def installed(model, caches: list[KVCache]):
    """Run the block with ``caches`` as the model's KV cache, then put back whatever the model had."""
    layers = model.model.layers
    prev = [layer.self_attn.cache for layer in layers], model.cache_batch, model.cache_len
    for layer, c in zip(layers, caches):
        layer.self_attn.cache = c
    model.cache_batch, model.cache_len = caches[0].k.shape[0], caches[0].k.shape[2]
    try:
        yield
    finally:
        for layer, c in zip(layers, prev[0]):
            layer.self_attn.cache = c
        model.cache_batch, model.cache_len = prev[1], prev[2]


@torch.no_grad()
def move_row(caches: list[KVCache], src: int, dst: int, length: int) -> None:
    """Copy the first ``length`` slots of cache row ``src`` into row ``dst``."""
    for c in caches:
        for t in c.slot_tensors():
            t[dst, :, :length] = t[src, :, :length]


def _chain(prev: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(prev + torch.tensor(tokens, dtype=torch.int64).numpy().tobytes(), digest_size=16).digest()


def _nbytes(blk: list[tuple[torch.Tensor, ...]]) -> int:
    return sum(t.numel() * t.element_size() for kv in blk for t in kv)


class PrefixCache:
    """LRU cache of per-block KV under a byte budget."""

    def __init__(self, budget_bytes: int = 256 << 20, block: int = BLOCK):
        self.budget = budget_bytes
        self.block = block
        # key -> per layer (k, v) [kv, block, hd] (+ their scales [kv, block] for an int8 cache); a list, not one
        # tensor: pruned layers may differ in kv heads
        self.blocks: OrderedDict[bytes, list[tuple[torch.Tensor, ...]]] = OrderedDict()
        self.bytes = 0
        self.lookups = self.hits = self.hit_blocks = self.hit_tokens = self.inserted = self.evicted = 0

    def _keys(self, tokens: list[int], adapter: str | None) -> list[bytes]:
        """Chain keys of the full blocks of ``tokens`` (the last token is never cached: its logits are needed)."""
        n = (len(tokens) - 1) // self.block
        key = (adapter or "").encode() + b"\0"
        out = []
        for i in range(n):
            key = _chain(key, tokens[i * self.block : (i + 1) * self.block])
            out.append(key)
        return out

    def first_key(self, tokens: list[int], adapter: str | None) -> bytes | None:
        """The key of the first block (None when the prompt has no full block to share)."""
        keys = self._keys(tokens[: self.block + 1], adapter) if self.budget > 0 else []
        return keys[0] if keys else None

    def __contains__(self, key: bytes) -> bool:
        return key in self.blocks

    @torch.no_grad()
    def load(self, caches: list[KVCache], row: int, tokens: list[int], adapter: str | None) -> int:
        """Copy the longest cached prefix of ``tokens`` into cache row ``row``; returns its length in tokens."""
        if self.budget <= 0:
            return 0
        self.lookups += 1
        hit = []
        for k in self._keys(tokens, adapter):
            blk = self.blocks.get(k)
            if blk is None:
                break
            self.blocks.move_to_end(k)
            hit.append(blk)
        if not hit:
            return 0
        b = self.block
        for i, blk in enumerate(hit):
            for c, parts in zip(caches, blk):
                dst = c.slot_tensors()
                if len(dst) != len(parts):
                    raise ValueError("prefix cache block stored from a KV cache of another dtype")
                for t, src in zip(dst, parts):
                    t[row, :, i * b : (i + 1) * b] = src
        self.hits += 1
        self.hit_blocks += len(hit)
        self.hit_tokens += len(hit) * b
        return len(hit) * b

    @torch.no_grad()
    def store(self, caches: list[KVCache], row: int, tokens: list[int], adapter: str | None) -> None:
        """Keep the blocks of ``tokens`` (already in cache row ``row``) that are not cached yet."""
        if self.budget <= 0:
            return
        b = self.block
        for i, k in enumerate(self._keys(tokens, adapter)):
            if k in self.blocks:
                self.blocks.move_to_end(k)
                continue
            with torch.inference_mode(False):
                blk = [tuple(t[row, :, i * b : (i + 1) * b].clone() for t in c.slot_tensors()) for c in caches]
            size = _nbytes(blk)
            if size > self.budget:
                return
            while self.bytes + size > self.budget and self.blocks:
                _, old = self.blocks.popitem(last=False)
                self.bytes -= _nbytes(old)
                self.evicted += 1
            self.blocks[k] = blk
            self.bytes += size
            self.inserted += 1

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {"prefix_cache_blocks": len(self.blocks), "prefix_cache_bytes": self.bytes,
                "prefix_cache_budget_bytes": self.budget,
                "prefix_cache_lookups": self.lookups, "prefix_cache_hits": self.hits,
                "prefix_cache_hit_blocks": self.hit_blocks, "prefix_cache_hit_tokens": self.hit_tokens,
                "prefix_cache_evicted": self.evicted}
