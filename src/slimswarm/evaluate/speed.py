"""Speed against the limit: this machine's read bandwidth, prefill and decode tokens/s, peak RSS."""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time

import torch

from ..models.generate import generate_ids
from ..models.sampling import SamplingParams
from .size import decode_bytes_per_token


_BANDWIDTH_PROBE = """
import statistics, sys, time, torch
mb, repeats, threads = (int(a) for a in sys.argv[1:4])
torch.set_num_threads(threads)
buf = torch.empty(mb * 1024 * 1024 // 4, dtype=torch.float32)
buf.fill_(1.0)
buf.sum()  # warm
times = []
for _ in range(repeats):
    t = time.perf_counter()
    buf.sum()
    times.append(time.perf_counter() - t)
# The median, not the best: a shared host sometimes lends a burst far above what decode can count on.
print(buf.numel() * 4 / statistics.median(times) / 1e9)
"""


def measure_bandwidth(mb: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: sum over a buffer much larger than the caches, written first so pages exist, with
    this process's thread count. It runs in a child process, so the 1 GB buffer does not count in the peak RSS
    that ``speed_report`` reports for the model."""
    out = subprocess.run([sys.executable, "-c", _BANDWIDTH_PROBE, str(mb), str(repeats), str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@torch.inference_mode()
def prefill_tokens_per_s(model, n_tokens: int = 512, repeats: int = 3) -> float:
    n_tokens = min(n_tokens, model.config.max_position_embeddings)
    ids = torch.tensor([_prompt(model.config.vocab_size, n_tokens)], device=model.device)
    model.setup_cache(1, n_tokens)
    model(ids[:, :16], 0, last_only=True)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(ids, 0, last_only=True)
        times.append(time.perf_counter() - t)
    return n_tokens / statistics.median(times)


def decode_tokens_per_s(model, batch: int = 1, new_tokens: int = 64, prompt_len: int = 32, repeats: int = 2,
                        timings: list | None = None) -> float:
    """Generated tokens per second of decode (after prefill), all rows counted; EOS ignored. Each timed generate's
    timings (prefill_s, decode_s, decode_steps) are appended to ``timings`` when given."""
    prompts = [_prompt(model.config.vocab_size, prompt_len, seed=i) for i in range(batch)]
    params = SamplingParams(max_tokens=new_tokens)
    generate_ids(model, prompts, SamplingParams(max_tokens=4))  # warm-up, allocates the cache
    rates = []
    for _ in range(repeats):
        c = generate_ids(model, prompts, params)[0]
        if timings is not None:
            timings.append(c.timings)
        rates.append(batch * c.timings["decode_steps"] / c.timings["decode_s"])
    return statistics.median(rates)


def speed_report(model, bandwidth_gb_s: float | None = None, new_tokens: int = 64) -> dict:
    bw = bandwidth_gb_s or measure_bandwidth()
    per_tok = decode_bytes_per_token(model)
    bound = bw * 1e9 / per_tok
    d1 = decode_tokens_per_s(model, 1, new_tokens)
    d8 = decode_tokens_per_s(model, 8, new_tokens)
    return {
        "prefill_tokens_per_s": prefill_tokens_per_s(model),
        "decode_tokens_per_s": d1,
        "decode_tokens_per_s_batch8": d8,
        "bandwidth_gb_s": bw,
        "bytes_per_token": per_tok,
        "roofline_tokens_per_s": bound,
        "roofline_fraction": d1 / bound,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
    }
