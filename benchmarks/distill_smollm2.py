"""The distillation half of prune_distill_smollm2 (issue 4): heal structured students of SmolLM2-135M-Instruct with
plain cross-entropy fine-tuning (``DistillConfig(mode="ce")``) and with knowledge distillation from the unpruned
model (``mode="kd"``), on exactly the same training tokens, and measure each student before and after.

    OMP_NUM_THREADS=2 nice -n 19 .venv/bin/python benchmarks/distill_smollm2.py --steps 30

Columns: WikiText-2 test perplexity, KL(teacher || student) on WikiText-2 test, parameters, weight bytes, training
seconds and tokens seen. Training text: the default training-split calibration text (GSM8K / AG News / SST-2 train),
never the WikiText-2 test text. Each run's loss curve is copied to results/distill_smollm2_<student>_<mode>.png.

Training state lives in ``--work`` (default /tmp/distill-smollm2): a killed run re-started with the same arguments
continues every training run from its last checkpoint (``distill`` resumes exactly).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import shlex
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slimswarm import load  # noqa: E402
from slimswarm.compress.calibrate import calibration_batch, default_calibration_text  # noqa: E402
from slimswarm.compress.distill import DistillConfig, distill  # noqa: E402
from slimswarm.compress.prune.apply import param_counts  # noqa: E402
from slimswarm.compress.recipe import _validate, apply_recipe  # noqa: E402
from slimswarm.data import default_eval_text  # noqa: E402
from slimswarm.evaluate.kl import kl_divergence  # noqa: E402
from slimswarm.evaluate.perplexity import perplexity  # noqa: E402
from slimswarm.evaluate.report import markdown_table, write_report  # noqa: E402
from slimswarm.evaluate.size import weight_bytes  # noqa: E402
from slimswarm.evaluate.speed import decode_tokens_per_s  # noqa: E402

STUDENTS = {
    "struct-layers-8of30": {"structured": {"layers": 8}},  # 0.79x the teacher's bytes
    "struct-layers-10of30": {"structured": {"layers": 10}},  # 0.74x
    # a quarter of the KV head groups and 35% of the MLP channels in every layer: 0.73x
    "struct-heads25+channels35": {"structured": {"heads": 0.25, "channels": 0.35, "scope": "layer"}},
}
COLS = ["name", "student", "stage", "perplexity", "ppl_vs_teacher", "kl", "top1_agreement", "params", "weight_bytes",
        "bytes_vs_teacher", "decode_speedup", "train_s", "tokens_seen", "final_train_loss", "final_train_ce"]


def speed_check(models: dict, rounds: int) -> dict[str, float]:
    """Batch-1 decode tokens/s of each model, median of ``rounds`` rounds interleaved over the models (this host is
    shared, so models are timed round-robin rather than minutes apart)."""
    rates: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(rounds):
        for n, m in models.items():
            m.clear_cache()
            rates[n].append(decode_tokens_per_s(m, 1, 32, repeats=1))
    return {n: statistics.median(v) for n, v in rates.items()}


def apply_speeds(rows: list[dict], speeds: dict[str, float]) -> None:
    for r in rows:
        key = "teacher" if r["stage"] == "teacher" else r["student"]
        if key in speeds:
            r["decode_tokens_per_s"] = speeds[key]
            r["decode_speedup"] = speeds[key] / speeds["teacher"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--students", default="struct-layers-8of30", help=f"comma-separated subset of {', '.join(STUDENTS)}")
    ap.add_argument("--modes", default="ce,kd")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-chars", type=int, default=400_000,
                    help="characters of training-split text to distill on (GSM8K / AG News / SST-2 train, interleaved)")
    ap.add_argument("--max-tokens", type=int, default=8192, help="WikiText-2 test tokens for perplexity")
    ap.add_argument("--kl-tokens", type=int, default=1024)
    ap.add_argument("--calib-samples", type=int, default=16, help="pruning calibration: samples x 256 tokens")
    ap.add_argument("--speed-rounds", type=int, default=3, help="0: skip the decode speed check")
    ap.add_argument("--append", action="store_true", help="add rows to the existing report (teacher row reused)")
    ap.add_argument("--speed-only", action="store_true",
                    help="only (re)measure decode speed of the teacher and the trained students in --work, "
                         "and update the existing report")
    ap.add_argument("--work", default="/tmp/distill-smollm2")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill_smollm2"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} nice -n 19 .venv/bin/python "
               "benchmarks/distill_smollm2.py " + " ".join(map(shlex.quote, sys.argv[1:])))
    names = args.students.split(",")
    modes = args.modes.split(",")
    work_dir, out = Path(args.work), Path(args.out)
    text, source = default_eval_text()
    ref = load("smollm2-135m")
    teacher = ref.model.eval()
    tok = ref.tokenizer
    calib = calibration_batch(tok, None, args.calib_samples, 256)
    train_text = default_calibration_text(args.train_chars)
    rows: list[dict] = []
    notes: list[str] = []
    prev = json.loads(out.with_suffix(".json").read_text()) if (args.append or args.speed_only) else None
    if prev is not None:
        rows, notes = prev["rows"], prev["notes"]
        command = prev["command"].replace("  (partial: run in progress)", "") + " ; " + command
    if args.speed_only:
        models = {"teacher": teacher}
        for r in rows:
            if r["stage"] != "teacher" and r["student"] not in models:
                models[r["student"]] = load(work_dir / f"{r['student']}-{modes[0]}" / "student").model
        speeds = speed_check(models, args.speed_rounds)
        apply_speeds(rows, speeds)
        notes = [n for n in notes if not n.startswith("decode_speedup")] + [
            f"decode_speedup: batch-1 decode of 32 new tokens vs the teacher, median of {args.speed_rounds} rounds "
            "interleaved over the models (--speed-only, after training: trained students, same architecture as "
            f"before training); load average {os.getloadavg()[0]:.1f} at the end."]
        write_report(rows, out, command, notes)
        print(markdown_table(rows, COLS))
        return

    def measure(name: str, student: str, stage: str, model, extra: dict) -> dict:
        t = time.perf_counter()
        model.eval()
        with torch.no_grad():
            ppl = perplexity(model, tok, text, 1024, args.max_tokens, source=source)
            kl = {"kl": 0.0, "top1_agreement": 1.0} if model is teacher else \
                kl_divergence(teacher, model, tok, text, 512, args.kl_tokens, batch_size=1)
        total, _ = param_counts(model)
        row = {"name": name, "student": student, "stage": stage, "perplexity": ppl.perplexity,
               "kl": kl["kl"], "top1_agreement": kl["top1_agreement"], "params": total,
               "weight_bytes": weight_bytes(model), "ppl_tokens": ppl.tokens, **extra}
        base = rows[0] if rows else row  # rows[0]: the teacher
        row["ppl_vs_teacher"] = row["perplexity"] / base["perplexity"]
        row["bytes_vs_teacher"] = row["weight_bytes"] / base["weight_bytes"]
        rows.append(row)
        write_report(rows, out, command + "  (partial: run in progress)", notes)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
              f"(eval {time.perf_counter() - t:.0f}s)", flush=True)
        return row

    if prev is None:
        measure("teacher (dense)", "-", "teacher", teacher, {})
    timed = {"teacher": teacher}
    for sname in names:
        recipe = _validate({"name": sname, "prune": STUDENTS[sname]}, sname)
        work = load("smollm2-135m")
        meta = apply_recipe(work.model, recipe, calib)
        base = work.model
        del work
        gc.collect()
        timed[sname] = base  # timed at the end; training does not change the architecture
        sp: dict = {}
        measure(f"{sname}: before", sname, "pruned, no training", base, sp)
        for mode in modes:
            student = copy.deepcopy(base)
            cfg = DistillConfig(mode=mode, alpha=args.alpha, temperature=args.temperature, steps=args.steps,
                                batch_size=args.batch, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                                seed=args.seed, save_every=max(15, args.steps // 10))
            run_dir = work_dir / f"{sname}-{mode}"
            t = time.perf_counter()
            last = [t]

            def on_step(rec, last=last):
                now = time.perf_counter()
                print(f"  {mode} step {rec['step']}/{cfg.steps} loss {rec['loss']:.4f} ce {rec['ce']:.4f} "
                      f"kl {rec['kl']:.4f} ({now - last[0]:.1f}s)", flush=True)
                last[0] = now

            res = distill(teacher if mode == "kd" else None, student, tok, cfg, run_dir, on_step=on_step,
                          text=train_text, meta={"recipe": recipe.model_dump(), "pruning": meta.get("prune", {})})
            secs = time.perf_counter() - t
            png = out.parent / f"{out.name}_{sname.replace('%', 'pct').replace('+', '_')}_{mode}.png"
            shutil.copyfile(run_dir / "loss.png", png)
            h = res.history
            measure(f"{sname}: {mode} {cfg.steps} steps", sname, f"{mode} fine-tune", student,
                    {**sp, "steps": cfg.steps, "batch": cfg.batch_size, "seq_len": cfg.seq_len, "lr": cfg.lr,
                     "train_chars": args.train_chars, "train_s": round(secs, 1), "resumed_from": res.resumed_from,
                     "tokens_seen": sum(r["tokens"] for r in h), "final_train_loss": h[-1]["loss"],
                     "final_train_ce": h[-1]["ce"], "loss_png": png.name})
            del student
            gc.collect()
    if args.speed_rounds:
        apply_speeds(rows, speed_check(timed, args.speed_rounds))
    if prev is not None and args.speed_rounds:  # the new speeds replace the old note; without them it stays
        notes = [n for n in notes if not n.startswith("decode_speedup")]
    notes += [] if prev is not None else [
        f"WikiText-2 test, first {args.max_tokens:,} tokens, 1,024-token windows; KL(teacher || student) per token in "
        f"nats on the first {args.kl_tokens:,} WikiText-2 test tokens in 512-token windows.",
        "Teacher: SmolLM2-135M-Instruct (published Q4_1 GGUF de-quantized to fp32); students are structured prunes of it "
        f"(block influence / head energy / Wanda channel scores from {args.calib_samples} x 256 calibration tokens).",
        f"Training: {args.steps} steps x batch {args.batch} x seq_len {args.seq_len} = "
        f"{args.steps * args.batch * args.seq_len:,} tokens, identical token blocks for ce and kd (seed {args.seed}), "
        f"AdamW lr {args.lr} (warmup {args.warmup}, cosine to 10%), weight decay 0.01, grad clip 1.0; kd: alpha "
        f"{args.alpha}, T {args.temperature}. Text: the default training-split calibration text (GSM8K / AG News / "
        "SST-2 train), never WikiText-2.",
        "final_train_loss / final_train_ce: the last training step's loss on its batch (kd loss = alpha*CE + "
        "(1-alpha)*T^2*KL, so the two modes' losses are not comparable; ce is).",
        "train_s is wall time on a niced, shared 2-core CPU (OMP_NUM_THREADS=2): kd also runs a teacher forward.",
    ]
    if args.speed_rounds:
        notes.append(f"decode_speedup: batch-1 decode of 32 new tokens vs the teacher, median of {args.speed_rounds} "
                     "rounds interleaved over the models at the end of the run (a student's speed is the same before "
                     f"and after training: same architecture); load average {os.getloadavg()[0]:.1f} at the end.")
    write_report(rows, out, command, notes)
    print(markdown_table(rows, COLS))


if __name__ == "__main__":
    main()
