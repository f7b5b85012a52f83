"""Our model against transformers' generate on SmolLM2-135M: decode tokens/s at batch 1 and 8, prefill, and each
one's fraction of the bandwidth bound, measured side by side in one run.

    .venv/bin/python benchmarks/decode_smollm2.py [--new-tokens 64] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slimswarm import load  # noqa: E402
from slimswarm.evaluate.report import write_report  # noqa: E402
from slimswarm.evaluate.size import decode_bytes_per_token  # noqa: E402
from slimswarm.evaluate.speed import decode_tokens_per_s, measure_bandwidth, prefill_tokens_per_s  # noqa: E402


def hf_twin(model, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = model.config.to_hf()
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    return hf


@torch.inference_mode()
def hf_decode_tokens_per_s(hf, vocab: int, batch: int, new_tokens: int, repeats: int = 2) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, 32), generator=g)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        rates.append(batch * (new_tokens - 1) / (time.perf_counter() - t - t_prefill))
    return statistics.median(rates)


@torch.inference_mode()
def hf_prefill_tokens_per_s(hf, vocab: int, n: int = 512) -> float:
    ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    hf(ids[:, :16])
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        hf(ids, logits_to_keep=1)
        ts.append(time.perf_counter() - t)
    return n / statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_smollm2"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    bw = measure_bandwidth()
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        ours = load("smollm2-135m", dtype=dtype).model
        hf = hf_twin(ours, dtype)
        per_tok = decode_bytes_per_token(ours)
        bound = bw * 1e9 / per_tok
        for impl in ("slimswarm", "transformers"):
            if impl == "slimswarm":
                d1 = decode_tokens_per_s(ours, 1, args.new_tokens)
                d8 = decode_tokens_per_s(ours, 8, args.new_tokens)
                pf = prefill_tokens_per_s(ours)
            else:
                d1 = hf_decode_tokens_per_s(hf, ours.config.vocab_size, 1, args.new_tokens)
                d8 = hf_decode_tokens_per_s(hf, ours.config.vocab_size, 8, args.new_tokens)
                pf = hf_prefill_tokens_per_s(hf, ours.config.vocab_size)
            rows.append({"name": f"{impl} {name}", "prefill_tokens_per_s": pf, "decode_tokens_per_s": d1,
                         "decode_tokens_per_s_batch8": d8, "bytes_per_token": per_tok, "bandwidth_gb_s": bw,
                         "roofline_tokens_per_s": bound, "roofline_fraction": d1 / bound})
            print(rows[-1], flush=True)
        del hf, ours
    notes = []
    for name in args.dtypes.split(","):
        o = next(r for r in rows if r["name"] == f"slimswarm {name}")
        h = next(r for r in rows if r["name"] == f"transformers {name}")
        notes.append(f"{name}: slimswarm/transformers decode ratio batch 1 = {o['decode_tokens_per_s'] / h['decode_tokens_per_s']:.2f}x, "
                     f"batch 8 = {o['decode_tokens_per_s_batch8'] / h['decode_tokens_per_s_batch8']:.2f}x; "
                     f"fraction of bound at batch 1: slimswarm {o['roofline_fraction']:.0%}, transformers {h['roofline_fraction']:.0%}")
    notes.append(f"bandwidth {bw:.1f} GB/s (median of 5 sums over a written 1 GiB buffer); bound = bandwidth / weight bytes read per token; "
                 f"{torch.get_num_threads()} threads; machine: {Path('/proc/cpuinfo').read_text().split('model name')[1].split(':')[1].splitlines()[0].strip()}")
    paths = write_report(rows, args.out, "python benchmarks/decode_smollm2.py " + " ".join(sys.argv[1:]), notes)
    print("\n".join(notes))
    print(Path(paths["md"]).read_text())


if __name__ == "__main__":
    main()
