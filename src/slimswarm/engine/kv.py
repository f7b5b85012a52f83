"""KV-cache bookkeeping for the engine: row moves (keeping active rows packed) and a block prefix cache.

The model's cache (``CausalLM.setup_cache``) is one contiguous slab per layer: [rows, kv_heads, slots, head_dim].
Active sequences always occupy rows 0..n-1, so a decode step reads plain slices, never a gathered copy; when a
sequence leaves, the last row moves into its place (one copy of that row's used slots).

The prefix cache keeps the KV of 16-token blocks of past prompts, keyed by a hash chained over every token
before the block's end and the adapter that computed it (a LoRA on k/v changes the cache). A prompt that starts
with cached blocks copies them into its row and prefills only the rest; the reused tokens are counted.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

BLOCK = 16


def layer_caches(model) -> list:
    return [layer.self_attn.cache for layer in model.model.layers if layer.self_attn.cache is not None]


def kv_bytes_per_token(model, dtype: torch.dtype | None = None) -> int:
    """Bytes of K and V one token occupies across all layers."""
    dtype = dtype or model.dtype
    size = torch.empty((), dtype=dtype).element_size()
    return sum(2 * layer.self_attn.n_kv * layer.self_attn.head_dim * size for layer in model.model.layers)


@torch.no_grad()
def move_row(model, src: int, dst: int, length: int) -> None:
    """Copy the first ``length`` slots of cache row ``src`` into row ``dst``."""
    for c in layer_caches(model):
        c.k[dst, :, :length] = c.k[src, :, :length]
        c.v[dst, :, :length] = c.v[src, :, :length]


def _chain(prev: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(prev + torch.tensor(tokens, dtype=torch.int64).numpy().tobytes(), digest_size=16).digest()


class PrefixCache:
    """LRU cache of per-block KV under a byte budget."""

    def __init__(self, budget_bytes: int = 256 << 20, block: int = BLOCK):
        self.budget = budget_bytes
        self.block = block
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # key -> [layers, 2, kv, block, hd]
        self.bytes = 0
        self.lookups = self.hit_blocks = self.hit_tokens = self.inserted = self.evicted = 0

    def _keys(self, tokens: list[int], adapter: str | None) -> list[bytes]:
        """Chain keys of the full blocks of ``tokens`` (the last token is never cached: its logits are needed)."""
        n = (len(tokens) - 1) // self.block
        key = (adapter or "").encode() + b"\0"
        out = []
        for i in range(n):
            key = _chain(key, tokens[i * self.block : (i + 1) * self.block])
            out.append(key)
        return out

    @torch.no_grad()
    def load(self, model, row: int, tokens: list[int], adapter: str | None) -> int:
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
        caches = layer_caches(model)
        b = self.block
        for i, blk in enumerate(hit):
            for li, c in enumerate(caches):
                c.k[row, :, i * b : (i + 1) * b] = blk[li, 0]
                c.v[row, :, i * b : (i + 1) * b] = blk[li, 1]
        self.hit_blocks += len(hit)
        self.hit_tokens += len(hit) * b
        return len(hit) * b

    @torch.no_grad()
    def store(self, model, row: int, tokens: list[int], adapter: str | None) -> None:
        """Keep the blocks of ``tokens`` (already in cache row ``row``) that are not cached yet."""
        if self.budget <= 0:
            return
        caches = layer_caches(model)
        b = self.block
        for i, k in enumerate(self._keys(tokens, adapter)):
            if k in self.blocks:
                self.blocks.move_to_end(k)
                continue
            with torch.inference_mode(False):
                blk = torch.stack([torch.stack((c.k[row, :, i * b : (i + 1) * b], c.v[row, :, i * b : (i + 1) * b]))
                                   for c in caches]).clone()
            size = blk.numel() * blk.element_size()
            if size > self.budget:
                return
            while self.bytes + size > self.budget and self.blocks:
                _, old = self.blocks.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
                self.evicted += 1
            self.blocks[k] = blk
            self.bytes += size
            self.inserted += 1

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {"prefix_cache_blocks": len(self.blocks), "prefix_cache_bytes": self.bytes,
                "prefix_cache_lookups": self.lookups, "prefix_cache_hit_blocks": self.hit_blocks,
                "prefix_cache_hit_tokens": self.hit_tokens, "prefix_cache_evicted": self.evicted}
