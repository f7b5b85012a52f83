"""Quantization presets on SmolLM2-135M-Instruct, side by side in one run: bytes on disk, WikiText-2 perplexity
(first 32,768 tokens, 1,024-token windows), KL to fp32, decode tokens/s at batch 1 and 8, fraction of the bound.

    .venv/bin/python benchmarks/quant_smollm2.py [--presets w8,w4g128-rtn,...] [--max-tokens 32768]
        [--llamacpp Q4_0,IQ4_NL,Q4_K_M,Q3_K_M,Q8_0] [--torchao ''] [--out benchmarks/results/quant_smollm2_budget]
        [--checkpoints DIR]  (score presets already built in DIR/PRESET with exactly the preset's recipe)

Beside ours: llama.cpp's own quantizer on the same weights (``llama_cpp.llama_model_quantize``), scored by llama.cpp
on the same token ids, and torchao's CPU configs. Writes OUT.json/.md/.png and OUT_pareto.png (bytes vs ΔPPL).

Caveat (data README): this model was published as Q4_1 (4-bit, asymmetric, blocks of 32) with Q8_0 embeddings, so
its weights already lie on a 4-bit grid and re-quantizing with blocks of 32 is artificially lossless. The presets
use groups of 128 (96 on the 576-wide layers, where 128 does not divide the width) and 64, per-channel int8 and
3-bit, where the grid does not line up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slimswarm import load  # noqa: E402
from slimswarm.compress.calibrate import calibration_batch  # noqa: E402
from slimswarm.compress.quant.apply import quantize_model  # noqa: E402
from slimswarm.compress.recipe import load_recipe  # noqa: E402
from slimswarm.data import data_path  # noqa: E402
from slimswarm.evaluate.perplexity import perplexity, windows_of  # noqa: E402
from slimswarm.evaluate.report import write_report  # noqa: E402
from slimswarm.evaluate.size import decode_bytes_per_token, disk_bytes  # noqa: E402
from slimswarm.evaluate.speed import decode_tokens_per_s, measure_bandwidth  # noqa: E402
from slimswarm.models.checkpoint import save_checkpoint  # noqa: E402
from slimswarm.models.load import smollm2_gguf_path  # noqa: E402

DEFAULT = "w8,w4g128-rtn,w4g128-gptq,w4g128-awq,w4g64-rtn,w4g64-gptq,w3g128-gptq,w4g64-gptq-imatrix,mixed-93mb,mixed-105mb,mixed-75mb"
LLAMACPP = "Q4_0,IQ4_NL,Q4_K_M,Q3_K_M,Q8_0"
# Layouts that do not line up with the Q4_1 grid the model was published on (blocks of 32 with a min): the goals
# count only these (symmetric, non-linear codebooks, or groups other than 32 and its divisors).
ALIGNED = {"Q4_1", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S"}  # 32-element (sub-)blocks with a min


def reference_logprobs(model, seqs, batch_size: int = 4) -> list[torch.Tensor]:
    """log P_fp32 for the KL windows, computed once and reused by every row (ours and llama.cpp's)."""
    import torch.nn.functional as F

    out = []
    with torch.inference_mode():
        for i in range(0, len(seqs), batch_size):
            out.extend(F.log_softmax(model(torch.tensor(seqs[i : i + batch_size])).float(), -1))
    return out


def kl_from_logprobs(ref_lp: list[torch.Tensor], cand_lp: list[torch.Tensor]) -> dict:
    import torch.nn.functional as F

    total, agree, count = 0.0, 0, 0
    for p, q in zip(ref_lp, cand_lp):
        total += F.kl_div(q, p, log_target=True, reduction="sum").item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        count += p.shape[0]
    return {"kl": total / count, "top1_agreement": agree / count}


def llamacpp_rows(args, ppl_seqs, kl_seqs, ref_lp, tmp: Path, rows: list, measure_row) -> None:
    """llama.cpp's own quantizer on the same weights (the shipped Q4_1 GGUF re-quantized with allow_requantize: it
    de-quantizes each tensor to f32 first, the same weights our fp32 row holds), evaluated by llama.cpp itself on the
    same token ids: perplexity from its logits for every window, KL and top-1 against our fp32 log-probs."""
    import ctypes

    import numpy as np
    import torch.nn.functional as F

    try:
        import llama_cpp
    except ImportError as e:
        rows.append({"name": "llama.cpp (not installed)", "error": str(e)})
        return
    src = smollm2_gguf_path()
    for name in [n for n in args.llamacpp.split(",") if n]:
        out = tmp / f"llamacpp-{name}.gguf"
        qp = llama_cpp.llama_model_quantize_default_params()
        qp.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        qp.allow_requantize = True
        qp.nthread = torch.get_num_threads()
        t = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(qp))
        secs = time.perf_counter() - t
        if rc != 0:
            rows.append({"name": f"llama.cpp {name}", "error": f"llama_model_quantize returned {rc}"})
            continue
        t = time.perf_counter()
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=1024, n_batch=1024, n_ubatch=1024, logits_all=True,
                              n_threads=torch.get_num_threads(), verbose=False)

        def logprobs(seq):
            llm.reset()
            llm.eval(seq)
            z = torch.from_numpy(np.array(llm.scores[: len(seq)], dtype=np.float32))
            return F.log_softmax(z, -1)

        nll, count = 0.0, 0
        for seq in ppl_seqs:
            lp = logprobs(seq)[:-1]
            nll -= lp.gather(1, torch.tensor(seq[1:])[:, None]).sum().item()
            count += len(seq) - 1
        kl = kl_from_logprobs(ref_lp, [logprobs(s) for s in kl_seqs])
        # decode at batch 1: 48 greedy tokens after a short prompt, llama.cpp's own loop
        llm.reset()
        llm.eval(ppl_seqs[0][:16])
        t0 = time.perf_counter()
        for _ in range(48):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        d1 = 48 / (time.perf_counter() - t0)
        del llm
        import math

        measure_row(f"llama.cpp {name}", out.stat().st_size, math.exp(nll / count), count, kl, d1,
                    {"quantize_s": secs, "eval_s": time.perf_counter() - t, "aligned_with_q4_1": name in ALIGNED})


