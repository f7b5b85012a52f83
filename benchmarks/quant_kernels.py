"""Quantized-linear CPU kernels side by side at SmolLM2-135M shapes (decode batch 1 and 8, prefill 512).

    .venv/bin/python benchmarks/quant_kernels.py            # full run, writes benchmarks/results/quant_kernels.{json,md}
    .venv/bin/python benchmarks/quant_kernels.py --quick    # two shapes, fewer repeats (a smoke test)

Each row: one way to compute y = x @ W^T for one shape and token count, median time per call over repeats after
warmup, torch.set_num_threads(2). "vs fp32" is fp32 F.linear time / this time (above 1 = faster). GB/s is the
bytes of that method's weight format (codes + scales + zeros; fp32/bf16: the float weight) / time: decode is
bound by reading weights, so this says how close to memory speed a path is. "exact" says whether the result
equals F.linear(x, dequantized W) up to float rounding ("yes"), only with the weight rounded to bf16 ("bf16"),
or is a different computation ("no": fbgemm dynamic quantizes the activations too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from slimswarm import kernels
from slimswarm.compress.quant.linear import QuantLinear

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # out x in
BATCHES = [1, 8, 512]
GROUP = 64  # divides 576 and 1536; torch's int4 kernel takes 32/64/128/256
RESULTS = Path(__file__).with_name("results")


def timeit(fn, budget_s: float, max_reps: int) -> tuple[float, int]:
    """Median seconds per call. One call first (warms caches, builds lazy state, faults in memory)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > 0.5:  # slow paths: a few calls are enough (and a very slow one is timed once more)
        ts = []
        for _ in range(1 if first > 5 else 3):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts), len(ts)
    for _ in range(2):
        fn()
    reps = int(min(max_reps, max(5, budget_s / max(first, 1e-6))))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), reps


