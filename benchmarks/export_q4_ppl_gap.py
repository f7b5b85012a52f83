"""How much of llama.cpp's perplexity gap on our Q4_0/Q4_1 exports is its int8 activations? One run, same token ids.

For each int4-g32 checkpoint (symmetric → Q4_0, asymmetric → Q4_1; weights written with our codes) this prints
perplexity in slimswarm, in slimswarm with llama.cpp's activation rounding emulated (every input to a quantized
linear rounded per block of 32 to int8 with an fp16 scale, as ggml's quantize_row_q8_0 does before a Q4 dot
product), and in llama.cpp (F32 KV cache, 2 threads).

    .venv/bin/python benchmarks/export_q4_ppl_gap.py [--model stories260k] [--tokens 512]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slimswarm import load  # noqa: E402
from slimswarm.compress.quant.apply import quantize_model  # noqa: E402
from slimswarm.compress.quant.linear import QuantLinear  # noqa: E402
from slimswarm.compress.recipe import Override, QuantizeConfig  # noqa: E402
from slimswarm.data import data_path  # noqa: E402
from slimswarm.deploy.export_gguf import export_gguf  # noqa: E402
from slimswarm.evaluate.report import write_report  # noqa: E402


def q8_0_round(mod, args):
    """Inputs rounded like ggml's Q8_0: d = amax/127 per 32 values (stored fp16), q = round half away from 0."""
    x = args[0]
    b = x.float().reshape(-1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.sign(b / d) * torch.floor((b / d).abs() + 0.5), torch.zeros_like(b))
    return ((q * d.half().float()).reshape(x.shape).to(x.dtype),)


def ppl(logits: torch.Tensor, ids: list[int]) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item())


@torch.no_grad()
def ours(model, ids) -> torch.Tensor:
    model.clear_cache()
    return model(torch.tensor([ids])).float()[0]


def main() -> None:
    from llama_cpp import Llama

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "export_q4_ppl_gap"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = load(args.model)
    text = data_path("text/tinystories-sample.txt" if "stories" in args.model else "text/wikitext-2-raw-test.txt")
    ids = base.tokenizer.encode(text.read_text(encoding="utf-8"))[: args.tokens]
    rows = []
    for sym, kind in ((True, "Q4_0"), (False, "Q4_1")):
        m = load(args.model).model
        skip = [Override(pattern="*.down_proj", skip=True)] if m.config.intermediate_size % 32 else []
        quantize_model(m, QuantizeConfig(method="rtn", bits=4, group_size=32, symmetric=sym, head_bits=None,
                                         overrides=skip))
        with tempfile.TemporaryDirectory() as td:
            path = Path(td) / "m.gguf"
            export_gguf(m, base.tokenizer, path)
            llm = Llama(model_path=str(path), n_ctx=len(ids), n_batch=len(ids), n_threads=2, logits_all=True,
                        verbose=False, type_k=0, type_v=0)
            llm.eval(ids)
            p_cpp = ppl(torch.tensor(np.array(llm.scores[: len(ids)])), ids)
        p_ours = ppl(ours(m, ids), ids)
        hooks = [q.register_forward_pre_hook(q8_0_round) for q in m.modules() if isinstance(q, QuantLinear)]
        p_q8 = ppl(ours(m, ids), ids)
        for h in hooks:
            h.remove()
        rows.append({"model": args.model, "gguf": kind, "tokens": len(ids), "ppl_slimswarm": round(p_ours, 4),
                     "ppl_slimswarm_int8_acts": round(p_q8, 4), "ppl_llama_cpp": round(p_cpp, 4),
                     "gap_total": round(p_cpp / p_ours - 1, 5), "gap_from_int8_acts": round(p_q8 / p_ours - 1, 5),
                     "gap_rest": round(p_cpp / p_q8 - 1, 5)})
        print(rows[-1], flush=True)
    notes = ["gap_total = llama.cpp / slimswarm - 1; gap_from_int8_acts = emulated / slimswarm - 1; "
             "gap_rest = llama.cpp / emulated - 1 (accumulation order, Q4_1's fp16 offsets, the emulation's "
             "own approximations).",
             "One run on a shared 2-core machine; perplexity does not depend on the load."]
    write_report(rows, args.out, "python benchmarks/export_q4_ppl_gap.py " + " ".join(sys.argv[1:]), notes)


if __name__ == "__main__":
    main()
