"""Quantization presets on SmolLM2-135M-Instruct, side by side in one run: bytes on disk, WikiText-2 perplexity
(first 32,768 tokens, 1,024-token windows), KL to fp32, decode tokens/s at batch 1 and 8, fraction of the bound.

    .venv/bin/python benchmarks/quant_smollm2.py [--presets w8,w4g128-rtn,...] [--max-tokens 32768]

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
from slimswarm.evaluate.kl import kl_divergence  # noqa: E402
from slimswarm.evaluate.perplexity import perplexity  # noqa: E402
from slimswarm.evaluate.report import write_report  # noqa: E402
from slimswarm.evaluate.size import decode_bytes_per_token, disk_bytes  # noqa: E402
from slimswarm.evaluate.speed import decode_tokens_per_s, measure_bandwidth  # noqa: E402
from slimswarm.models.checkpoint import save_checkpoint  # noqa: E402
from slimswarm.models.load import smollm2_gguf_path  # noqa: E402

DEFAULT = "w8,w4g128-rtn,w4g128-gptq,w4g128-awq,w4g64-rtn,w4g64-gptq,w3g128-gptq"


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
    ap.add_argument("--torchao", default="int8wo,int8dyn,int4wo-g64,intx4-g64",
                    help="torchao 0.18 configs to run beside ours ('' for none)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_smollm2"))
    ap.add_argument("--speed-only", metavar="DIR",
                    help="re-measure decode speed (and nothing else) of a finished run's checkpoints in DIR "
                         "(its temporary folder, printed at the start) in a quiet moment, side by side in one pass")
    ap.add_argument("--rows-from", metavar="LOG", help="take the rows an interrupted run printed to LOG; measure the rest")
    args = ap.parse_args()
    torch.set_num_threads(2)
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

        for line in Path(args.rows_from).read_text().splitlines():
            if line.startswith("{'name'"):
                rows.append(ast.literal_eval(line[: line.rindex("}") + 1]))
    done = {r["name"] for r in rows}

    def measure(name, loaded, disk, extra):
        t = time.perf_counter()
        ppl = perplexity(loaded.model, loaded.tokenizer, text, 1024, args.max_tokens)
        kl = kl_divergence(ref.model, loaded.model, ref.tokenizer, text, 512, args.kl_tokens) if name != "fp32" else {
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
    if "fp32" not in done:
        save_checkpoint(ref.model, ref.tokenizer, tmp / "fp32", {"quantization": {}})
        measure("fp32", ref, disk_bytes(tmp / "fp32"), {"quantize_s": 0.0})
    if "bf16" not in done:
        bf = load("smollm2-135m", dtype=torch.bfloat16)
        save_checkpoint(bf.model, bf.tokenizer, tmp / "bf16", {"quantization": {}})
        measure("bf16", bf, disk_bytes(tmp / "bf16"), {"quantize_s": 0.0})
        del bf
    for preset in [p for p in args.presets.split(",") if p and p not in done]:
        recipe = load_recipe(preset)
        q = load("smollm2-135m")
        calib = None
        if recipe.quantize.needs_calibration:
            calib = calibration_batch(q.tokenizer, None, recipe.calibration.samples, recipe.calibration.seq_len)
        t = time.perf_counter()
        meta = quantize_model(q.model, recipe.quantize, calib)
        secs = time.perf_counter() - t
        out = save_checkpoint(q.model, q.tokenizer, tmp / preset, {"recipe": recipe.model_dump(), "quantization": meta})
        reloaded = load(out)
        groups = sorted({m["group_size"] for n, m in meta.items() if n != "lm_head"})
        measure(preset, reloaded, disk_bytes(out), {"quantize_s": secs, "groups": "/".join(map(str, groups))})
        del q, reloaded
    if args.torchao:
        torchao_rows(measure, rows)
    fp = rows[0]
    for r in [r for r in rows if "perplexity" in r]:
        r["delta_ppl_pct"] = 100 * (r["perplexity"] / fp["perplexity"] - 1)
        r["decode_speedup_vs_fp32"] = r["decode_tokens_per_s"] / fp["decode_tokens_per_s"]
    notes = [
        "Caveat: SmolLM2-135M-Instruct ships as Q4_1 (blocks of 32) with Q8_0 embeddings; 4-bit results with blocks of 32 "
        "would be artificially lossless, so presets use groups of 128 (96 where 128 does not divide 576) and 64, int8 per channel, 3-bit.",
        "fp32 here is the de-quantized GGUF (the parent); every preset also stores the embeddings/LM head (tied) as int8 rows.",
        "Decode: batch 1-8 run our C kernel on the packed int4/int8 codes (fp32 activations); 3-bit weights are 3 bits on "
        "disk but run through a 4-bit copy of their codes in memory, so their real bytes per token are the 4-bit ones (the bound shown uses the stored 3 bits).",
        "torchao rows: its configs applied to the decoder linears of the same model (embeddings/LM head stay fp32, so their "
        "bytes per token include a 113 MB fp32 table that our presets store as int8); disk bytes from torch.save.",
        "llama.cpp was not measured in this run.",
        f"machine load average at start {load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f} on 2 cores (above ~2 other work "
        "shared the CPU, so tokens/s are low and noisy; the ratios between rows are the signal)",
        f"bandwidth {bw:.1f} GB/s; gguf file itself: {smollm2_gguf_path().stat().st_size:,} bytes.",
    ]
    ok = [r for r in rows if "perplexity" in r]
    notes += [f"{r['name']}: did not run here ({r['error']})" for r in rows if "error" in r]
    paths = write_report(ok, args.out, "python benchmarks/quant_smollm2.py " + " ".join(sys.argv[1:]), notes)
    print(Path(paths["md"]).read_text())


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