def rtn_codes(w: torch.Tensor, bits: int, group: int):
    """Min-max asymmetric codes, fp16 scales, uint8 zeros (group = in: per channel)."""
    out, inp = w.shape
    wg = w.reshape(out, inp // group, group)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    qmax = 2**bits - 1
    s = ((hi - lo) / qmax).clamp_min(1e-6).half()
    z = torch.round(-lo / s.float()).clamp(0, qmax)
    q = torch.clamp(torch.round(wg / s.float()[..., None]) + z[..., None], 0, qmax).to(torch.uint8)
    return q.reshape(out, inp), s, z.to(torch.uint8)


def torchao_modules(w: torch.Tensor):
    """torchao 0.18 CPU weight-only configs, where they run; (name, module or reason)."""
    out = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001
        return [("torchao", f"not installed: {e}")]
    ver = torchao.__version__
    for name, dtype, make in [
        (f"torchao {ver} Int8WeightOnly", torch.bfloat16, lambda: Int8WeightOnlyConfig()),
        (f"torchao {ver} Int8WeightOnly", torch.float32, lambda: Int8WeightOnlyConfig()),
        (f"torchao {ver} Int4WeightOnly g{GROUP}", torch.bfloat16, lambda: Int4WeightOnlyConfig(group_size=GROUP)),
    ]:
        try:
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(dtype)
            lin.weight.data = w.to(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_(lin, make())
                lin(torch.zeros(1, w.shape[1], dtype=dtype))
            out.append((name, dtype, lin))
        except Exception as e:  # noqa: BLE001
            out.append((name, dtype, f"does not run on CPU here: {str(e).splitlines()[0][:120]}"))
    return out


def methods(N: int, K: int, w: torch.Tensor):
    """(name, bits, x dtype, exact, weight bytes, fn(x) or reason, flag for decode only)."""
    nk = N * K
    G = K // GROUP
    rows = []
    wb = w.bfloat16()
    rows.append(("fp32 F.linear", 32, torch.float32, "yes", 4 * nk, lambda x: F.linear(x, w)))
    rows.append(("bf16 F.linear", 16, torch.bfloat16, "yes", 2 * nk, lambda x: F.linear(x, wb)))

    # int8 per channel: fbgemm dynamic (activations quantized too), torch._weight_int8pack_mm
    q8, s8, z8 = rtn_codes(w, 8, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wq = torch._make_per_channel_quantized_tensor((q8.short() - 128).to(torch.int8), s8.double().view(-1),
                                                      z8.long().view(-1) - 128, 0)
    packed = torch.ops.quantized.linear_prepack(wq, None)
    rows.append(("fbgemm int8 dynamic (act quant)", 8, torch.float32, "no", nk + 8 * N,
                 lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)))
    # _weight_int8pack_mm is symmetric: w = q_int8 * s (scale in the activation dtype)
    w8 = torch.clamp(torch.round(w / (w.abs().amax(1, keepdim=True) / 127)), -127, 127).to(torch.int8)
    sc = (w.abs().amax(1) / 127)
    rows.append(("torch._weight_int8pack_mm", 8, torch.bfloat16, "bf16", nk + 2 * N,
                 lambda x, s=sc.bfloat16(): torch._weight_int8pack_mm(x, w8, s)))
    rows.append(("torch._weight_int8pack_mm", 8, torch.float32, "yes", nk + 4 * N,
                 lambda x, s=sc.float(): torch._weight_int8pack_mm(x, w8, s)))

    # int4 group 64: torch tinygemm-layout kernel
    q4, s4, z4 = rtn_codes(w, 4, GROUP)
    p4 = torch._convert_weight_to_int4pack_for_cpu(q4.int(), 1)
    sz = torch.stack((s4.float(), (8 - z4.float()) * s4.float()), -1).transpose(0, 1).contiguous()
    for dt in (torch.bfloat16, torch.float32):
        rows.append((f"torch._weight_int4pack_mm_for_cpu g{GROUP}", 4, dt, "bf16" if dt == torch.bfloat16 else "yes",
                     nk // 2 + 4 * G * N, lambda x, s=sz.to(dt): torch._weight_int4pack_mm_for_cpu(x, p4, GROUP, s)))

    # plain unpack-then-matmul (4 bits): every call unpacks and de-quantizes the whole weight in torch ops
    from slimswarm.compress.quant.packing import pack_int4, unpack_int4
    p4n = pack_int4(q4)
    sf, zs = s4.float()[..., None], (-z4.float() * s4.float())[..., None]

    def unpack_matmul(x):
        wd = torch.addcmul(zs, unpack_int4(p4n).view(N, G, GROUP).float(), sf).view(N, K)
        return F.linear(x, wd.to(x.dtype))
    for dt in (torch.float32, torch.bfloat16):
        rows.append((f"unpack-then-matmul int4 g{GROUP}", 4, dt, "yes" if dt == torch.float32 else "bf16",
                     nk // 2 + 3 * G * N, unpack_matmul))

    # torchao
    for name, *rest in torchao_modules(w):
        if isinstance(rest[-1], str):
            rows.append((name, 0, rest[0] if len(rest) > 1 else torch.float32, "-", 0, rest[-1]))
        else:
            dt, lin = rest
            b = (nk + 4 * N) if "Int8" in name else (nk // 2 + 4 * G * N)
            rows.append((name, 8 if "Int8" in name else 4, dt, "bf16" if dt == torch.bfloat16 else "yes", b, lin))

    # QuantLinear: each kernel path it can take, and its default dispatch
    for bits, group in ((8, K), (4, GROUP), (3, GROUP), (2, GROUP)):
        q, s, z = rtn_codes(w, bits, group)
        ql = QuantLinear.from_codes(q, s, z, bits, group)
        qlow = QuantLinear.from_codes(q, s, z, bits, group, low_memory=True)
        nbytes = ql.qweight.numel() + 3 * ql.scales.numel()
        gname = "ch" if group == K else f"g{group}"
        for dt in (torch.float32, torch.bfloat16):
            ex = "yes" if dt == torch.float32 else "bf16"
            for k in ("c", "tinygemm"):
                if ql.supports(k, 1, dt):
                    rows.append((f"QuantLinear {bits}b {gname} kernel={k}", bits, dt, "yes" if k == "c" else ex, nbytes,
                                 lambda x, m=ql, k=k: m(x, kernel=k), "decode"))
            mod = qlow if bits in (2, 3) else ql
            rows.append((f"QuantLinear {bits}b {gname} kernel=dequant" + (" (low_memory)" if bits in (2, 3) else ""),
                         bits, dt, ex, nbytes, lambda x, m=mod: m(x, kernel="dequant")))
            rows.append((f"QuantLinear {bits}b {gname} default", bits, dt, "yes" if dt == torch.float32 else "bf16",
                         nbytes, lambda x, m=ql: m(x)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two shapes, short timing budget")
    ap.add_argument("--budget", type=float, default=0.4, help="seconds of timed repeats per row")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    shapes = SHAPES[:2] if args.quick else SHAPES
    budget = 0.1 if args.quick else args.budget
    records = []
    for N, K in shapes:
        w = torch.randn(N, K) * 0.02
        rows = methods(N, K, w)
        for M in BATCHES:
            xf = torch.randn(M, K)
            base = None
            for row in rows:
                name, bits, dt, exact, nbytes, fn = row[:6]
                decode_only = len(row) > 6
                rec = {"shape": f"{N}x{K}", "out": N, "in": K, "tokens": M, "method": name, "bits": bits,
                       "x_dtype": str(dt).replace("torch.", ""), "exact": exact, "weight_bytes": nbytes}
                if isinstance(fn, str):
                    rec["note"] = fn
                    records.append(rec)
                    continue
                if decode_only and M > kernels.MAX_M:
                    continue
                x = xf.to(dt)
                with torch.inference_mode():
                    t, reps = timeit(lambda: fn(x), budget, 200)
                if name == "fp32 F.linear":
                    base = t
                rec.update(us=t * 1e6, reps=reps, speedup_vs_fp32=base / t, gb_s=nbytes / t / 1e9)
                if name.endswith("default"):
                    m = getattr(fn, "__defaults__", None)
                    rec["dispatch"] = m[0].kernel_for(M, dt) if m else None
                records.append(rec)
                print(f"{N}x{K} M={M:<4} {name:48s} {rec['x_dtype']:9s} {t * 1e6:10.1f} us  x{base / t:6.2f}"
                      f"  {rec['gb_s']:6.2f} GB/s" + (f"  -> {rec['dispatch']}" if rec.get("dispatch") else ""),
                      flush=True)
        write(records, args, done=(N, K) == shapes[-1])  # after every shape, so a cut-off run keeps its rows


def write(records, args, done: bool = True) -> None:
    cmd = "cd /work/main && .venv/bin/python benchmarks/quant_kernels.py" + (" --quick" if args.quick else "")
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": 2,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "c_kernels": kernels.available(),
           "loadavg_at_end": os.getloadavg(), "command": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import torchao
        env["torchao"] = torchao.__version__
    except Exception:  # noqa: BLE001
        env["torchao"] = None
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"quant_kernels{suffix}.json").write_text(json.dumps({"env": env, "rows": records}, indent=1))
    lines = [f"# Quantized linear kernels, CPU ({env['cpu_capability']}, 2 threads, torch {env['torch']})", "",
             f"Made by: `{cmd}` on {env['date']}. Median time a call; x{''}: fp32 F.linear time / this time "
             "(above 1 = faster than fp32). GB/s = that method's weight bytes / time. exact: yes = equals "
             "F.linear(x, dequantized W) up to fp32 rounding; bf16 = up to bf16 rounding of weight/scales; "
             "no = a different computation (activations quantized).",
             "",
             "Caveats: hot-cache microbenchmarks (the same weight is read call after call; this CPU has 32 MB of L3, so "
             "an int8 lm_head (28 MB) or any int4 layer can stay in cache, which a whole model would not). "
             "The machine is a 2-vCPU VM shared with other work; single rows can be off by a few ms (look for "
             "values near multiples of 8 ms).", ""]
    notes = sorted({f"{r['method']} ({r['x_dtype']}): {r['note']}" for r in records if "note" in r})
    if notes:
        lines += ["Not measured:", ""] + [f"- {n}" for n in notes] + [""]
    lines += summary(records)
    lines += ["", "## All rows", "", "| shape (out x in) | tokens | method | x dtype | exact | us/call | vs fp32 | GB/s |",
              "|---|---:|---|---|---|---:|---:|---:|"]
    for r in records:
        if "us" not in r:
            continue
        d = f" → {r['dispatch']}" if r.get("dispatch") else ""
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['method']}{d} | {r['x_dtype']} | {r['exact']} | "
                     f"{r['us']:.1f} | {r['speedup_vs_fp32']:.2f} | {r['gb_s']:.2f} |")
    if not done:
        lines.insert(2, "**Partial: the run was still going when this was written.**\n")
    (RESULTS / f"quant_kernels{suffix}.md").write_text("\n".join(lines) + "\n")
    if done:
        print("\n".join(summary(records)))


def summary(records) -> list[str]:
    """QuantLinear default dispatch per bits and x dtype, against fp32 and bf16 F.linear."""
    out = ["## QuantLinear default path (asymmetric min-max; 8 bits per channel, 2/3/4 bits group 64)", "",
           "| shape | tokens | fp32 us | bf16 us | 8b fp32 | 8b bf16 | 4b fp32 | 4b bf16 | 3b fp32 | 3b bf16 | 2b fp32 | 2b bf16 |",
           "|---|---:|---:|---:|---|---|---|---|---|---|---|---|"]
    keyed = {(r["shape"], r["tokens"], r["method"], r["x_dtype"]): r for r in records if "us" in r}
    for shape in dict.fromkeys(r["shape"] for r in records):
        for M in BATCHES:
            f = keyed.get((shape, M, "fp32 F.linear", "float32"))
            b = keyed.get((shape, M, "bf16 F.linear", "bfloat16"))
            if not f:
                continue
            cells = [f"{f['us']:.0f}", f"{b['us']:.0f}"]
            for bits in (8, 4, 3, 2):
                g = "ch" if bits == 8 else f"g{GROUP}"
                for dt in ("float32", "bfloat16"):
                    r = keyed.get((shape, M, f"QuantLinear {bits}b {g} default", dt))
                    cells.append(f"{r['us']:.0f} us x{r['speedup_vs_fp32']:.2f} ({r['dispatch']})" if r else "-")
            out.append(f"| {shape} | {M} | " + " | ".join(cells) + " |")
    out += ["", "x: speedup over fp32 F.linear at the same shape and tokens; (kernel) is the path QuantLinear chose."]
    return out


if __name__ == "__main__":
    sys.exit(main())
