"""The main job (``slimswarm demo``): compress the embedded default model, compare it with the original, let it answer
a prompt, then run the customer-service team. Orchestration only, above every layer; cli.py parses and calls it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

DEMO_PROMPT = "In two sentences, why do teams of AI agents need small models?"
# The measured best trade-off (results/quant_smollm2_budget.md): mixed precision within llama.cpp's Q3_K_M/IQ4_NL file
# size (93.5 MB on disk); uniform w4g64-gptq is 90.3 MB at ΔPPL +21.1%, w4g128-gptq 88.4 MB at +32.8%.
DEFAULT_RECIPE = "mixed-93mb"


def compress_for_demo(model: str, recipe_ref: str, out: Path, dtype: str, log: Callable[[str], None]):
    """The compressed checkpoint OUT/<model>-<recipe> (reused when present) and its recipe."""
    import torch

    from .compress.calibrate import calibration_batch
    from .compress.quant.apply import quantize_model
    from .compress.recipe import load_recipe
    from .models.checkpoint import file_sha256, save_checkpoint
    from .models.load import load

    recipe = load_recipe(recipe_ref)
    if recipe.quantize is None:
        from .errors import SlimswarmError

        raise SlimswarmError(f"--recipe {recipe_ref}: the demo needs a recipe with a quantize section")
    work = load(model, dtype=getattr(torch, dtype))
    ck = out / f"{Path(work.source).stem}-{recipe.name}"
    if (ck / "slimswarm.json").exists():
        log(f"[2/5] reusing the compressed checkpoint {ck}")
        return ck, recipe
    log(f"[2/5] compressing with recipe {recipe.name} (calibration on GSM8K/AG News/SST-2 train text) ...")
    c = recipe.calibration
    calib = calibration_batch(work.tokenizer, None, c.samples, c.seq_len) if recipe.quantize.needs_calibration else None
    meta = quantize_model(work.model, recipe.quantize, calib)
    save_checkpoint(work.model, work.tokenizer, ck, {"recipe": recipe.model_dump(), "quantization": meta,
                                                     "parent": {"source": work.source,
                                                                "sha256": file_sha256(work.source)}}, overwrite=True)
    return ck, recipe


def plan_summary(ck: Path) -> str | None:
    """One line for a mixed-precision checkpoint's plan (formats per decoder linear, head, bytes), else None."""
    import json

    plan = json.loads((ck / "slimswarm.json").read_text()).get("quantization", {}).get("plan")
    if not plan:
        return None
    counts = ", ".join(f"{n} x {f}" for f, n in plan["count"].items())
    return (f"plan: {counts}; embeddings/LM head {plan['head']}; {plan['planned_bytes']:,} of "
            f"{plan['budget_bytes']:,} budget bytes; predicted KL {plan['predicted_kl']:.3f}")


