"""Command line: parse, validate, call the library, print. Bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import SlimswarmError

DTYPES = ("float32", "bfloat16")
KV_DTYPES = ("fp32", "bf16", "fp16", "int8")  # models.llama.KV_DTYPES (not imported: the CLI starts without torch)


def _load(args, load_tokenizer: bool = True):
    import torch

    from .models.load import load

    loaded = load(args.model, dtype=getattr(torch, args.dtype), tokenizer=getattr(args, "tokenizer", None),
                  load_tokenizer=load_tokenizer)
    if getattr(args, "kv_cache", None):
        loaded.model.kv_dtype = args.kv_cache
    return loaded


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

    loaded = _load(args, load_tokenizer=False)  # bench feeds token ids: no tokenizer to build or hold
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
    chat = args.chat if args.chat is not None else bool(loaded.tokenizer.chat_template)
    c = generate(loaded.model, loaded.tokenizer, [args.prompt], params, chat=chat)[0]
    if args.json:
        print(json.dumps({"text": c.text, "tokens": len(c.tokens), "finish_reason": c.finish_reason}))
    else:
        print(c.text if chat else args.prompt + c.text)
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded default (slimswarm.demo): compress, compare, answer a prompt, run the team."""
    from .demo import DEFAULT_RECIPE, run_demo

    run_demo(args.model, args.recipe or DEFAULT_RECIPE, args.out, args.dtype, args.max_tokens, args.team, args.team_items,
             args.no_team, log=lambda m: print(m, flush=True))
    return 0


