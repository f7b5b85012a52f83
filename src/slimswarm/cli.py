"""Command line: parse, validate, call the library, print. Bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import SlimswarmError

DTYPES = ("float32", "bfloat16")


def _load(args):
    import torch

    from .models.load import load

    return load(args.model, dtype=getattr(torch, args.dtype), tokenizer=getattr(args, "tokenizer", None))


def _read_text(path: str | None) -> tuple[str, str]:
    from .data import default_eval_text

    if path is None:
        return default_eval_text()
    p = Path(path)
    if not p.is_file():
        raise SlimswarmError(f"--text: no such file: {p}")
    try:
        return p.read_text(encoding="utf-8"), str(p)
    except UnicodeDecodeError:
        raise SlimswarmError(f"--text: {p} is not UTF-8 text") from None


def _print_rows(rows: list[dict]) -> None:
    from .evaluate.report import markdown_table

    print(markdown_table(rows))


def evaluate_model(loaded, text: str, source: str, window: int, max_tokens: int | None, reference=None,
                   doc_sep: str | None = None) -> dict:
    """Perplexity (+ KL to ``reference`` when given) and sizes, as one report row."""
    from .evaluate.kl import kl_divergence
    from .evaluate.perplexity import document_perplexity, perplexity
    from .evaluate.size import disk_bytes, weight_bytes

    if doc_sep:
        docs = [d.strip() for d in text.split(doc_sep) if d.strip()]
        ppl = document_perplexity(loaded.model, loaded.tokenizer, docs, window)
    else:
        ppl = perplexity(loaded.model, loaded.tokenizer, text, window, max_tokens, source=source)
    row = {"model": loaded.source, **ppl.as_dict(), "text": source,
           "weight_bytes": weight_bytes(loaded.model), "disk_bytes": disk_bytes(loaded.source)}
    if reference is not None:
        kl = kl_divergence(reference.model, loaded.model, loaded.tokenizer, text, min(window, 512),
                           min(max_tokens or 8192, 8192))
        row.update(kl=kl["kl"], top1_agreement=kl["top1_agreement"])
    return row


def cmd_eval(args) -> int:
    if args.window < 2:
        raise SlimswarmError(f"--window must be >= 2, got {args.window}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise SlimswarmError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    text, source = _read_text(args.text)
    loaded = _load(args)
    ref = None
    if args.kl_to:
        import torch

        from .models.load import load

        ref = load(args.kl_to, dtype=getattr(torch, args.dtype))
    row = evaluate_model(loaded, text, source, args.window, args.max_tokens, ref, args.doc_sep)
    if args.json:
        print(json.dumps(row))
    else:
        _print_rows([row])
    return 0


def cmd_bench(args) -> int:
    from .evaluate.report import write_report
    from .evaluate.size import disk_bytes, weight_bytes
    from .evaluate.speed import speed_report

    loaded = _load(args)
    row = {"name": Path(loaded.source).name, "weight_bytes": weight_bytes(loaded.model),
           "disk_bytes": disk_bytes(loaded.source), **speed_report(loaded.model, new_tokens=args.new_tokens)}
    if args.out:
        write_report([row], args.out, "slimswarm " + " ".join(sys.argv[1:]))
    print(json.dumps(row) if args.json else _table(row))
    return 0


def _table(row: dict) -> str:
    from .evaluate.report import markdown_table

    return markdown_table([row])


def cmd_generate(args) -> int:
    from .models.generate import generate
    from .models.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop or [])
    loaded = _load(args)
    chat = args.chat if args.chat is not None else bool(getattr(loaded.tokenizer.hf, "chat_template", None)
                                                       if hasattr(loaded.tokenizer, "hf") else False)
    c = generate(loaded.model, loaded.tokenizer, [args.prompt], params, chat=chat)[0]
    if args.json:
        print(json.dumps({"text": c.text, "tokens": len(c.tokens), "finish_reason": c.finish_reason}))
    else:
        print(c.text if chat else args.prompt + c.text)
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded default: load SmolLM2, compress it with a recipe, and show both side by side
    (perplexity, KL, bytes, speed against the bandwidth bound), then answer a prompt with the compressed model."""
    import torch

    from .compress.calibrate import calibration_batch
    from .compress.quant.apply import quantize_model
    from .compress.recipe import load_recipe
    from .evaluate.kl import kl_divergence
    from .evaluate.report import markdown_table, write_report
    from .evaluate.size import disk_bytes
    from .evaluate.speed import measure_bandwidth, speed_report
    from .models.checkpoint import file_sha256, save_checkpoint
    from .models.generate import generate
    from .models.load import load
    from .models.sampling import SamplingParams

    text, source = _read_text(None)
    out = Path(args.out)
    print(f"[1/4] loading {args.model} ...", flush=True)
    base = load(args.model, dtype=getattr(torch, args.dtype))
    print(f"      {base.model.num_parameters():,} parameters from {base.source}")
    recipe = load_recipe(args.recipe)
    ck = out / f"{Path(base.source).stem}-{recipe.name}"
    if (ck / "slimswarm.json").exists():
        print(f"[2/4] reusing the compressed checkpoint {ck}")
    else:
        print(f"[2/4] compressing with recipe {recipe.name} (calibration on GSM8K/AG News/SST-2 train text) ...",
              flush=True)
        work = load(args.model, dtype=getattr(torch, args.dtype))
        c = recipe.calibration
        calib = calibration_batch(work.tokenizer, None, c.samples, c.seq_len) if recipe.quantize.method != "rtn" else None
        meta = quantize_model(work.model, recipe.quantize, calib)
        save_checkpoint(work.model, work.tokenizer, ck, {"recipe": recipe.model_dump(), "quantization": meta,
                                                         "parent": {"source": work.source,
                                                                    "sha256": file_sha256(work.source)}}, overwrite=True)
        del work
    small = load(ck)
    print(f"[3/4] perplexity on {args.max_tokens:,} tokens of {Path(source).name}, KL, speed ...", flush=True)
    bw = measure_bandwidth()
    rows = []
    for name, m, path in ((f"{args.model} {args.dtype}", base, base.source), (f"{recipe.name}", small, ck)):
        row = {"name": name}
        row.update(evaluate_model(m, text, source, 1024, args.max_tokens))
        if m is small:
            row.update(kl=kl_divergence(base.model, small.model, base.tokenizer, text, 512, 4096)["kl"])
        row.update(speed_report(m.model, bandwidth_gb_s=bw, new_tokens=32))
        row["disk_bytes"] = disk_bytes(path)
        rows.append(row)
    cols = ["name", "perplexity", "kl", "tokens", "weight_bytes", "disk_bytes", "prefill_tokens_per_s",
            "decode_tokens_per_s", "decode_tokens_per_s_batch8", "roofline_fraction", "peak_rss_bytes"]
    print(markdown_table(rows, cols))
    a, b = rows
    print(f"      {b['name']}: {a['weight_bytes'] / b['weight_bytes']:.1f}x fewer weight bytes, decode "
          f"{b['decode_tokens_per_s'] / a['decode_tokens_per_s']:.2f}x at batch 1, perplexity "
          f"{100 * (b['perplexity'] / a['perplexity'] - 1):+.1f}%  (bandwidth {bw:.1f} GB/s)")
    paths = write_report(rows, out / "demo", "slimswarm demo")
    print(f"      report: {', '.join(str(p) for p in paths.values())}")
    print("[4/4] generate with the compressed model (chat template, greedy):", flush=True)
    prompt = "In two sentences, why do teams of AI agents need small models?"
    c = generate(small.model, small.tokenizer, [prompt], SamplingParams(max_tokens=64), chat=True)[0]
    print(f"  user: {prompt}\n  assistant: {c.text.strip()}")
    return 0