def run_demo(model: str = "smollm2-135m", recipe: str = DEFAULT_RECIPE, out: str | Path = "out",
             dtype: str = "float32", max_tokens: int = 8192, team: str | None = None, team_items: int = 12,
             no_team: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the demo; returns {"rows": compression rows, "answer": the compressed model's reply, "team": team rows}."""
    import torch

    from .data import default_eval_text
    from .evaluate.kl import kl_divergence
    from .evaluate.perplexity import perplexity
    from .evaluate.report import markdown_table, write_report
    from .evaluate.size import disk_bytes, weight_bytes
    from .evaluate.speed import measure_bandwidth, speed_report
    from .models.generate import generate
    from .models.load import load
    from .models.sampling import SamplingParams

    out = Path(out)
    text, source = default_eval_text()
    log(f"[1/5] loading {model} ...")
    base = load(model, dtype=getattr(torch, dtype))
    log(f"      {base.model.num_parameters():,} parameters from {base.source}")
    ck, rec = compress_for_demo(model, recipe, out, dtype, log)
    small = load(ck)
    plan = plan_summary(ck)
    if plan:
        log(f"      {plan}")
    log(f"[3/5] perplexity on {max_tokens:,} tokens of {Path(source).name}, KL and top-1 agreement, speed ...")
    bw = measure_bandwidth()
    rows = []
    for name, m, path in ((f"{model} {dtype}", base, base.source), (rec.name, small, ck)):
        ppl = perplexity(m.model, m.tokenizer, text, 1024, max_tokens, source=source)
        row = {"name": name, "perplexity": ppl.perplexity, "tokens": ppl.tokens}
        if m is small:
            kl = kl_divergence(base.model, small.model, base.tokenizer, text, 512, 4096)
            row.update(kl=kl["kl"], top1_agreement=kl["top1_agreement"])
        row.update(weight_bytes=weight_bytes(m.model), **speed_report(m.model, bandwidth_gb_s=bw, new_tokens=32))
        row["disk_bytes"] = disk_bytes(path)
        rows.append(row)
    cols = ["name", "perplexity", "kl", "top1_agreement", "tokens", "weight_bytes", "disk_bytes",
            "prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_batch8", "roofline_fraction",
            "peak_rss_bytes"]
    log(markdown_table(rows, cols))
    a, b = rows
    log(f"      {b['name']}: {a['weight_bytes'] / b['weight_bytes']:.1f}x fewer weight bytes, decode "
        f"{b['decode_tokens_per_s'] / a['decode_tokens_per_s']:.2f}x at batch 1, perplexity "
        f"{100 * (b['perplexity'] / a['perplexity'] - 1):+.1f}%, KL {b['kl']:.3f}, top-1 agreement "
        f"{b['top1_agreement']:.1%}  (bandwidth {bw:.1f} GB/s)")
    paths = write_report(rows, out / "demo", "slimswarm demo", [plan] if plan else [])
    log(f"      report: {', '.join(str(p) for p in paths.values())}")
    log("[4/5] generate with the compressed model (chat template, greedy):")
    c = generate(small.model, small.tokenizer, [DEMO_PROMPT], SamplingParams(max_tokens=64), chat=True)[0]
    answer = c.text.strip()
    log(f"  user: {DEMO_PROMPT}\n  assistant: {answer}")
    result = {"rows": rows, "answer": answer, "team": None}
    if no_team:
        return result
    from .agents.specialists import demo_team

    team = team or str(Path(__file__).resolve().parents[2] / "examples/teams/customer_service_lora.yaml")
    log(f"[5/5] the team: {team} on {team_items} held-out items, against one uncompressed model ...")
    trows = demo_team(team, out / "adapters", team_items, log=log)
    log(markdown_table(trows, ["name", "correct", "accuracy", "latency_p50_s", "latency_p95_s", "tokens",
                               "weight_bytes", "adapter_bytes", "kv_bytes", "memory_bytes"]))
    t, one, scored, copies = trows
    log(f"      team: {t['memory_bytes'] / one['memory_bytes']:.2f}x the memory of one fp32 model "
        f"(one model per agent: {copies['memory_bytes'] / one['memory_bytes']:.0f}x); accuracy "
        f"{t['accuracy']:.0%} vs {one['accuracy']:.0%} (one model generating) and {scored['accuracy']:.0%} (one "
        f"model choosing among the labels by likelihood); latency p50 {t['latency_p50_s']:.2f} s vs "
        f"{one['latency_p50_s']:.2f} s and {scored['latency_p50_s']:.2f} s a task")
    log(f"      answers, team:      {t['answers']}\n      answers, one model: {one['answers']}\n"
        f"      answers, one model (label scoring): {scored['answers']}")
    paths = write_report([{k: v for k, v in r.items() if k != "answers"} for r in trows], out / "demo_team",
                         "slimswarm demo (team part)")
    log(f"      report: {', '.join(str(p) for p in paths.values())}")
    result["team"] = trows
    return result