def cmd_compress(args) -> int:
    """Load, run a recipe (prune → lowrank → distill/lora → quantize, calibrated layer by layer), write an atomic
    checkpoint, print the report."""
    import time

    import torch

    from .compress.calibrate import calibration_batch, read_calibration
    from .compress.quant.apply import check_quantize_plan, is_quantized
    from .compress.recipe import apply_recipe, load_recipe
    from .evaluate.size import disk_bytes, weight_bytes
    from .models.checkpoint import file_sha256, save_checkpoint
    from .models.load import load

    recipe = load_recipe(args.recipe)  # validate before any heavy work
    if not (recipe.prune or recipe.lowrank or recipe.distill or recipe.lora or recipe.quantize):
        raise SlimswarmError(f"recipe {recipe.name}: nothing to do (no prune, lowrank, distill, lora or quantize section)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimswarmError(f"--out {out}: exists and is not an empty folder")
    calib_text = read_calibration(args.calib) if args.calib else None
    loaded = load(args.model, dtype=getattr(torch, args.dtype))
    if loaded.kind == "slimswarm" and is_quantized(loaded.model):
        raise SlimswarmError(f"{args.model}: already quantized; compress its float parent instead")
    # Check every layer's grouping and pruning widths now, so an impossible setting fails before calibration.
    if recipe.quantize is not None and recipe.prune is None and recipe.lowrank is None:
        check_quantize_plan(loaded.model, recipe.quantize)
    if recipe.prune is not None:
        from .compress.prune.apply import check_plan

        check_plan(loaded.model, recipe.prune)
    calib = None
    if recipe.needs_calibration:
        c = recipe.calibration
        calib = calibration_batch(loaded.tokenizer, calib_text, c.samples, c.seq_len,
                                  source=args.calib or "default calibration text")
    before = weight_bytes(loaded.model)
    params_before = loaded.model.num_parameters()
    t = time.perf_counter()
    meta = apply_recipe(loaded.model, recipe, calib, tokenizer=loaded.tokenizer, text=calib_text)
    secs = time.perf_counter() - t
    parent = {"source": loaded.source, "sha256": file_sha256(loaded.source)}
    save_checkpoint(loaded.model, loaded.tokenizer, out,
                    {"recipe": recipe.model_dump(), "quantization": meta.get("quantization", {}),
                     "passes": {k: v for k, v in meta.items() if k != "quantization"}, "parent": parent,
                     "calibration": {"source": args.calib or "gsm8k+agnews+sst2 train",
                                     "tokens": 0 if calib is None else calib.numel()}})
    row = {"recipe": recipe.name, "params_before": params_before, "params": loaded.model.num_parameters(),
           "weight_bytes_before": before, "weight_bytes": weight_bytes(loaded.model),
           "disk_bytes": disk_bytes(out), "seconds": round(secs, 1), "out": str(out)}
    print(json.dumps(row) if args.json else _table(row))
    return 0


def _check_out(out: Path, flag: str = "--out") -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimswarmError(f"{flag} {out}: exists and is not an empty folder")


def _finetune_pairs(args, tokenizer) -> tuple[list[tuple[str, str]], str]:
    """(prompt, completion) pairs from --task (chat-formatted task items) or --data (JSONL prompt/completion)."""
    if args.task:
        from .tasks import gsm8k_solutions, load_task, messages_for, target_for

        items = load_task(args.task, "train", n=args.examples, seed=args.seed)
        sol = gsm8k_solutions() if args.task == "gsm8k" else {}
        return [(tokenizer.chat(messages_for(it)), target_for(it, sol.get(it.id))) for it in items], f"{args.task} train"
    p = Path(args.data)
    if not p.is_file():
        raise SlimswarmError(f"--data: no such file: {p}")
    pairs = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            pairs.append((str(d["prompt"]), str(d["completion"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SlimswarmError(f"{p}:{i}: need a JSON object with 'prompt' and 'completion' ({e})") from None
    return pairs[: args.examples] if args.examples else pairs, str(p)


def cmd_finetune(args) -> int:
    """LoRA on a (optionally quantized) base; writes the adapter alone, its loss curve, and task accuracy."""
    import torch

    from .compress.lora import FinetuneConfig, LoRAConfig, finetune_lora, save_adapter
    from .compress.quant.apply import is_quantized, quantize_model
    from .compress.recipe import load_recipe
    from .models.checkpoint import file_sha256
    from .models.load import load

    if bool(args.task) == bool(args.data):
        raise SlimswarmError("finetune: give exactly one of --task or --data")
    out = Path(args.out)
    _check_out(out)
    try:
        cfg = FinetuneConfig(lora=LoRAConfig(r=args.r, alpha=args.alpha if args.alpha else 2.0 * args.r),
                             steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_len=args.max_len,
                             seed=args.seed, log_every=max(1, args.steps // 20), save_every=args.save_every)
    except Exception as e:  # pydantic: name the field
        raise SlimswarmError(f"finetune: {str(e).splitlines()[1:3]}") from None
    recipe = load_recipe(args.quantize) if args.quantize else None
    if recipe is not None and (recipe.quantize is None or recipe.quantize.needs_calibration):
        raise SlimswarmError(f"--quantize {args.quantize}: use an RTN recipe for the base (w8, w4g128-rtn, w4g64-rtn) "
                             "or give a compressed checkpoint as MODEL")
    loaded = load(args.model, dtype=getattr(torch, args.dtype))
    pairs, source = _finetune_pairs(args, loaded.tokenizer)
    if recipe is not None:
        if is_quantized(loaded.model):
            raise SlimswarmError(f"{args.model}: already quantized; drop --quantize")
        quantize_model(loaded.model, recipe.quantize)
    print(f"finetune: {len(pairs)} examples from {source}, r={cfg.lora.r}, {cfg.steps} steps of {cfg.batch_size}"
          f"{' on a ' + recipe.name + ' base' if recipe else ''}", file=sys.stderr, flush=True)
    state = out.parent / f".{out.name}.train_state.pt"
    res = finetune_lora(loaded.model, loaded.tokenizer, pairs, cfg, state_path=state)
    meta = {"base": {"source": loaded.source, "sha256": file_sha256(loaded.source),
                     "quantize": recipe.model_dump() if recipe else None},
            "train": {"source": source, "examples": len(pairs), "config": cfg.model_dump(), "history": res.history,
                      "seconds": round(res.seconds, 1)}}
    from .compress.distill import loss_plot

    save_adapter(loaded.model, out, cfg.lora, {**meta, "resumed_from": res.resumed_from}, extra_files={
        "loss.png": lambda p: loss_plot(res.history, p, f"LoRA fine-tuning on {source}")})
    state.unlink(missing_ok=True)  # the adapter is complete: its training checkpoint has served
    row = {"out": str(out), "examples": len(pairs), "steps": cfg.steps, "trained_params": res.trained_params,
           "adapter_bytes": (out / "adapter.safetensors").stat().st_size, "first_loss": res.history[0]["loss"],
           "final_loss": res.history[-1]["loss"], "seconds": round(res.seconds, 1)}
    if args.task and args.eval:
        from .tasks import is_correct, load_task, messages_for
        from .models.generate import generate_ids
        from .models.sampling import SamplingParams

        items = load_task(args.task, "test", n=args.eval, seed=0)
        ids = [loaded.tokenizer.encode(loaded.tokenizer.chat(messages_for(it))) for it in items]
        mt = 256 if args.task == "gsm8k" else 4
        ok = 0
        for i in range(0, len(ids), 16):
            outs = generate_ids(loaded.model, ids[i:i + 16], SamplingParams(max_tokens=mt), loaded.tokenizer.eos_ids,
                                loaded.tokenizer.pad_id, loaded.tokenizer)
            ok += sum(is_correct(it, o.text) for it, o in zip(items[i:i + 16], outs))
        row["test_accuracy"] = ok / len(items)
        row["test_items"] = len(items)
    print(json.dumps(row) if args.json else _table(row))
    return 0


def cmd_distill(args) -> int:
    """Teacher → student knowledge distillation (or plain CE fine-tuning) with checkpoints and exact resume."""
    import torch

    from .compress.distill import DistillConfig, check_same_tokenizer, distill, drop_layers
    from .models.load import load

    try:
        cfg = DistillConfig(mode=args.mode, alpha=args.alpha, temperature=args.temperature, steps=args.steps,
                            batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, save_every=args.save_every,
                            beta_hidden=args.beta_hidden, seed=args.seed)
    except Exception as e:
        raise SlimswarmError(f"distill: {str(e).splitlines()[1:3]}") from None
    out = Path(args.out)
    # a run killed before its first checkpoint leaves only its log (and temporary names): that folder is reusable
    foreign = [p for p in out.iterdir() if p.name not in ("loss.jsonl", "loss.png") and not p.name.startswith(".")] \
        if out.is_dir() else []
    if out.exists() and not (out / "train_state.pt").exists() and (foreign or not out.is_dir()):
        raise SlimswarmError(f"--out {out}: exists, is not empty and holds no train_state.pt to resume")
    if args.no_resume and (out / "train_state.pt").exists():
        raise SlimswarmError(f"--out {out}: holds a run (train_state.pt) and --no-resume was given: choose another folder")
    text = None
    if args.text:
        p = Path(args.text)
        if not p.is_file():
            raise SlimswarmError(f"--text: no such file: {p}")
        text = p.read_text(encoding="utf-8")
    dtype = getattr(torch, args.dtype)
    teacher = load(args.teacher, dtype=dtype)
    if args.student:
        student = load(args.student, dtype=dtype)
        check_same_tokenizer(teacher.tokenizer, student.tokenizer)
        smodel = student.model
    else:
        n = teacher.model.config.num_hidden_layers
        drop = args.drop_layers if args.drop_layers is not None else n // 4
        if not 0 < drop < n:
            raise SlimswarmError(f"--drop-layers must be in 1..{n - 1}, got {drop}")
        keep = _keep_layers(teacher, drop)
        smodel = drop_layers(teacher.model, keep)
        print(f"distill: student keeps layers {keep} ({n - drop}/{n})", file=sys.stderr, flush=True)
    res = distill(teacher.model if cfg.mode == "kd" else None, smodel, teacher.tokenizer, cfg, out, text,
                  resume=not args.no_resume, meta={"teacher": teacher.source})
    h = res.history
    row = {"out": str(out), "student": str(res.student_dir), "steps": cfg.steps, "resumed_from": res.resumed_from,
           "first_loss": h[0]["loss"] if h else None, "final_loss": h[-1]["loss"] if h else None,
           "student_params": smodel.num_parameters(), "teacher_params": teacher.model.num_parameters()}
    print(json.dumps(row) if args.json else _table(row))
    return 0


def _keep_layers(teacher, drop: int) -> list[int]:
    """The layers a layer-dropped student keeps: the ones that change their input most (block influence) where the
    structured-pruning scorer is available, else evenly spaced drops away from the first and last layer."""
    n = teacher.model.config.num_hidden_layers
    try:
        from .compress.prune.structured import layer_importance  # type: ignore[attr-defined]
        from .compress.calibrate import calibration_batch

        scores = layer_importance(teacher.model, calibration_batch(teacher.tokenizer, None, 16, 256))
        order = sorted(range(n), key=lambda i: float(scores[i]))
        dropped = set(order[:drop])
    except ImportError:
        dropped = {round(1 + i * (n - 2) / drop) for i in range(drop)}
    return [i for i in range(n) if i not in dropped]


def _structured_arg(spec: str | None) -> dict | None:
    """"heads=0.25,channels=0.25" or "layers=4" → {"heads": 0.25, ...}; one-line errors naming the part."""
    if not spec:
        return None
    out: dict = {}
    for part in spec.split(","):
        key, eq, val = part.partition("=")
        key = key.strip()
        if not eq or key not in ("heads", "channels", "layers"):
            raise SlimswarmError(f"--structured {spec!r}: expected heads=F,channels=F or layers=N, got {part!r}")
        try:
            out[key] = int(val) if key == "layers" else float(val)
        except ValueError:
            raise SlimswarmError(f"--structured {key}={val!r}: not a number") from None
    return out


def cmd_prune(args) -> int:
    """Prune (unstructured, N:M and/or structured), write an atomic checkpoint, print params and bytes before/after."""
    import time

    import torch

    from .compress.calibrate import calibration_batch, read_calibration
    from .compress.prune.apply import check_plan, param_counts
    from .compress.recipe import _validate, apply_recipe
    from .evaluate.size import disk_bytes, weight_bytes
    from .models.checkpoint import file_sha256, save_checkpoint
    from .models.load import load

    prune = {"method": args.method, "sparsity": args.sparsity or 0.0, "pattern": args.pattern, "storage": args.storage}
    structured = _structured_arg(args.structured)
    if structured is not None:
        prune["structured"] = structured
    recipe = _validate({"name": f"prune-{args.method}", "prune": prune}, "prune options")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimswarmError(f"--out {out}: exists and is not an empty folder")
    calib_text = read_calibration(args.calib) if args.calib else None
    loaded = load(args.model, dtype=getattr(torch, args.dtype))
    check_plan(loaded.model, recipe.prune)  # widths and layer counts, before calibration
    calib = None
    if recipe.needs_calibration:
        c = recipe.calibration
        calib = calibration_batch(loaded.tokenizer, calib_text, c.samples, c.seq_len,
                                  source=args.calib or "default calibration text")
    params_before, _ = param_counts(loaded.model)
    bytes_before = weight_bytes(loaded.model)
    t = time.perf_counter()
    meta = apply_recipe(loaded.model, recipe, calib)
    secs = time.perf_counter() - t
    params, nonzero = param_counts(loaded.model)
    parent = {"source": loaded.source, "sha256": file_sha256(loaded.source)}
    save_checkpoint(loaded.model, loaded.tokenizer, out,
                    {"recipe": recipe.model_dump(), "pruning": meta.get("prune", {}), "parent": parent,
                     "calibration": {"source": args.calib or "gsm8k+agnews+sst2 train",
                                     "tokens": 0 if calib is None else calib.numel()}})
    row = {"method": args.method, "pattern": args.pattern, "structured": args.structured or "",
           "params_before": params_before, "params": params, "nonzero_params": nonzero,
           "weight_bytes_before": bytes_before, "weight_bytes": weight_bytes(loaded.model),
           "disk_bytes": disk_bytes(out), "seconds": round(secs, 1), "out": str(out)}
    print(json.dumps(row) if args.json else _table(row))
    return 0


def cmd_export(args) -> int:
    from .deploy.export import export

    res = export(args.checkpoint, args.to, args.out, args.gguf_type, args.adapter, args.overwrite)
    print(res.pop("summary", None) or json.dumps(res))
    return 0


def cmd_serve(args) -> int:
    """One model and its LoRA adapters behind an OpenAI-compatible endpoint, until interrupted."""
    from .engine.engine import Engine
    from .engine.server import serve

    name = args.name or Path(args.model.rstrip("/")).name
    adapters: dict[str, str] = {}
    for spec in args.adapters or []:
        aname, sep, path = spec.partition("=")
        if not sep or not aname or not path:
            raise SlimswarmError(f"--adapters {spec!r}: expected NAME=DIR")
        if aname in adapters or aname == name:
            raise SlimswarmError(f"--adapters: name {aname!r} is used twice (the base model is {name!r})")
        adapters[aname] = path
    if not 0 < args.port < 65536:
        raise SlimswarmError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1 or args.max_waiting < 1 or args.max_len < 16:
        raise SlimswarmError("--max-batch and --max-waiting must be >= 1, --max-len >= 16")
    api_key = args.api_key or os.environ.get("SLIMSWARM_API_KEY") or None
    from .engine.server import exposure_warning

    if (warning := exposure_warning(args.host, api_key)) is not None:
        print(f"slimswarm: warning: {warning}", file=sys.stderr)
    if args.ray is not None:  # the same API in front of engine replicas on a Ray cluster (the deploy layer)
        from .deploy.ray_serve import cmd_serve_ray

        return cmd_serve_ray(args, name, adapters, api_key)
    loaded = _load(args)
    bank = None
    if adapters:
        from .compress.lora import AdapterBank

        import torch

        bank = AdapterBank(loaded.model, adapters,
                           dtype=torch.bfloat16 if args.adapter_dtype == "bf16" else torch.float32)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=args.max_batch, max_len=args.max_len,
                    max_waiting=args.max_waiting, adapters=bank, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20))
    models = ", ".join([name, *adapters])
    print(f"slimswarm: serving {models} on http://{args.host}:{args.port}/v1 (context {engine.max_len}, batch "
          f"{engine.max_batch}, {'API key required' if api_key else 'no API key'})", file=sys.stderr)
    serve(engine, name, args.host, args.port, api_key)
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
        sp.add_argument("--kv-cache", choices=KV_DTYPES, help="KV cache storage (default: the activations' dtype; "
                        "int8: one fp32 scale per head and token)")

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

    c = sub.add_parser("compress", help="run a recipe (prune, lowrank, distill/lora, quantize) into a compressed checkpoint")
    model_args(c)
    c.add_argument("--recipe", required=True, help="preset (w8, w4g128-rtn, w4g128-gptq, w4g128-awq, w3g128-gptq, ...) or YAML file")
    c.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    c.add_argument("--calib", help="calibration text file (default: GSM8K/AG News/SST-2 train text)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_compress)

    ft = sub.add_parser("finetune", help="train a LoRA adapter (on a float or quantized base)")
    model_args(ft)
    ft.add_argument("--task", choices=("sst2", "agnews", "gsm8k"), help="train on this task's train split")
    ft.add_argument("--data", help="JSONL with 'prompt' and 'completion' fields")
    ft.add_argument("--out", required=True, help="adapter folder (must not exist or be empty)")
    ft.add_argument("--quantize", metavar="RECIPE", help="quantize the base first (QLoRA-style), e.g. w4g128-rtn")
    ft.add_argument("--r", type=int, default=8)
    ft.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    ft.add_argument("--steps", type=int, default=200)
    ft.add_argument("--batch-size", type=int, default=8)
    ft.add_argument("--lr", type=float, default=1e-3)
    ft.add_argument("--max-len", type=int, default=256)
    ft.add_argument("--examples", type=int, default=None, help="use at most this many training examples")
    ft.add_argument("--eval", type=int, default=0, metavar="N", help="then report accuracy on N test items (--task)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--save-every", type=int, default=50, help="training checkpoint every N steps (beside --out as "
                    ".OUT.train_state.pt; a killed run given the same command resumes from it exactly)")
    ft.add_argument("--json", action="store_true")
    ft.set_defaults(fn=cmd_finetune)

    ds = sub.add_parser("distill", help="knowledge distillation teacher -> student, resumable")
    ds.add_argument("teacher")
    ds.add_argument("--dtype", choices=DTYPES, default="float32")
    ds.add_argument("--student", help="a student model (same tokenizer); default: the teacher minus --drop-layers")
    ds.add_argument("--drop-layers", type=int, default=None, help="layers to remove for the default student (n/4)")
    ds.add_argument("--out", required=True, help="run folder: train_state.pt, loss.jsonl, loss.png, student/")
    ds.add_argument("--text", help="training text (default: GSM8K/AG News/SST-2 train text)")
    ds.add_argument("--mode", choices=("kd", "ce"), default="kd")
    ds.add_argument("--alpha", type=float, default=0.5)
    ds.add_argument("--temperature", type=float, default=2.0)
    ds.add_argument("--beta-hidden", type=float, default=0.0)
    ds.add_argument("--steps", type=int, default=200)
    ds.add_argument("--batch-size", type=int, default=8)
    ds.add_argument("--seq-len", type=int, default=256)
    ds.add_argument("--lr", type=float, default=3e-4)
    ds.add_argument("--save-every", type=int, default=50)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--no-resume", action="store_true", help="error instead of continuing an existing run")
    ds.add_argument("--json", action="store_true")
    ds.set_defaults(fn=cmd_distill)

    pr = sub.add_parser("prune", help="prune (magnitude, Wanda, SparseGPT; unstructured, N:M, structured) into a checkpoint")
    model_args(pr)
    pr.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="wanda")
    pr.add_argument("--sparsity", type=float, help="unstructured fraction of weights removed, in [0, 1)")
    pr.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M, e.g. 2:4, 4:8")
    pr.add_argument("--structured", metavar="SPEC", help="heads=0.25,channels=0.25 and/or layers=4")
    pr.add_argument("--storage", choices=("sparse", "dense"), default="sparse",
                    help="sparse: compact SparseLinear storage (smaller on disk); dense: zeros kept in dense tensors")
    pr.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    pr.add_argument("--calib", help="calibration text file (default: GSM8K/AG News/SST-2 train text)")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(fn=cmd_prune)

    d = sub.add_parser("demo", help="the main job on the embedded default model")
    model_args(d, default="smollm2-135m")
    d.add_argument("--max-tokens", type=int, default=8192)
    d.add_argument("--recipe", help="compression recipe (default: slimswarm.demo.DEFAULT_RECIPE, the measured best)")
    d.add_argument("--out", default="out")
    d.add_argument("--team", default=None, help="team YAML for the team part (default: examples/teams/"
                   "customer_service_lora.yaml; its adapters are trained into OUT/adapters when missing)")
    d.add_argument("--team-items", type=int, default=12, help="held-out SST-2 + AG News items for the team part")
    d.add_argument("--no-team", action="store_true", help="skip the team part")
    d.set_defaults(fn=cmd_demo)

    sv = sub.add_parser("serve", help="serve a model and its LoRA adapters on an OpenAI-compatible HTTP endpoint")
    model_args(sv)
    sv.add_argument("--adapters", nargs="+", metavar="NAME=DIR", help="LoRA adapter folders, each served as model NAME")
    sv.add_argument("--adapter-dtype", choices=("fp32", "bf16"), default="fp32",
                    help="storage of the adapters' weights: bf16 halves their memory and the bytes a decode step "
                         "streams (each weight rounded once; the math stays fp32)")
    sv.add_argument("--name", help="the base model's name in the API (default: the model argument's last part)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    sv.add_argument("--max-len", type=int, default=2048, help="context length per sequence (KV cache slots)")
    sv.add_argument("--max-waiting", type=int, default=64, help="queued requests before answering 429")
    sv.add_argument("--prefix-cache-mb", type=float, default=256, help="byte budget of the shared-prefix KV cache")
    sv.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $SLIMSWARM_API_KEY, else none)")
    sv.add_argument("--ray", nargs="?", const="auto", metavar="auto|ADDRESS",
                    help="serve from engine replicas on a Ray cluster (auto: this machine's, or a new local one)")
    sv.add_argument("--replicas", type=int, default=1, help="with --ray: engine replicas to start")
    sv.add_argument("--resources", nargs="+", metavar="NAME=AMOUNT", help="with --ray: Ray resources per replica")
    sv.add_argument("--num-cpus", type=float, default=1.0, help="with --ray: CPUs Ray reserves per replica")
    sv.set_defaults(fn=cmd_serve)

    ex = sub.add_parser("export", help="export a checkpoint to GGUF (llama.cpp) or ONNX (ONNX Runtime), or an adapter to a llama.cpp LoRA GGUF")
    ex.add_argument("checkpoint")
    ex.add_argument("--to", required=True, choices=("gguf", "onnx"))
    ex.add_argument("--out", required=True, help="FILE.gguf, or a folder for onnx")
    ex.add_argument("--gguf-type", help="GGML type for tensors our codes do not map to exactly (F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0)")
    ex.add_argument("--adapter", metavar="DIR", help="write this LoRA adapter (trained on CHECKPOINT) as a llama.cpp LoRA GGUF to --out")
    ex.add_argument("--overwrite", action="store_true")
    ex.set_defaults(fn=cmd_export)

    from .agents.command import add_team_parser  # `team run|replay`: the agents layer owns its arguments
    from .deploy.ray_cli import add_cluster_parser, team_ray_backend  # Ray: the deploy layer, injected

    add_team_parser(sub, ray_backend=team_ray_backend)
    add_cluster_parser(sub)

    from .deploy.command import add_deploy_parsers  # `devices probe`, `plan`: the deploy layer owns its arguments

    add_deploy_parsers(sub)
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
