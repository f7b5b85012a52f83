"""Exported SmolLM2-135M-Instruct in llama.cpp and ONNX Runtime against slimswarm on the same checkpoint, in one run:
bytes on disk, WikiText-2 perplexity (the first --tokens tokens, 512-token windows, the same token ids in every
runtime), batch-1 greedy decode tokens/s (64 new tokens after a 16-token prompt), 2 threads everywhere.

    .venv/bin/python benchmarks/export_runtimes.py [--tokens 32768] [--configs fp32,int4,adapter]

Configs: ``fp32`` (the float model); ``int4`` (our RTN int4, groups of 32, asymmetric, float embeddings/head:
GGUF Q4_1 with our codes, ONNX MatMulNBits with our bytes); ``adapter`` (fp32 base + one r=8 LoRA adapter on
all seven projections, B drawn at random with a fixed seed: it measures the runtimes, not a task; llama.cpp
loads it as a LoRA GGUF on the exported base, ONNX gets the adapter merged into the weights, since our ONNX
graph has no adapter inputs). llama.cpp runs with an F32 KV cache (its default F16 cache is a further rounding).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slimswarm import load  # noqa: E402
from slimswarm.compress.lora import LoRAConfig, add_lora, merge_lora, save_adapter  # noqa: E402
from slimswarm.compress.quant.apply import quantize_model  # noqa: E402
from slimswarm.compress.recipe import QuantizeConfig  # noqa: E402
from slimswarm.data import data_path  # noqa: E402
from slimswarm.deploy.export_gguf import export_gguf  # noqa: E402
from slimswarm.deploy.export_gguf_lora import export_lora_gguf  # noqa: E402
from slimswarm.deploy.export_onnx import export_onnx  # noqa: E402
from slimswarm.evaluate.perplexity import sequence_nll, windows_of  # noqa: E402
from slimswarm.evaluate.report import write_report  # noqa: E402
from slimswarm.models.checkpoint import file_sha256, save_checkpoint  # noqa: E402
from slimswarm.models.generate import generate_ids  # noqa: E402
from slimswarm.models.sampling import SamplingParams  # noqa: E402

WINDOW, NEW, THREADS = 512, 64, 2


def folder_bytes(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def llama_cpp_rows(path: Path, seqs, prompt, lora: Path | None = None):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=WINDOW, n_batch=WINDOW, n_threads=THREADS, n_threads_batch=THREADS,
                logits_all=True, verbose=False, type_k=0, type_v=0, lora_path=None if lora is None else str(lora))
    total, count = 0.0, 0
    for s in seqs:
        llm.reset()
        llm.eval(s)
        lg = torch.tensor(np.array(llm.scores[: len(s)]))
        total += torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(s[1:]), reduction="sum").item()
        count += len(s) - 1
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(NEW):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return math.exp(total / count), NEW / (time.perf_counter() - t0)


def ort_rows(folder: Path, cfg, seqs, prompt):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    empty = {f"past_key_values.{i}.{k}": np.zeros((1, cfg.kv_heads(i), 0, cfg.head_dim), np.float32)
             for i in range(cfg.num_hidden_layers) for k in ("key", "value")}

    def run(ids, past):
        outs = sess.run(None, {"input_ids": np.array([ids], dtype=np.int64), **past})
        return outs[0][0], {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], outs[1:])}

    total, count = 0.0, 0
    for s in seqs:
        lg, _ = run(s, empty)
        total += torch.nn.functional.cross_entropy(torch.from_numpy(lg[:-1]), torch.tensor(s[1:]),
                                                   reduction="sum").item()
        count += len(s) - 1
    lg, past = run(prompt, empty)
    t0 = time.perf_counter()
    for _ in range(NEW):
        lg, past = run([int(lg[-1].argmax())], past)
    return math.exp(total / count), NEW / (time.perf_counter() - t0)


def ours_rows(model, seqs, prompt):
    total, count = sequence_nll(model, seqs, batch_size=4)
    model.clear_cache()
    generate_ids(model, [prompt], SamplingParams(max_tokens=8), eos_ids=())  # warm-up (kernel build, caches)
    model.clear_cache()
    t0 = time.perf_counter()
    generate_ids(model, [prompt], SamplingParams(max_tokens=NEW), eos_ids=())
    return math.exp(total / count), NEW / (time.perf_counter() - t0)


def random_adapter(model, seed: int = 0) -> None:
    add_lora(model, LoRAConfig(r=8, alpha=16.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--configs", default="fp32,int4,adapter")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "export_runtimes"))
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    base = load("smollm2-135m")
    tok = base.tokenizer
    ids = tok.encode(data_path("text/wikitext-2-raw-test.txt").read_text(encoding="utf-8"))
    seqs = windows_of(ids, WINDOW, args.tokens, "WikiText-2")
    prompt = ids[:16]
    notes = [f"{len(seqs) * WINDOW:,} WikiText-2 tokens in {len(seqs)} windows of {WINDOW}; decode: {NEW} greedy "
             f"tokens after a 16-token prompt, batch 1, {THREADS} threads, one run each.",
             "The machine is shared and noisy (2 cores, other jobs running): read speeds only as ratios within one "
             "config, measured back to back.",
             "adapter: random-B r=8 LoRA (fixed seed), not a trained task adapter; ONNX runs it merged into fp32.",
             "SmolLM2's published weights are Q4_1 blocks of 32, so int4-g32 RTN re-quantization is nearly lossless "
             "here (see quant_smollm2.md)."]
    cmd = "python benchmarks/export_runtimes.py " + " ".join(sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as td:
        td = Path(td)
        for name in args.configs.split(","):
            m = load("smollm2-135m").model
            ckpt, lora, q = td / f"{name}-ckpt", None, {}
            if name == "int4":
                q = quantize_model(m, QuantizeConfig(method="rtn", bits=4, group_size=32, head_bits=None))
            save_checkpoint(m, tok, ckpt, {"quantization": q, "parent": {"source": "smollm2-135m"}})
            gguf = td / f"{name}.gguf"
            export_gguf(m, tok, gguf)
            if name == "adapter":
                random_adapter(m)
                save_adapter(m, td / "ad", LoRAConfig(r=8, alpha=16.0), {"base": {"sha256": file_sha256(ckpt)}})
                lora = td / "ad.gguf"
                export_lora_gguf(m.config, td / "ad", lora)
            print(f"{name}: slimswarm", file=sys.stderr, flush=True)
            ppl, tps = ours_rows(m, seqs, prompt)
            extra = folder_bytes(td / "ad" / "adapter.safetensors") if lora else 0
            rows.append({"config": name, "runtime": "slimswarm", "bytes": folder_bytes(ckpt / "model.safetensors")
                         + extra, "ppl": round(ppl, 4), "decode_tok_s": round(tps, 1)})
            print(f"{name}: llama.cpp", file=sys.stderr, flush=True)
            ppl, tps = llama_cpp_rows(gguf, seqs, prompt, lora)
            rows.append({"config": name, "runtime": "llama.cpp", "bytes": folder_bytes(gguf)
                         + (folder_bytes(lora) if lora else 0), "ppl": round(ppl, 4), "decode_tok_s": round(tps, 1)})
            if name == "adapter":
                merge_lora(m)  # folds B·A into the fp32 weights and unwraps
            onnx_dir = td / f"{name}.onnx"
            export_onnx(m, tok, onnx_dir)
            print(f"{name}: onnxruntime", file=sys.stderr, flush=True)
            ppl, tps = ort_rows(onnx_dir, m.config, seqs, prompt)
            rows.append({"config": name, "runtime": "onnxruntime" + (" (merged)" if lora else ""),
                         "bytes": sum(f.stat().st_size for f in onnx_dir.glob("model.onnx*")),
                         "ppl": round(ppl, 4), "decode_tok_s": round(tps, 1)})
            ref = rows[-3]
            for r in rows[-3:]:
                r["ppl_vs_slimswarm"] = round(r["ppl"] / ref["ppl"], 4)
                r["speed_vs_slimswarm"] = round(r["decode_tok_s"] / ref["decode_tok_s"], 2)
            print(rows[-3:], file=sys.stderr, flush=True)
            write_report(rows, args.out, cmd, notes)  # after every config, so a long run keeps what it measured
    if rows:
        print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
