"""KL divergence between two models' next-token distributions on the same text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..progress import progress
from .perplexity import full_logits, windows_of


@torch.inference_mode()
def kl_divergence(reference, candidate, tokenizer, text: str, window: int = 512, max_tokens: int | None = 8192,
                  batch_size: int = 4) -> dict:
    """Mean KL(P_reference || P_candidate) per token in nats, plus top-1 agreement, over the same windows."""
    window = min(window, reference.config.max_position_embeddings)
    seqs = windows_of(tokenizer.encode(text), window, max_tokens, "KL text")
    reference.clear_cache()
    candidate.clear_cache()
    total, agree, count = 0.0, 0, 0
    dev = reference.device
    for i in progress(range(0, len(seqs), batch_size), "KL", total=math.ceil(len(seqs) / batch_size)):
        batch = torch.tensor(seqs[i : i + batch_size], device=dev)
        p = F.log_softmax(full_logits(reference, batch).float(), -1)
        q = F.log_softmax(full_logits(candidate, batch.to(candidate.device)).float().to(dev), -1)
        total += F.kl_div(q, p, log_target=True, reduction="sum").item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        count += batch.numel()
    return {"kl": total / count, "top1_agreement": agree / count, "tokens": count, "window": window}
