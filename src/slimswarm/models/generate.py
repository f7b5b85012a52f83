"""Static-batch generation on our model: left-padded prompts, one prefill, then one decode step per token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..kernels import native
from .heap import release_freed_memory
from .llama import CausalLM
from .sampling import GREEDY_BELOW, SamplingParams, sample_next
from .tokenizer import Tokenizer


@dataclass
class Completion:
    prompt_tokens: int
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (eos or stop string) or "length"
    timings: dict = field(default_factory=dict)


def _greedy_native_step(model: CausalLM, plist: list[SamplingParams], tokenizer: Tokenizer | None):
    """The native step, when every remaining decode step can run inside one C call (greedy rows, no stop strings to
    check on text, fp32 logits, a batch the step takes); else None."""
    if len(plist) > native.MAX_M_FAST or model.dtype != torch.float32 or torch.is_grad_enabled():
        return None
    if any(p.temperature >= GREEDY_BELOW or (p.stop and tokenizer is not None) for p in plist):
        return None
    return native.step_for_rows(model, len(plist))


def _stop_cut(text: str, stops: list[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


@torch.inference_mode()
def generate_ids(
    model: CausalLM,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    eos_ids: list[int] = (),
    pad_id: int = 0,
    tokenizer: Tokenizer | None = None,
) -> list[Completion]:
    """Generate for a batch of token-id prompts; rows stop on EOS, a stop string or max_tokens."""
    b = len(prompts)
    plist = params if isinstance(params, list) else [params] * b
    lens = [len(p) for p in prompts]
    longest, budget = max(lens), max(p.max_tokens for p in plist)
    dev = model.device
    model.setup_cache(b, longest + budget)
    tokens = torch.full((b, longest), pad_id, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([longest - n for n in lens], device=dev) if min(lens) != longest else None
    gens = []
    for p in plist:
        g = None
        if p.seed is not None or p.temperature > 0:
            g = torch.Generator(device=dev)
            g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**31, ()).item()))
        gens.append(g)

    t0 = time.perf_counter()
    logits = model(tokens, 0, pad, last_only=True)[:, -1]
    t_prefill = time.perf_counter() - t0
    release_freed_memory()  # the prefill's activations, freed between the caches and weights (models/heap.py)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    reason = ["length"] * b
    texts = [""] * b
    pos = longest
    steps = 0
    t1 = time.perf_counter()
    while True:
        nxt = []
        for i in range(b):
            if done[i]:
                nxt.append(pad_id)
                continue
            tok = sample_next(logits[i], plist[i], gens[i])
            nxt.append(tok)
            if tok in eos_ids:
                done[i], reason[i] = True, "stop"
                continue
            out[i].append(tok)
            if plist[i].stop and tokenizer is not None:
                texts[i] = tokenizer.decode(out[i])
                if _stop_cut(texts[i], plist[i].stop) is not None:
                    done[i], reason[i] = True, "stop"
                    continue
            if len(out[i]) >= plist[i].max_tokens:
                done[i] = True
        if all(done):
            break
        step = _greedy_native_step(model, plist, tokenizer) if dev.type == "cpu" else None
        if step is not None:  # every further step in C: decode, argmax, EOS and length checks (no Python per token)
            limits = [len(out[i]) if done[i] else plist[i].max_tokens for i in range(b)]
            counts = [len(o) for o in out]
            n, new = step.decode_greedy(model, torch.tensor(nxt), torch.full((b,), pos), pad,
                                        max(lim - c for lim, c in zip(limits, counts)), list(eos_ids), pad_id,
                                        counts, limits)
            for i in range(b):
                out[i] += new[i]
                if not done[i] and len(out[i]) < plist[i].max_tokens:
                    reason[i] = "stop"  # ended on an end-of-sequence id
            steps += n
            break
        logits = model(torch.tensor(nxt, device=dev)[:, None], pos, pad, last_only=True)[:, -1]
        pos += 1
        steps += 1
    t_decode = time.perf_counter() - t1
    res = []
    for i in range(b):
        text = tokenizer.decode(out[i]) if tokenizer is not None else ""
        cut = _stop_cut(text, plist[i].stop) if plist[i].stop else None
        if cut is not None:
            text = text[:cut]
        timings = {"prefill_s": t_prefill, "decode_s": t_decode, "decode_steps": steps}
        res.append(Completion(lens[i], out[i], text, reason[i], timings))
    return res


def generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: list[str],
    params: SamplingParams | list[SamplingParams] | None = None,
    chat: bool = False,
) -> list[Completion]:
    """Text in, text out. ``chat=True`` wraps each prompt as a user turn with the tokenizer's chat template."""
    params = params or SamplingParams()
    texts = [tokenizer.chat([{"role": "user", "content": p}]) if chat else p for p in prompts]
    ids = [tokenizer.encode(t) for t in texts]
    return generate_ids(model, ids, params, tokenizer.eos_ids, tokenizer.pad_id, tokenizer)
