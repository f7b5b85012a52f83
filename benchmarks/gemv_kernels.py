"""Our C linear kernels against PyTorch's (MKL/oneDNN) at SmolLM2's shapes, batch 1 and 8, side by side in one run.

    .venv/bin/python benchmarks/gemv_kernels.py

Each contender rotates over enough weight copies (> 200 MB) that every call reads its weights from DRAM, as decode does.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slimswarm import kernels  # noqa: E402
from slimswarm.compress.quant.linear import QuantLinear  # noqa: E402
from slimswarm.compress.quant.rtn import rtn_quantize  # noqa: E402
from slimswarm.evaluate.report import write_report  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]


def bench(fn, n: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        ts.append((time.perf_counter() - t) / n)
    return statistics.median(ts)


def main() -> None:
    torch.set_num_threads(2)
    assert kernels.available(), kernels.why_unavailable()
    rows = []
    for n, k in SHAPES:
        copies = max(2, 200_000_000 // (n * k * 4))
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(n, k, generator=g) * 0.02 for _ in range(copies)]
        contenders = {
            "torch fp32": ([w for w in ws], lambda x, w: F.linear(x, w), 4.0),
            "torch bf16": ([w.bfloat16() for w in ws], lambda x, w: F.linear(x.bfloat16(), w), 2.0),
            "ours fp32": ([w for w in ws], lambda x, w: kernels.linear_float(x, w), 4.0),
            "ours bf16": ([w.bfloat16() for w in ws], lambda x, w: kernels.linear_float(x, w), 2.0),
            "ours int8 (per channel)": ([QuantLinear.from_codes(*rtn_quantize(w, 8, -1), 8) for w in ws],
                                        lambda x, q: q(x), 1.0 + 3.0 / k),
            "ours int4 g64": ([QuantLinear.from_codes(*rtn_quantize(w, 4, 64), 4) for w in ws], lambda x, q: q(x),
                              0.5 + 3.0 / 64),
        }
        for m in (1, 8):
            x = torch.randn(m, k, generator=g)
            base = None
            for name, (weights, fn, bytes_per) in contenders.items():
                i = [0]

                def call():
                    i[0] = (i[0] + 1) % len(weights)
                    return fn(x, weights[i[0]])

                dt = bench(call, max(3, 20_000_000 // (n * k)))
                base = base or dt
                rows.append({"shape": f"{n}x{k}", "batch": m, "contender": name, "us": dt * 1e6,
                             "weight_gb_s": n * k * bytes_per / dt / 1e9, "speedup_vs_torch_fp32": base / dt})
                print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / "gemv_kernels"
    write_report(rows, out, "python benchmarks/gemv_kernels.py",
                 ["GB/s counts weight bytes only (codes + scales/zeros for quantized); machine bandwidth ~32 GB/s "
                  "(slimswarm bench)", "2 threads; AVX2+FMA kernels (cpu.c), OpenMP over output rows"])
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
