"""Many rows in one decode step: the native step against the Python path (torch's batched matmuls) at 8, 16 and 32
rows, side by side in one process, per checkpoint. The answer to "should the native step take 9-32 rows for this
format" (native.step_for_rows): it takes them for every format since the float tiles (decode.c wf_rows).

Each round runs generate_ids on ROWS prompts of 40 tokens, greedy, with the native step on and then off
(SLIMSWARM_NATIVE=0), order alternating; the decode tok/s are medians over the rounds.

    .venv/bin/python benchmarks/native_rows.py [--work out/vs_llamacpp] [--threads 2] [--rounds 3] [--tokens 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slimswarm import load  # noqa: E402
from slimswarm.evaluate.report import write_report  # noqa: E402
from slimswarm.kernels import native  # noqa: E402
from slimswarm.models.generate import generate_ids  # noqa: E402
from slimswarm.models.sampling import SamplingParams  # noqa: E402


def decode_tok_s(model, rows: int, tokens: int, on: bool) -> float:
    os.environ["SLIMSWARM_NATIVE"] = "1" if on else "0"
    try:
        ids = [list(range(100 + 7 * r, 140 + 7 * r)) for r in range(rows)]
        t = generate_ids(model, ids, SamplingParams(max_tokens=tokens))[0].timings
        return rows * t["decode_steps"] / t["decode_s"]
    finally:
        os.environ.pop("SLIMSWARM_NATIVE", None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "out" / "vs_llamacpp"), help="vs_llamacpp.py's checkpoints")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rows", default="8,16,32")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "native_rows"))
    args = ap.parse_args()
    work = Path(args.work)
    variants = [("fp32", work / "smollm2-135m-f32.gguf", False), ("w8 fp32-act", work / "slimswarm-w8", False),
                ("w4g128", work / "slimswarm-w4g128-rtn", True)]
    missing = [str(p) for _, p, _ in variants if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run benchmarks/vs_llamacpp.py first (it makes them)")
    torch.set_num_threads(args.threads)
    out = []
    with torch.inference_mode():
        for name, path, act8 in variants:
            model = load(str(path)).model
            native.set_act_int8(model, act8)
            for rows in (int(r) for r in args.rows.split(",")):
                res = {True: [], False: []}
                decode_tok_s(model, rows, 2, True)  # warm: the step's build, its buffers
                for r in range(args.rounds):
                    for on in ((True, False) if r % 2 == 0 else (False, True)):
                        res[on].append(decode_tok_s(model, rows, args.tokens, on))
                nat, py = statistics.median(res[True]), statistics.median(res[False])
                row = {"weights": name, "rows": rows, "native_tok_s": nat, "python_tok_s": py, "native_over_python": nat / py,
                       "native_rounds": [round(x, 1) for x in res[True]], "python_rounds": [round(x, 1) for x in res[False]]}
                out.append(row)
                print(f"{name} x{rows}: native {nat:.1f} tok/s, Python path {py:.1f}, {nat / py:.2f}x", flush=True)
            del model
    notes = [f"SmolLM2-135M, {args.threads} threads, generate_ids on ROWS 40-token prompts, {args.tokens} greedy tokens, "
             f"{args.rounds} rounds alternating native on/off, medians; the Python path is torch's batched matmuls",
             f"1-minute load average at the end: {os.getloadavg()[0]:.2f} (a shared 2-vCPU VM)"]
    write_report(out, args.out, "python benchmarks/native_rows.py " + " ".join(sys.argv[1:]), notes)


if __name__ == "__main__":
    main()
