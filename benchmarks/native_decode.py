"""The native decode step against the Python path on SmolLM2-135M, side by side in one run: decode tokens/s at batch 1
and 8 for fp32 / w8 / w4g64 / w4g128 (each with fp32 and int8 activations in the native step), each one's fraction
of the bandwidth bound; and what int8 activations cost: perplexity and KL against the fp32-activation step, measured
through the decode step itself (token by token, 8 windows as 8 rows).

    .venv/bin/python benchmarks/native_decode.py [--rounds 3] [--new-tokens 32] [--ppl-tokens 2048]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slimswarm import load  # noqa: E402
from slimswarm.compress.quant.apply import quantize_model  # noqa: E402
from slimswarm.compress.recipe import QuantizeConfig  # noqa: E402
from slimswarm.data import data_path  # noqa: E402
from slimswarm.engine.kv import installed, make_caches  # noqa: E402
from slimswarm.evaluate.report import write_report  # noqa: E402
from slimswarm.evaluate.size import decode_bytes_per_token  # noqa: E402
from slimswarm.evaluate.speed import decode_tokens_per_s, measure_bandwidth  # noqa: E402
from slimswarm.kernels import native  # noqa: E402

VARIANTS = {
    "fp32": None,
    "w8": dict(bits=8, group_size=-1),
    "w4g64": dict(bits=4, group_size=64),
    "w4g128": dict(bits=4, group_size=128, group_fallback=True),  # 96 where 128 does not divide 576
}
PATHS = ("python", "native", "native-int8act")


def _set_path(model, path: str) -> None:
    os.environ["SLIMSWARM_NATIVE"] = "0" if path == "python" else "1"
    native.set_act_int8(model, path == "native-int8act")


@torch.inference_mode()
def decode_nll(model, ids: torch.Tensor, paths: tuple[str, str]) -> dict:
    """NLL of ``ids`` [rows, T] under two native paths, token by token, each with its own KV cache; KL(a || b)."""
    rows, t = ids.shape
    caches = {p: make_caches(model, rows, t) for p in paths}
    nll = {p: 0.0 for p in paths}
    kl = 0.0
    agree = 0
    for j in range(t - 1):
        lp = {}
        for p in paths:
            _set_path(model, p)
            with installed(model, caches[p]):
                lp[p] = torch.log_softmax(model(ids[:, j:j + 1], j)[:, -1].float(), -1)
            nll[p] += float(-lp[p].gather(1, ids[:, j + 1:j + 2]).sum())
        a, b = lp[paths[0]], lp[paths[1]]
        kl += float((a.exp() * (a - b)).sum())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    n = rows * (t - 1)
    return {**{f"ppl_{p}": float(torch.tensor(nll[p] / n).exp()) for p in paths}, "kl": kl / n,
            "top1_agreement": agree / n, "tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="0 skips the int8-activation quality part")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "native_decode"))
    args = ap.parse_args()

    base = load("smollm2-135m")
    models = {}
    for name in args.variants.split(","):
        m = copy.deepcopy(base.model) if VARIANTS[name] else base.model
        if VARIANTS[name]:
            quantize_model(m, QuantizeConfig(method="rtn", head_bits=8, **VARIANTS[name]))
        why = native.why_not(m)
        if why:
            raise SystemExit(f"native step cannot run {name}: {why}")
        models[name] = m
    bw = measure_bandwidth()
    rates: dict[tuple, list[float]] = {}
    for r in range(args.rounds):  # alternate every contender inside each round: the machine's noise hits all alike
        for name, m in models.items():
            for path in PATHS:
                if path == "native-int8act" and name == "fp32":
                    continue  # int8 activations only change the quantized layers
                _set_path(m, path)
                for batch in (1, 8):
                    v = decode_tokens_per_s(m, batch, args.new_tokens, repeats=1)
                    rates.setdefault((name, path, batch), []).append(v)
                    print(f"round {r} {name:7s} {path:15s} batch {batch}: {v:7.1f} tok/s", flush=True)
    rows = []
    for name, m in models.items():
        per_tok = decode_bytes_per_token(m)
        bound = bw * 1e9 / per_tok
        for path in PATHS:
            if (name, path, 1) not in rates:
                continue
            d1 = statistics.median(rates[(name, path, 1)])
            d8 = statistics.median(rates[(name, path, 8)])
            py1 = statistics.median(rates[(name, "python", 1)])
            py8 = statistics.median(rates[(name, "python", 8)])
            rows.append({"name": f"{name} {path}", "decode_tokens_per_s": d1, "decode_tokens_per_s_batch8": d8,
                         "speedup_vs_python_b1": d1 / py1, "speedup_vs_python_b8": d8 / py8,
                         "bytes_per_token": per_tok, "bandwidth_gb_s": bw, "roofline_tokens_per_s": bound,
                         "roofline_fraction": d1 / bound})
    quality = []
    if args.ppl_tokens:
        text = data_path("text/wikitext-2-raw-test.txt").read_text()
        ids = torch.tensor(base.tokenizer.encode(text[: 40 * args.ppl_tokens]))
        rows_n = 8
        t = max(2, args.ppl_tokens // rows_n)
        ids = ids[: rows_n * t].view(rows_n, t)
        for name, m in models.items():
            if name == "fp32":
                continue
            t0 = time.perf_counter()
            q = decode_nll(m, ids, ("native", "native-int8act"))
            quality.append({"name": name, **q, "seconds": time.perf_counter() - t0})
            print(name, q, flush=True)
    os.environ.pop("SLIMSWARM_NATIVE", None)
    cmd = "python benchmarks/native_decode.py " + " ".join(sys.argv[1:])
    notes = [f"{len(models)} models x {len(PATHS)} paths x batch 1/8, {args.rounds} alternating rounds, medians; "
             f"{args.new_tokens} new tokens after a 32-token prompt; {torch.get_num_threads()} threads; ISA "
             f"{native.pick_isa()}; machine: shared 2-vCPU VM ({os.uname().machine}), other jobs running: ratios "
             "measured side by side are what to read, absolute tok/s are noisy",
             "python = the PyTorch-dispatched model (SLIMSWARM_NATIVE=0); native = kernels/decode.c with fp32 "
             "activations (logits within 1e-4 of python); native-int8act = int8 activations for the quantized layers",
             "bound = bandwidth / weight bytes read per token (evaluate/speed.py)"]
    if quality:
        notes.append(f"int8-activation cost: {quality[0]['tokens']} WikiText-2 tokens as {8} rows decoded token by "
                     "token through the native step (fewer than the house 32,768: decode-step evaluation is slow); "
                     "ppl of each path, KL(fp32-act || int8-act) per token, top-1 agreement")
    out = Path(args.out)
    write_report(rows, out, cmd, notes)
    if quality:
        write_report(quality, out.with_name(out.name + "_int8act"), cmd, notes[-1:])
    print(out.with_suffix(".md").read_text())
    if quality:
        print(out.with_name(out.name + "_int8act.md").read_text())


if __name__ == "__main__":
    main()
