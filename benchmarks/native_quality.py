"""What the native step's two lossy options cost on SmolLM2-135M (quality only; speed is vs_llamacpp.py's job):

- int8 activations for the quantized layers (``SLIMSWARM_NATIVE_ACT=int8``): perplexity and KL(fp32-act || int8-act)
  measured through the decode step itself, token by token, 8 WikiText-2 windows decoded as 8 rows;
- the KV cache stored as bf16, fp16 or int8 (one fp32 scale per head and token; ``--kv-cache``): perplexity and
  KL(fp32 cache || that cache) over WikiText-2 windows whose keys and values are written to and read back from
  such a cache (``evaluate.perplexity.full_logits``).

    .venv/bin/python benchmarks/native_quality.py [--act-tokens 2048] [--kv-tokens 4096]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "src"))
sys.path.insert(0, str(HERE))

from native_decode import VARIANTS, decode_nll  # noqa: E402

from slimswarm import load  # noqa: E402
from slimswarm.compress.quant.apply import quantize_model  # noqa: E402
from slimswarm.compress.recipe import QuantizeConfig  # noqa: E402
from slimswarm.data import default_eval_text  # noqa: E402
from slimswarm.engine.kv import kv_bytes_per_token  # noqa: E402
from slimswarm.evaluate.perplexity import full_logits, windows_of  # noqa: E402
from slimswarm.evaluate.report import write_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--act-tokens", type=int, default=2048, help="tokens decoded per activation path (8 rows)")
    ap.add_argument("--kv-tokens", type=int, default=4096, help="WikiText-2 tokens scored per KV cache storage")
    ap.add_argument("--act-variants", default="w8,w4g128")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "native_quality"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load(args.model)
    tok = base.tokenizer
    text, source = default_eval_text()
    models = {}
    for name in ("fp32", "w8", "w4g128"):
        m = copy.deepcopy(base.model)
        if VARIANTS[name]:
            quantize_model(m, QuantizeConfig(method="rtn", head_bits=8, **VARIANTS[name]))
        models[name] = m.eval()
    rows = []
    t0 = time.perf_counter()
    cands = [(name, kv) for name in models for kv in ("fp32", "bf16", "fp16", "int8")]
    acc = {c: {"nll": 0.0, "kl": 0.0, "agree": 0, "n": 0} for c in cands}
    seqs = windows_of(tok.encode(text), args.window, args.kv_tokens, source) if args.kv_tokens else []
    ref = models["fp32"]
    with torch.inference_mode():
        for i in range(0, len(seqs), 4):  # the reference once per batch, every candidate against it
            batch = torch.tensor(seqs[i:i + 4])
            ref.kv_dtype = None
            p = F.log_softmax(full_logits(ref, batch).float(), -1)
            for name, kv in cands:
                m = models[name]
                m.kv_dtype = kv
                q = F.log_softmax(full_logits(m, batch).float(), -1)
                m.kv_dtype = None
                a = acc[(name, kv)]
                a["nll"] += float(-q[:, :-1].gather(-1, batch[:, 1:, None]).sum())
                a["kl"] += float(F.kl_div(q, p, log_target=True, reduction="sum"))
                a["agree"] += int((p.argmax(-1) == q.argmax(-1)).sum())
                a["n"] += batch.numel()
            print(f"[{time.perf_counter() - t0:6.0f}s] KV part: {min(i + 4, len(seqs))}/{len(seqs)} windows", flush=True)
    for (name, kv), a in (acc.items() if seqs else ()):
        n_pred = a["n"] - a["n"] // args.window  # each window predicts window-1 tokens
        models[name].kv_dtype = kv
        rows.append({"weights": name, "option": f"kv {kv}", "kv_bytes_per_token": kv_bytes_per_token(models[name]),
                     "ppl": math.exp(a["nll"] / n_pred), "kl_to_fp32_model": a["kl"] / a["n"],
                     "top1_agreement": a["agree"] / a["n"], "tokens": a["n"]})
        models[name].kv_dtype = None
    if args.act_tokens:
        ids = torch.tensor(tok.encode(text[: 40 * args.act_tokens]))
        t = max(2, args.act_tokens // 8)
        ids = ids[: 8 * t].view(8, t)
        for name in args.act_variants.split(","):
            q = decode_nll(models[name], ids, ("native", "native-int8act"))
            for path in ("native", "native-int8act"):
                rows.append({"weights": name, "option": "act int8" if path.endswith("int8act") else "act fp32",
                             "ppl": q[f"ppl_{path}"], "kl_to_fp32_act": q["kl"] if path.endswith("int8act") else 0.0,
                             "top1_agreement": q["top1_agreement"] if path.endswith("int8act") else 1.0,
                             "tokens": q["tokens"]})
            print(f"[{time.perf_counter() - t0:6.0f}s] {name} act: ppl fp32 {q['ppl_native']:.3f} int8 "
                  f"{q['ppl_native-int8act']:.3f} KL {q['kl']:.5f}", flush=True)
    notes = [f"{args.model}; WikiText-2 ({source}); KV rows: {args.kv_tokens} tokens in {args.window}-token windows, "
             "KL against the fp32 model with an fp32 cache (so the w8/w4 rows carry their weights' KL too; "
             "read each row against its own kv fp32 row)",
             f"activation rows: {args.act_tokens} tokens decoded by the native step, 8 windows as 8 rows, KL of the "
             "int8-activation step against the fp32-activation step on the same weights",
             "int8 KV cache: one fp32 scale per (row, head, token), absmax/127, round half to even; "
             "bytes per token are K+V over all layers"]
    write_report(rows, args.out, "python benchmarks/native_quality.py " + " ".join(sys.argv[1:]), notes)


if __name__ == "__main__":
    main()
