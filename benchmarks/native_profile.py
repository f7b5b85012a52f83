"""Where a native decode step's time goes, phase by phase, on SmolLM2-135M checkpoints (the answer to "why is it not
faster than llama.cpp yet"): q/k/v, attention, o_proj, gate/up, down, the LM head, barrier waits, and the Python
around the C call (signature check, tensors, argmax), per weight format, activation mode and thread count.

It builds its own copy of kernels/decode.c with -DSS_PROFILE (thread 0 times each phase; the others' share shows
as barrier waits) and decodes one sequence after a 64-token prompt. The phase times sum to the C call; each phase's
effective bandwidth is its weight bytes over its time.

    .venv/bin/python benchmarks/native_profile.py [--work out/vs_llamacpp] [--threads 1,2] [--steps 64]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slimswarm import load  # noqa: E402
from slimswarm.evaluate.report import write_report  # noqa: E402
from slimswarm.kernels import native  # noqa: E402

PHASES = ("qkv", "attention", "o_proj", "gate_up", "down", "head")


def profiled_library(isa: str) -> ctypes.CDLL:
    so = Path(tempfile.mkdtemp()) / "decode-prof.so"
    cmd = [os.environ.get("CC", "cc"), "-O3", "-DSS_PROFILE", *native.ISA_FLAGS[isa], "-pthread", "-shared", "-fPIC",
           "-Wl,-Bsymbolic", str(native._SRC), "-o", str(so), "-lm"]
    subprocess.run(cmd, check=True)
    return native.bind(ctypes.CDLL(str(so)))


def linear_bytes(model) -> dict[str, int]:
    """Weight bytes each phase reads (codes + scales/zeros as the step reads them)."""
    def nb(mod) -> int:
        d = native._weight_of(getattr(mod, "base", mod), "")
        return sum(t.numel() * t.element_size() for t in (d["codes"], d["scale"], d["zero"]) if t is not None)
    out = dict.fromkeys(PHASES, 0)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out["qkv"] += nb(a.q_proj) + nb(a.k_proj) + nb(a.v_proj)
        out["o_proj"] += nb(a.o_proj)
        out["gate_up"] += nb(m.gate_proj) + nb(m.up_proj)
        out["down"] += nb(m.down_proj)
    out["head"] = nb(model.lm_head)
    return out


def profile_rows8(name: str, path: Path, act8: bool, threads: list[int], steps: int, prof) -> list[dict]:
    """8 rows at different positions in one step, first on the base alone, then with 8 different random rank-8 LoRA
    adapters (every projection), as the engine runs vs_llamacpp's 8-row case."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from team_throughput import random_adapter

    from slimswarm.compress.lora import AdapterBank

    model = load(str(path)).model
    native.set_act_int8(model, act8)
    by = linear_bytes(model)
    bank = AdapterBank(model, {f"agent{i}": random_adapter(model, i) for i in range(8)})
    out = []
    for adapters in (False, True):
        for nth in threads:
            torch.set_num_threads(nth)
            with torch.inference_mode():
                model.setup_cache(8, 64 + steps + 16)
                bank.set_rows([None] * 8)
                model(torch.tensor([list(range(100, 164))] * 8), 0, last_only=True)
                bank.set_rows([f"agent{i}" for i in range(8)] if adapters else [None] * 8)
                tok = torch.full((8, 1), 300)
                start = torch.arange(56, 64) + 1  # mixed positions, as a continuous batch has them
                for j in range(4):
                    model(tok, start + j, None, last_only=True, row0=0)
                for i in range(8):
                    prof[i] = 0.0
                t0 = time.perf_counter()
                for j in range(steps):
                    lg = model(tok, start + 4 + j, None, last_only=True, row0=0)[:, -1]
                    tok = torch.tensor(native.argmax_rows(lg))[:, None]  # in C: no OpenMP region between steps
                wall = (time.perf_counter() - t0) / steps
            model.clear_cache()
            ph = {p: 1000 * prof[i] / steps for i, p in enumerate(PHASES)}
            c_ms = sum(ph.values()) + 1000 * prof[7] / steps
            row = {"weights": name + (" x8 rows, 8 adapters" if adapters else " x8 rows"),
                   "activations": "int8" if act8 else "fp32", "threads": nth,
                   "step_ms": 1000 * wall, "c_call_ms": c_ms, "python_ms": 1000 * wall - c_ms,
                   **{f"{p}_ms": ph[p] for p in PHASES}, "barrier_wait_ms": 1000 * prof[7] / steps,
                   **{f"{p}_gb_s": by[p] / (ph[p] / 1000) / 1e9 if ph[p] else None for p in ("gate_up", "head")},
                   "tokens_per_s": 8 / wall}
            out.append(row)
            print(f"{row['weights']} act {row['activations']} x{nth}: {row['step_ms']:.2f} ms/step (C {c_ms:.2f}): "
                  + ", ".join(f"{p} {ph[p]:.2f}" for p in PHASES) + f", barriers {row['barrier_wait_ms']:.2f}, "
                  f"{row['tokens_per_s']:.1f} tok/s", flush=True)
    bank.set_rows([None] * 8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "out" / "vs_llamacpp"), help="vs_llamacpp.py's checkpoints")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rows8", action="store_true",
                    help="also profile 8 rows at once (w4g128 int8 activations) without and with 8 different LoRA "
                         "adapters (the vs_llamacpp 8-row case)")
    ap.add_argument("--only-rows8", action="store_true", help="only the 8-row profile")
    ap.add_argument("--rows8-weights", default="w4g128",
                    help="comma-separated weights for the 8-row profile: w4g128 (int8 activations), fp32")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "native_profile"))
    args = ap.parse_args()
    work = Path(args.work)
    variants = [("fp32", work / "smollm2-135m-f32.gguf", False), ("w8", work / "slimswarm-w8", False),
                ("w8", work / "slimswarm-w8", True), ("w4g128", work / "slimswarm-w4g128-rtn", False),
                ("w4g128", work / "slimswarm-w4g128-rtn", True)]
    missing = [str(p) for _, p, _ in variants if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run benchmarks/vs_llamacpp.py first (it makes them)")
    isa = native.pick_isa()
    lib = profiled_library(isa)
    native._libs[isa] = lib
    prof = (ctypes.c_double * 8).in_dll(lib, "ss_prof")
    rows = []
    ids = list(range(100, 164))
    if args.only_rows8:
        variants = []
    if args.rows8 or args.only_rows8:
        known = {"w4g128": ("w4g128", work / "slimswarm-w4g128-rtn", True),
                 "fp32": ("fp32", work / "smollm2-135m-f32.gguf", False)}
        bad = [w for w in args.rows8_weights.split(",") if w not in known]
        if bad:
            raise SystemExit(f"--rows8-weights: unknown {bad[0]!r} (known: {', '.join(known)})")
        variants_rows8 = [known[w] for w in args.rows8_weights.split(",")]
    else:
        variants_rows8 = []
    for name, path, act8 in variants:
        model = load(str(path)).model
        native.set_act_int8(model, act8)
        by = linear_bytes(model)
        for nth in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(nth)
            with torch.inference_mode():
                model.setup_cache(1, len(ids) + args.steps + 8)
                model(torch.tensor([ids]), 0, last_only=True)
                tok = torch.tensor([[300]])
                for j in range(8):  # warm: step built, pool started, pages touched
                    model(tok, len(ids) + j)
                for i in range(8):
                    prof[i] = 0.0
                st = native.step_for(model)
                c_s, orig = [0.0], st.lib.ss_decode
                t0 = time.perf_counter()
                for j in range(args.steps):
                    pos = len(ids) + j
                    t1 = time.perf_counter()
                    lg = model(tok, pos)[:, -1]
                    tok = torch.tensor(native.argmax_rows(lg))[:, None]  # in C: no OpenMP region between steps
                    c_s[0] += time.perf_counter() - t1
                wall = (time.perf_counter() - t0) / args.steps
            model.clear_cache()
            ph = {p: 1000 * prof[i] / args.steps for i, p in enumerate(PHASES)}
            c_ms = sum(ph.values()) + 1000 * prof[7] / args.steps
            row = {"weights": name, "activations": "int8" if act8 else "fp32", "threads": nth,
                   "step_ms": 1000 * wall, "c_call_ms": c_ms, "python_ms": 1000 * wall - c_ms,
                   **{f"{p}_ms": ph[p] for p in PHASES}, "barrier_wait_ms": 1000 * prof[7] / args.steps,
                   **{f"{p}_gb_s": by[p] / (ph[p] / 1000) / 1e9 if ph[p] else None for p in ("gate_up", "head")},
                   "tokens_per_s": 1 / wall}
            rows.append(row)
            print(f"{name} act {row['activations']} x{nth}: {row['step_ms']:.2f} ms/step (C {c_ms:.2f}): "
                  + ", ".join(f"{p} {ph[p]:.2f}" for p in PHASES) + f", barriers {row['barrier_wait_ms']:.2f}",
                  flush=True)
            del orig
    for name, path, act8 in variants_rows8:
        rows += profile_rows8(name, path, act8, [int(t) for t in args.threads.split(",")], args.steps, prof)
    load_avg = os.getloadavg()
    notes = [f"ISA {isa}; one sequence, {args.steps} greedy steps after a 64-token prompt; thread 0's clock per phase "
             "(with 2 threads a phase's time includes waiting for the slower thread only at the barrier that ends it)",
             "python_ms = the whole step (model forward + argmax) minus the C call: the signature check, tensor "
             "conversions, the logits tensor",
             f"1-minute load average at the end: {load_avg[0]:.2f} (other jobs on this 2-vCPU VM skew every figure)"]
    write_report(rows, args.out, "python benchmarks/native_profile.py " + " ".join(sys.argv[1:]), notes)


if __name__ == "__main__":
    main()
