"""Perplexity on a text with fixed non-overlapping windows, and per-document perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import SlimswarmError
from ..progress import progress


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens the mean is over
    window: int
    windows: int

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens,
                "window": self.window, "windows": self.windows}


def windows_of(ids: list[int], window: int, max_tokens: int | None, source: str = "text") -> list[list[int]]:
    """Split the first ``max_tokens`` ids into full, non-overlapping windows of ``window`` tokens."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // window
    if n == 0:
        raise SlimswarmError(f"{source}: {len(ids)} tokens is shorter than one window of {window}")
    return [ids[i * window : (i + 1) * window] for i in range(n)]


def full_logits(model, batch: torch.Tensor) -> torch.Tensor:
    """Logits of every position of ``batch`` [B, T]. With a KV cache storage set (``model.kv_dtype``: bf16, fp16,
    int8) the keys and values go through such a cache (written, then read back), so its rounding is what is scored."""
    if getattr(model, "kv_dtype", None) is None:
        return model(batch)
    model.setup_cache(batch.shape[0], batch.shape[1])
    try:
        return model(batch, 0)
    finally:
        model.clear_cache()


@torch.inference_mode()
def sequence_nll(model, seqs: list[list[int]], batch_size: int = 4, desc: str = "perplexity") -> tuple[float, int]:
    """Summed next-token NLL over equal-length sequences (each predicts tokens 1..T-1), and the count."""
    model.clear_cache()
    total, count = 0.0, 0
    dev = model.device
    for i in progress(range(0, len(seqs), batch_size), desc, total=math.ceil(len(seqs) / batch_size)):
        batch = torch.tensor(seqs[i : i + batch_size], device=dev)
        logits = full_logits(model, batch)[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total, count


def perplexity(model, tokenizer, text: str, window: int = 1024, max_tokens: int | None = None,
               batch_size: int = 4, source: str = "text") -> PerplexityResult:
    """Tokenize ``text`` once (with the tokenizer's own BOS rule), cut into windows, score every window."""
    window = min(window, model.config.max_position_embeddings)
    seqs = windows_of(tokenizer.encode(text), window, max_tokens, source)
    total, count = sequence_nll(model, seqs, batch_size)
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, window, len(seqs))


def document_perplexity(model, tokenizer, docs: list[str], max_len: int | None = None) -> PerplexityResult:
    """Perplexity of each document scored on its own (BOS first, truncated at ``max_len`` tokens)."""
    max_len = min(max_len or 10**9, model.config.max_position_embeddings)
    total, count = 0.0, 0
    for d in docs:
        ids = tokenizer.encode(d, bos=True)[:max_len]
        if len(ids) < 2:
            continue
        s, c = sequence_nll(model, [ids], 1, desc="documents")
        total, count = total + s, count + c
    if count == 0:
        raise SlimswarmError("no document has two or more tokens")
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, max_len, len(docs))
