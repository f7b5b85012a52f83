"""Pruning on SmolLM2-135M-Instruct, side by side in one run: dense; magnitude, Wanda and SparseGPT at 50% unstructured
and 2:4; structured 25% (whole layers vs heads + channels). WikiText-2 perplexity (first 32,768 tokens, 1,024-token
windows), KL to dense, parameters, weight bytes, bytes on disk, batch-1 decode tokens/s.

    nice .venv/bin/python benchmarks/prune_distill_smollm2.py            # full run: 32,768 tokens, all configs
    nice .venv/bin/python benchmarks/prune_distill_smollm2.py --quick    # smoke run (fewer tokens and configs)

Peak RSS is about 3-4 GB (the parent model, one measured model, batch logits over a 49k vocabulary).

Every pruned model is saved with ``save_checkpoint`` and measured after ``load`` from that folder, so the bytes on
disk and the speed are those of the stored checkpoint. Calibration: GSM8K / AG News / SST-2 training text
(``compress.calibrate``), never the WikiText-2 test text. The distillation half (healing the structured students with
``compress.distill``) is the ``--distill-steps`` hook: 0 by default, since one KD step of a 135M teacher/student
pair on 4 x 256 tokens costs tens of seconds on this 2-core machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slimswarm import load  # noqa: E402
from slimswarm.compress.calibrate import calibration_batch  # noqa: E402
from slimswarm.compress.prune.apply import param_counts  # noqa: E402
from slimswarm.compress.prune.sparse import SparseLinear  # noqa: E402
from slimswarm.compress.recipe import _validate, apply_recipe  # noqa: E402
from slimswarm.data import default_eval_text  # noqa: E402
from slimswarm.evaluate.kl import kl_divergence  # noqa: E402
from slimswarm.evaluate.perplexity import perplexity  # noqa: E402
from slimswarm.evaluate.report import markdown_table, write_report  # noqa: E402
from slimswarm.evaluate.size import disk_bytes, weight_bytes  # noqa: E402
from slimswarm.evaluate.speed import decode_tokens_per_s  # noqa: E402
from slimswarm.models.checkpoint import save_checkpoint  # noqa: E402

CONFIGS = {  # name -> recipe sections
    "magnitude-50%": {"prune": {"method": "magnitude", "sparsity": 0.5}},
    "wanda-50%": {"prune": {"method": "wanda", "sparsity": 0.5}},
    "sparsegpt-50%": {"prune": {"method": "sparsegpt", "sparsity": 0.5}},
    "magnitude-2:4": {"prune": {"method": "magnitude", "pattern": "2:4"}},
    "wanda-2:4": {"prune": {"method": "wanda", "pattern": "2:4"}},
    "sparsegpt-2:4": {"prune": {"method": "sparsegpt", "pattern": "2:4"}},
    "wanda-4:8": {"prune": {"method": "wanda", "pattern": "4:8"}},
    # structured ~25%: whole layers (block influence) vs heads + channels
    "struct-layers-8of30": {"prune": {"structured": {"layers": 8}}},  # 8 of 30 layers: 26.7% of the decoder
    "struct-layers-10of30": {"prune": {"structured": {"layers": 10}}},  # >= 25% of all bytes (embeddings included)
    "struct-heads+channels-25% (global rank)": {"prune": {"structured": {"heads": 0.25, "channels": 0.25,
                                                                          "scope": "global"}}},
    "struct-heads+channels-25% (per layer)": {"prune": {"structured": {"heads": 0.25, "channels": 0.25}}},
    "struct-heads25+channels35 (per layer)": {"prune": {"structured": {"heads": 0.25, "channels": 0.35}}},
    # low-rank: activation-aware SVD (whitened by the calibration inputs) of every decoder linear at rank 128
    # (the 576x192 KV projections shrink only 11% at that rank), and of the MLPs alone at rank 192
    "svd-llm-r128": {"lowrank": {"rank": 128}},
    "svd-llm-mlp-r192": {"lowrank": {"rank": 192, "targets": ["*.mlp.*"]}},
}
QUICK = ["magnitude-50%", "wanda-2:4", "struct-layers-8of30"]


def csr_vs_dense(sparsity: float = 0.5, repeats: int = 200) -> list[str]:
    """torch.sparse CSR matmul vs dense F.linear at batch-1 decode shapes of this model, measured here."""
    notes = []
    x_shapes = ((576, 576), (1536, 576), (576, 1536))
    for out, inp in x_shapes:
        w = torch.randn(out, inp)
        w = w * (w.abs() > w.abs().quantile(sparsity))
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            csr, x = w.to_sparse_csr(), torch.randn(1, inp)

        def t(f):
            for _ in range(10):
                f()
            s = time.perf_counter()
            for _ in range(repeats):
                f()
            return (time.perf_counter() - s) / repeats * 1e6

        with torch.no_grad():
            dense = t(lambda: torch.nn.functional.linear(x, w))
            sparse = t(lambda: torch.sparse.mm(csr, x.T))
        notes.append(f"[{out}x{inp}] dense {dense:.0f} us, CSR {sparse:.0f} us (CSR/dense time {sparse / dense:.2f})")
    return notes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke run: 4,096 tokens, 3 configs, small calibration")
    ap.add_argument("--configs", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--kl-tokens", type=int, default=4096)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--distill-steps", type=int, default=0, help="hook: heal each structured student this many steps")
    ap.add_argument("--out", help="report stem (default results/prune_distill_smollm2, or ..._quick with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.max_tokens, args.kl_tokens, args.calib_samples, args.speed_rounds = 4096, 1024, 16, 1
    stem = "prune_distill_smollm2" + ("_quick" if args.quick else "")
    args.out = args.out or str(Path(__file__).parent / "results" / stem)
    names = args.configs.split(",") if args.configs else (QUICK if args.quick else list(CONFIGS))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown config {unknown[0]!r} (known: {', '.join(CONFIGS)})")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} nice .venv/bin/python "
               "benchmarks/prune_distill_smollm2.py ") + " ".join(map(shlex.quote, sys.argv[1:]))
    text, source = default_eval_text()
    ref = load("smollm2-135m")
    calib = calibration_batch(ref.tokenizer, None, args.calib_samples, 256)
    tmp = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    rows: list[dict] = []
    paths: dict[str, Path] = {}

    def measure(name: str, path: Path, extra: dict) -> None:
        t = time.perf_counter()
        m = load(path)
        ppl = perplexity(m.model, m.tokenizer, text, 1024, args.max_tokens, source=source)
        kl = {"kl": 0.0, "top1_agreement": 1.0} if name == "dense" else \
            kl_divergence(ref.model, m.model, ref.tokenizer, text, 512, args.kl_tokens, batch_size=1)
        total, nonzero = param_counts(m.model)
        row = {"name": name, "perplexity": ppl.perplexity, "kl": kl["kl"], "top1_agreement": kl["top1_agreement"],
               "params": total, "nonzero_params": nonzero, "weight_bytes": weight_bytes(m.model),
               "disk_bytes": disk_bytes(path), **extra}
        decode_tokens_per_s(m.model, 1, 8, repeats=1)  # builds SparseLinear's dense copies, counted below
        # SparseLinear keeps a dense copy for its forward (no faster sparse kernel here): count what RAM holds.
        cached = sum(mod._cache["dense"].weight.numel() * mod._cache["dense"].weight.element_size()
                     for mod in m.model.modules() if isinstance(mod, SparseLinear) and "dense" in mod._cache)
        row["runtime_weight_bytes"] = row["weight_bytes"] + cached
        rows.append(row)
        paths[name] = path
        write_report(rows, args.out, command + "  (partial: run in progress)", [])  # survives an interrupted run
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
              f"({time.perf_counter() - t:.0f}s)", flush=True)

    save_checkpoint(ref.model, ref.tokenizer, tmp / "dense", {"recipe": None})
    measure("dense", tmp / "dense", {"prune_s": 0.0})
    for name in names:
        recipe = _validate({"name": name, **CONFIGS[name]}, name)
        work = load("smollm2-135m")
        t = time.perf_counter()
        meta = apply_recipe(work.model, recipe, calib)
        secs = time.perf_counter() - t
        out = save_checkpoint(work.model, work.tokenizer, tmp / "".join(c if c.isalnum() or c in "-_" else "_" for c in name),
                              {"recipe": recipe.model_dump(), "pruning": meta.get("prune", {}),
                               "lowrank": meta.get("lowrank", {})})
        if not args.distill_steps:
            del work  # measure() reloads from disk; two resident 135M models plus logits once hit the OOM killer
            gc.collect()
        measure(name, out, {"prune_s": round(secs, 1)})
        if args.distill_steps and recipe.prune is not None and recipe.prune.structured is not None:
            from slimswarm.compress.distill import DistillConfig, distill

            cfg = DistillConfig(steps=args.distill_steps, batch_size=4, seq_len=256, save_every=0)
            t = time.perf_counter()
            res = distill(ref.model, work.model, work.tokenizer, cfg, tmp / f"{name}-distill")
            measure(f"{name} + distill {args.distill_steps} steps", res.student_dir,
                    {"prune_s": round(secs, 1), "distill_s": round(time.perf_counter() - t, 1)})
            del work
    # Speed last, round-robin over the saved checkpoints (median of 3 rounds): this host is shared, and load
    # drifts over a run, so configurations are timed interleaved rather than minutes apart.
    speeds: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(args.speed_rounds):
        for name, path in paths.items():
            m = load(path)
            speeds[name].append(decode_tokens_per_s(m.model, 1, 32, repeats=1))
            del m
    for r in rows:
        r["decode_tokens_per_s"] = statistics.median(speeds[r["name"]])
    dense = rows[0]
    for r in rows:
        r["delta_ppl_pct"] = 100 * (r["perplexity"] / dense["perplexity"] - 1)
        r["disk_vs_dense"] = r["disk_bytes"] / dense["disk_bytes"]
        r["decode_speedup"] = r["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    notes = [
        f"WikiText-2 test, first {args.max_tokens:,} tokens, 1,024-token windows; KL(dense || pruned) on "
        f"{args.kl_tokens:,} tokens in 512-token windows; calibration: {args.calib_samples} x 256 tokens of "
        "GSM8K/AG News/SST-2 train text. Pruned: every linear of the 30 decoder layers; embeddings/LM head (tied) stay dense.",
        "SmolLM2-135M-Instruct was published as Q4_1 (blocks of 32, 4-bit) with Q8_0 embeddings; 'dense' is that GGUF "
        "de-quantized to fp32, the parent of every row.",
        "Unstructured and 2:4 rows are stored as SparseLinear (2:4: half the values + 2-bit in-group indices; 50%: "
        "bitmask + values), so disk_bytes really shrinks. They run through a dense copy built at the first forward: "
        "no speed gain (decode_speedup ~1 at best) and more RAM, not less (runtime_weight_bytes). A 2:4 speed-up needs "
        "sparse tensor cores (GPUs); on this CPU torch.sparse CSR is slower than the dense matmul at decode shapes:",
        *csr_vs_dense(),
        f"Decode tokens/s: batch 1, 32 new tokens, median of {args.speed_rounds} interleaved rounds; the host has 2 cores "
        f"shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end of this run), so absolute speeds "
        "are low and noisy; compare rows only as ratios.",
        "Per-layer head removal rounds per layer: SmolLM2 has 3 KV head groups a layer, so 'heads 25%' per layer "
        "removes one group (a third of the attention); the params column is what was removed.",
        "Structured and low-rank rows really shrink parameters, bytes and decode time (smaller or fewer tensors). They "
        "are reported here without any healing fine-tune (--distill-steps 0); distill_smollm2*.md has the same students "
        "after distillation (KD vs CE at equal tokens).",
    ]
    cols = ["name", "perplexity", "delta_ppl_pct", "kl", "top1_agreement", "params", "nonzero_params", "weight_bytes",
            "runtime_weight_bytes", "disk_bytes", "disk_vs_dense", "decode_tokens_per_s", "decode_speedup", "prune_s"]
    rows = [{c: r.get(c) for c in cols if c in r} | {k: v for k, v in r.items() if k not in cols} for r in rows]
    paths = write_report(rows, args.out, command, notes)
    shutil.rmtree(tmp, ignore_errors=True)
    print(markdown_table(rows, cols))
    print("\n".join(f"- {n}" for n in notes))
    print("report:", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