def cmd_compress(args) -> int:
    """Load, quantize with a recipe (calibrated layer by layer), write an atomic checkpoint, print the report."""
    import time

    import torch

    from .compress.calibrate import calibration_batch, read_calibration
    from .compress.quant.apply import is_quantized, quantize_model
    from .compress.recipe import load_recipe
    from .evaluate.size import disk_bytes, weight_bytes
    from .models.checkpoint import file_sha256, save_checkpoint
    from .models.load import load

    recipe = load_recipe(args.recipe)  # validate before any heavy work
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimswarmError(f"--out {out}: exists and is not an empty folder")
    calib_text = read_calibration(args.calib) if args.calib else None
    loaded = load(args.model, dtype=getattr(torch, args.dtype))
    if loaded.kind == "slimswarm" and is_quantized(loaded.model):
        raise SlimswarmError(f"{args.model}: already quantized; compress its float parent instead")
    if recipe.quantize is None:
        raise SlimswarmError(f"recipe {recipe.name}: nothing to do (no quantize section)")
    q = recipe.quantize
    # Check every layer's grouping now, so an impossible setting fails before calibration.
    from .compress.quant.apply import layer_plan

    for name, mod in loaded.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            layer_plan(name, mod, q)
    calib = None
    if q.method in ("gptq", "awq"):
        c = recipe.calibration
        calib = calibration_batch(loaded.tokenizer, calib_text, c.samples, c.seq_len,
                                  source=args.calib or "default calibration text")
    before = weight_bytes(loaded.model)
    t = time.perf_counter()
    meta = quantize_model(loaded.model, q, calib)
    secs = time.perf_counter() - t
    parent = {"source": loaded.source, "sha256": file_sha256(loaded.source)}
    save_checkpoint(loaded.model, loaded.tokenizer, out,
                    {"recipe": recipe.model_dump(), "quantization": meta, "parent": parent,
                     "calibration": {"source": args.calib or "gsm8k+agnews+sst2 train", "tokens": 0 if calib is None else calib.numel()}})
    row = {"recipe": recipe.name, "weight_bytes_before": before, "weight_bytes": weight_bytes(loaded.model),
           "disk_bytes": disk_bytes(out), "seconds": round(secs, 1), "out": str(out)}
    print(json.dumps(row) if args.json else _table(row))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimswarm", description="Compress LLMs for a team of agents and run the team.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(sp, default=None):
        if default is None:
            sp.add_argument("model", help="smollm2-135m, stories260k, a model folder, a .gguf, a llama2.c .bin, or a hub id")
        else:
            sp.add_argument("--model", default=default)
        sp.add_argument("--dtype", choices=DTYPES, default="float32")
        sp.add_argument("--tokenizer", help="tokenizer file for a llama2.c .bin (default: tok512.model beside it)")

    e = sub.add_parser("eval", help="perplexity, KL and sizes")
    model_args(e)
    e.add_argument("--text", help="UTF-8 text file (default: WikiText-2 test from the data folder)")
    e.add_argument("--max-tokens", type=int, default=32768)
    e.add_argument("--window", type=int, default=1024)
    e.add_argument("--doc-sep", metavar="SEP", help="score each document on its own (split at SEP, e.g. '<|endoftext|>')")
    e.add_argument("--kl-to", metavar="MODEL", help="also report KL divergence to this reference model")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="prefill/decode tokens/s against the memory-bandwidth bound")
    model_args(b)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--out", help="also write OUT.json, OUT.md and OUT.png")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_bench)

    g = sub.add_parser("generate", help="complete a prompt")
    model_args(g)
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", dest="chat", action="store_true", default=None, help="wrap in the chat template")
    g.add_argument("--no-chat", dest="chat", action="store_false")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("compress", help="quantize with a recipe into a compressed checkpoint")
    model_args(c)
    c.add_argument("--recipe", required=True, help="preset (w8, w4g128-rtn, w4g128-gptq, w4g128-awq, w3g128-gptq, ...) or YAML file")
    c.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    c.add_argument("--calib", help="calibration text file (default: GSM8K/AG News/SST-2 train text)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_compress)

    d = sub.add_parser("demo", help="the main job on the embedded default model")
    model_args(d, default="smollm2-135m")
    d.add_argument("--max-tokens", type=int, default=8192)
    d.add_argument("--recipe", default="w4g128-gptq")
    d.add_argument("--out", default="out")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except SlimswarmError as e:
        if args.debug or os.environ.get("SLIMSWARM_DEBUG"):
            raise
        print(f"slimswarm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimswarm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