def pareto_plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if "delta_ppl_pct" not in r or r["name"] in ("fp32", "bf16") or r["disk_bytes"] > 160e6:
            continue
        ours = not r["name"].startswith(("llama.cpp", "torchao"))
        ax.scatter(r["disk_bytes"] / 1e6, r["delta_ppl_pct"], marker="o" if ours else "s",
                   color="tab:blue" if ours else ("tab:gray" if r.get("aligned_with_q4_1") else "tab:red"))
        ax.annotate(r["name"].replace("llama.cpp ", "lc "), (r["disk_bytes"] / 1e6, r["delta_ppl_pct"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    for mb, goal in ((75, 25), (93.5, 10), (105, 5)):
        ax.plot([mb], [goal], marker="*", color="gold", markersize=12, markeredgecolor="k")
    ax.set_xlabel("bytes on disk (MB)")
    ax.set_ylabel("ΔPPL vs fp32 (%)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: bytes vs ΔPPL (blue: slimswarm, red: llama.cpp, grey: Q4_1-aligned, stars: goals)",
                 fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def torchao_config(name: str):
    import torchao.quantization as tq
    from torchao.quantization.granularity import PerGroup

    if name == "int8wo":
        return tq.Int8WeightOnlyConfig()
    if name == "int8dyn":  # quantizes activations too: a different model, and no win at batch 1
        return tq.Int8DynamicActivationInt8WeightConfig()
    if name.startswith("int4wo-g"):
        return tq.Int4WeightOnlyConfig(group_size=int(name.split("-g")[1]))
    if name.startswith("intx4-g"):
        return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(int(name.split("-g")[1])))
    raise ValueError(name)


def torchao_rows(measure, rows) -> None:
    """torchao's CPU configs on the same model (decoder linears; embeddings/LM head stay float)."""
    import warnings

    warnings.simplefilter("ignore")
    try:
        from torchao.quantization import quantize_
    except ImportError as e:
        rows.append({"name": "torchao (not installed)", "error": str(e)})
        return
    for name in [n for n in measure.torchao.split(",") if n]:
        m = load("smollm2-135m")
        t = time.perf_counter()
        try:
            quantize_(m.model.model.layers, torchao_config(name))
            with torch.inference_mode():
                m.model(torch.tensor([[1, 2, 3]]))
        except Exception as e:  # a config that has no CPU path here
            rows.append({"name": f"torchao {name}", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            print(rows[-1], flush=True)
            continue
        secs = time.perf_counter() - t
        import io

        buf = io.BytesIO()
        torch.save(m.model.state_dict(), buf)  # torchao tensors do not go to safetensors; torch.save shows their bytes
        measure(f"torchao {name}", m, buf.tell(), {"quantize_s": secs})
        del m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default=DEFAULT)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--kl-tokens", type=int, default=8192)
    ap.add_argument("--llamacpp", default=LLAMACPP, help="llama.cpp ftypes to run beside ours ('' for none)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 row")
    ap.add_argument("--no-fp32", action="store_true",
                    help="skip the fp32 row (another process measures it; merge with --rows-from --report-only)")
    ap.add_argument("--torchao", default="int8wo,int8dyn,int4wo-g64,intx4-g64",
                    help="torchao 0.18 configs to run beside ours ('' for none)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_smollm2"))
    ap.add_argument("--speed-only", metavar="DIR",
                    help="re-measure decode speed (and nothing else) of a finished run's checkpoints in DIR "
                         "(its temporary folder, printed at the start) in a quiet moment, side by side in one pass")
    ap.add_argument("--rows-from", metavar="LOG", action="append",
                    help="take the rows a run printed to LOG (repeatable: runs split over processes); measure the rest")
    ap.add_argument("--checkpoints", metavar="DIR",
                    help="score the preset checkpoints already built in DIR/PRESET (by this code: its slimswarm.json "
                         "must hold exactly the preset's recipe) instead of quantizing again; quantize_s is then empty")
    ap.add_argument("--report-only", action="store_true", help="with --rows-from: measure nothing, write the report")
    ap.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable: e.g. the "
                                                                   "commands that measured the merged rows)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # one thread: several processes side by side
    if args.speed_only:
        speed_pass(args)
        return
    load_start = os.getloadavg()
    text = data_path("text/wikitext-2-raw-test.txt").read_text()
    bw = measure_bandwidth()
    ref = load("smollm2-135m")
    tmp = Path(tempfile.mkdtemp())
    print(f"checkpoints in {tmp} (for --speed-only)", flush=True)
    rows = []
    if args.rows_from:  # an interrupted run: keep what it measured (quality is deterministic), measure the rest
        import ast

        for log in args.rows_from:
            for line in Path(log).read_text().splitlines():
                if line.startswith("{'name'"):
                    row = ast.literal_eval(line[: line.rindex("}") + 1])
                    if row["name"] not in {r["name"] for r in rows}:
                        rows.append(row)
        rows.sort(key=lambda r: r["name"] != "fp32")  # the fp32 row first: every delta is against it
    done = {r["name"] for r in rows}
    if args.report_only:
        finish(args, rows, load_start, bw)
        return

    ids = ref.tokenizer.encode(text)
    ppl_seqs = windows_of(ids, 1024, args.max_tokens, "WikiText-2 test")
    kl_seqs = windows_of(ids, 512, args.kl_tokens, "WikiText-2 test")
    ref_lp = reference_logprobs(ref.model, kl_seqs)

    def measure(name, loaded, disk, extra):
        t = time.perf_counter()
        ppl = perplexity(loaded.model, loaded.tokenizer, text, 1024, args.max_tokens)
        kl = kl_from_logprobs(ref_lp, reference_logprobs(loaded.model, kl_seqs)) if name != "fp32" else {
            "kl": 0.0, "top1_agreement": 1.0}
        d1 = decode_tokens_per_s(loaded.model, 1, 48)
        d8 = decode_tokens_per_s(loaded.model, 8, 48)
        per_tok = decode_bytes_per_token(loaded.model)
        row = {"name": name, "disk_bytes": disk, "perplexity": ppl.perplexity, "ppl_tokens": ppl.tokens,
               "kl": kl["kl"], "top1_agreement": kl["top1_agreement"], "decode_tokens_per_s": d1,
               "decode_tokens_per_s_batch8": d8, "bytes_per_token": per_tok, "bandwidth_gb_s": bw,
               "roofline_tokens_per_s": bw * 1e9 / per_tok, "roofline_fraction": d1 / (bw * 1e9 / per_tok), **extra}
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
              f"({time.perf_counter() - t:.0f}s)", flush=True)

    measure.torchao = args.torchao
    if "fp32" not in done and not args.no_fp32:
        save_checkpoint(ref.model, ref.tokenizer, tmp / "fp32", {"quantization": {}})
        measure("fp32", ref, disk_bytes(tmp / "fp32"), {"quantize_s": 0.0})
    if "bf16" not in done and not args.no_bf16:
        bf = load("smollm2-135m", dtype=torch.bfloat16)
        save_checkpoint(bf.model, bf.tokenizer, tmp / "bf16", {"quantization": {}})
        measure("bf16", bf, disk_bytes(tmp / "bf16"), {"quantize_s": 0.0})
        del bf
    for preset in [p for p in args.presets.split(",") if p and p not in done]:
        recipe = load_recipe(preset)
        if args.checkpoints:
            import json

            out = Path(args.checkpoints) / preset
            doc = json.loads((out / "slimswarm.json").read_text())
            if doc.get("recipe") != json.loads(json.dumps(recipe.model_dump())):
                sys.exit(f"{out / 'slimswarm.json'}: recipe differs from preset {preset}'s; rebuild it")
            meta = doc["quantization"]
            extra = {"quantize_s": None, "checkpoint": str(out),
                     "groups": "/".join(map(str, sorted({m["group_size"] for n, m in meta.items()
                                                         if n.startswith("model.")}))),
                     "safetensors_bytes": (out / "model.safetensors").stat().st_size}
            if "plan" in meta:
                plan = meta["plan"]
                extra.update(budget_bytes=plan["budget_bytes"], predicted_kl=plan["predicted_kl"], head=plan["head"],
                             plan=" ".join(f"{k}:{v}" for k, v in plan["count"].items()))
            measure(preset, load(out), disk_bytes(out), extra)
            continue
        q = load("smollm2-135m")
        calib = None
        if recipe.needs_calibration:
            calib = calibration_batch(q.tokenizer, None, recipe.calibration.samples, recipe.calibration.seq_len)
        t = time.perf_counter()
        meta = quantize_model(q.model, recipe.quantize, calib)
        secs = time.perf_counter() - t
        out = save_checkpoint(q.model, q.tokenizer, tmp / preset, {"recipe": recipe.model_dump(), "quantization": meta})
        reloaded = load(out)
        groups = sorted({m["group_size"] for n, m in meta.items() if n.startswith("model.")})
        extra = {"quantize_s": secs, "groups": "/".join(map(str, groups)),
                 "safetensors_bytes": (out / "model.safetensors").stat().st_size}
        if "plan" in meta:
            plan = meta["plan"]
            extra.update(budget_bytes=plan["budget_bytes"], predicted_kl=plan["predicted_kl"], head=plan["head"],
                         plan=" ".join(f"{k}:{v}" for k, v in plan["count"].items()))
        measure(preset, reloaded, disk_bytes(out), extra)
        del q, reloaded
    if args.torchao:
        torchao_rows(measure, rows)

    def measure_row(name, disk, ppl, count, kl, d1, extra):
        row = {"name": name, "disk_bytes": disk, "perplexity": ppl, "ppl_tokens": count, "kl": kl["kl"],
               "top1_agreement": kl["top1_agreement"], "decode_tokens_per_s": d1, **extra}
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    if args.llamacpp:
        llamacpp_rows(args, ppl_seqs, kl_seqs, ref_lp, tmp, rows, measure_row)
    finish(args, rows, load_start, bw)


def finish(args, rows: list, load_start, bw: float) -> None:
    """Deltas against the fp32 row, notes, the report and the Pareto plot."""
    fp = rows[0]
    for r in [r for r in rows if "perplexity" in r]:
        r["delta_ppl_pct"] = 100 * (r["perplexity"] / fp["perplexity"] - 1)
        r["decode_speedup_vs_fp32"] = r["decode_tokens_per_s"] / fp["decode_tokens_per_s"]
    notes = [
        "Caveat: SmolLM2-135M-Instruct ships as Q4_1 (blocks of 32) with Q8_0 embeddings; 4-bit results with blocks of 32 "
        "would be artificially lossless, so presets use groups of 128 (96 where 128 does not divide 576) and 64, int8 per channel, 3-bit.",
        "fp32 here is the de-quantized GGUF (the parent); every uniform preset also stores the embeddings/LM head (tied) "
        "as int8 rows; mixed presets choose the table's format in the plan (column head).",
        "Decode: batch 1 and 8 run the native decode step (generate_ids: the one-call greedy loop) on the packed int4/int8 "
        "codes with int8 "
        "activations (the native step's default since #11; SLIMSWARM_NATIVE_ACT=fp32 for exact ones); 3-bit weights are 3 bits on "
        "disk but run through a 4-bit copy of their codes in memory, 5- and 6-bit weights through an 8-bit copy, so "
        "their real bytes per token are the 4-/8-bit ones (the bound shown uses the stored bits).",
        "decode tok/s were measured while other jobs used the CPU (load average below): measured under load; "
        "re-measure on a quiet machine (`--speed-only`). Bytes, perplexity, KL and top-1 do not depend on the load.",
        "torchao rows: its configs applied to the decoder linears of the same model (embeddings/LM head stay fp32, so their "
        "bytes per token include a 113 MB fp32 table that our presets store as int8); disk bytes from torch.save.",
        "llama.cpp rows: the shipped Q4_1 GGUF re-quantized by llama.cpp's own llama_model_quantize (allow_requantize: "
        "each tensor is de-quantized to f32 first, the same weights as our fp32 row; no imatrix), scored by llama.cpp on "
        "the same token ids (its logits for every position of each window); disk bytes = the .gguf file, which also "
        "holds the tokenizer (ours: the checkpoint folder, 3.6 MB of it tokenizer files). Its decode tok/s is llama.cpp's "
        "own eval loop at batch 1 (ours: our engine-free decode loop), so that column compares the two stacks.",
        "Q4_1-aligned layouts (32-blocks with a min: Q4_1, Q4_K_M's Q4_K) are artificially good on "
        "this model; the goals count only non-aligned ones (ours: groups of 64/96/128, per-channel int8; Q4_0, IQ4_NL, Q8_0, Q3_K_M: symmetric or non-linear).",
        "mixed-* rows: quantize.budget_bytes for model.safetensors (the folder adds 3.6 MB of tokenizer files and the "
        "plan in slimswarm.json); the plan (formats per decoder linear from w3g64/w3g128/w4g128/w4g96/w4g64/w5g64/"
        "w6g64/w8, and for the tied embeddings/LM head from w4g64/w5g64/w6g64/w6/w8) is chosen by a knapsack on "
        "predicted KL (quant/sensitivity.py) and is in the checkpoint's slimswarm.json; predicted_kl is the plan's "
        "summed prediction, kl the measured one. mixed-93mb/105mb: 16 x 256 calibration tokens, RTN-rounded table; "
        "mixed-75mb: GPTQ with act-order (static groups, the standard layout), Hessians from 64 x 256 tokens (the "
        "sensitivity pass on the first 16 x 256), and the tied table rounded by GPTQ as the LM head (head_method).",
        "rows marked reused_from: measured by the earlier run (results/quant_smollm2.json) with the same code path, "
        "windows and token ids (quality is deterministic); not re-run here to save CPU on a shared machine.",
        (f"machine load average at start {load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f} on 2 cores (above ~2 other work "
         "shared the CPU, so tokens/s are low and noisy; the ratios between rows are the signal)") if not args.report_only
        else ("merged report (--report-only): each row's bandwidth_gb_s and speeds are from the run that measured it; "
              "rows measured under different loads (reused_from rows: a quiet pass) are not comparable in speed, so "
              "decode_speedup_vs_fp32 is only meaningful between rows of one run"),
        f"bandwidth {bw:.1f} GB/s{' (at report time)' if args.report_only else ''}; gguf file itself: "
        f"{smollm2_gguf_path().stat().st_size:,} bytes.",
    ]
    notes += args.note
    ok = [r for r in rows if "perplexity" in r]
    notes += goal_lines(ok)
    notes += [f"{r['name']}: did not run here ({r['error']})" for r in rows if "error" in r]
    paths = write_report(ok, args.out, "python benchmarks/quant_smollm2.py " + " ".join(sys.argv[1:]), notes)
    pareto_plot(ok, Path(args.out).with_name(Path(args.out).name + "_pareto.png"))
    print(Path(paths["md"]).read_text())


GOALS = ((93.5e6, 10.0), (105e6, 5.0), (75e6, 25.0))  # (bytes on disk, ΔPPL %) of the quantization issue


def goal_lines(rows: list) -> list[str]:
    """For each goal: the best row of ours and of llama.cpp within its bytes (layouts aligned with the Q4_1 grid of
    the published model do not count), and whether ours meets it."""
    out = []
    for limit, goal in GOALS:
        fit = [r for r in rows if r["disk_bytes"] <= limit and r["name"] not in ("fp32", "bf16")
               and not r.get("aligned_with_q4_1")]
        best = {side: min((r for r in fit if r["name"].startswith("llama.cpp") == (side == "llama.cpp")),
                          key=lambda r: r["delta_ppl_pct"], default=None) for side in ("ours", "llama.cpp")}
        o, lc = best["ours"], best["llama.cpp"]
        line = f"goal: <= {limit / 1e6:g} MB on disk, dPPL <= +{goal:g}%: "
        line += (f"ours best {o['name']} {o['disk_bytes']:,} B, {o['delta_ppl_pct']:+.1f}% -> "
                 f"{'met' if o['delta_ppl_pct'] <= goal else 'NOT met'}" if o else "no row of ours fits -> NOT met")
        line += f"; llama.cpp best {lc['name']} {lc['delta_ppl_pct']:+.1f}%" if lc else "; no llama.cpp row fits"
        out.append(line)
    return out


def speed_pass(args) -> None:
    """Decode tokens/s of every row again, one after the other in one quiet pass: quality columns stay as measured."""
    import json

    stem = Path(args.out)
    data = json.loads(stem.with_suffix(".json").read_text())
    load_start = os.getloadavg()
    bw = measure_bandwidth()
    ck = Path(args.speed_only)
    for row in data["rows"]:
        name = row["name"]
        if name.startswith("torchao "):
            from torchao.quantization import quantize_

            loaded = load("smollm2-135m")
            quantize_(loaded.model.model.layers, torchao_config(name.split(" ", 1)[1]))
        elif (ck / name / "slimswarm.json").exists():
            loaded = load(ck / name, dtype=torch.bfloat16 if name == "bf16" else torch.float32)
        else:
            print(f"{name}: no checkpoint in {ck}, speed left as it was", flush=True)
            continue
        d1 = decode_tokens_per_s(loaded.model, 1, 48)
        d8 = decode_tokens_per_s(loaded.model, 8, 48)
        per_tok = decode_bytes_per_token(loaded.model)
        row.update(decode_tokens_per_s=d1, decode_tokens_per_s_batch8=d8, bytes_per_token=per_tok, bandwidth_gb_s=bw,
                   roofline_tokens_per_s=bw * 1e9 / per_tok, roofline_fraction=d1 / (bw * 1e9 / per_tok))
        print(name, round(d1, 2), round(d8, 2), flush=True)
        del loaded
    fp = data["rows"][0]
    for r in data["rows"]:
        r["decode_speedup_vs_fp32"] = r["decode_tokens_per_s"] / fp["decode_tokens_per_s"]
    notes = [n for n in data["notes"] if not n.startswith(("machine load average", "decode speeds re-measured"))]
    notes.append(f"decode speeds re-measured in one quiet pass (`--speed-only`): load average {load_start[0]:.1f} at its "
                 f"start, {os.getloadavg()[0]:.1f} at its end; bandwidth {bw:.1f} GB/s. Perplexity and KL are from the "
                 "first run (deterministic).")
    cmd = data["command"].split(" && ")[0] + f" && python benchmarks/quant_smollm2.py --speed-only {ck}"
    paths = write_report(data["rows"], stem, cmd, notes)
    print(Path(paths["md"]).read_text())


if __name__ == "__main__":
    main()
