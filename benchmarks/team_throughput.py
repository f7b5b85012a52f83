"""A team of 8 agents, each with its own LoRA adapter on one SmolLM2 base served by one Engine (fp32 and int4 bases),
against 8 transformers model copies called one request at a time: tokens/s, latency, time to first token, memory.

    nice .venv/bin/python benchmarks/team_throughput.py [--requests 64] [--max-tokens 32] [--max-batch 8,32]

Every contender runs in its own subprocess (so its peak RSS is its own) on the same 64 requests, all arriving at
once: agent i sends 8 questions under its own system prompt, so 7 of its 8 prompts can reuse the cached prefix.
Answers have a fixed length (EOS ignored on both sides) so both sides do the same work whatever the adapters say.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

AGENTS = 8
ROLES = ["planner", "researcher", "coder", "reviewer", "tester", "writer", "critic", "summarizer"]
SYSTEM = ("You are the {role} of a small team of software agents that build and maintain a web service for a "
          "library. Work only on your part, answer in plain short sentences, say when you are unsure, never invent "
          "facts, and hand anything outside your role back to the planner. Team rules: be brief, be correct, be kind.")
QUESTIONS = ["What should we do first today?", "How do we store the list of books?", "What can go wrong at login?",
             "Which test would you write next?", "How do we make the search faster?", "What does the user see first?",
             "Is the last change safe to ship?", "Summarise the plan in one line."]


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def workload(tok, n: int) -> list[tuple[int, list[int]]]:
    """(agent, prompt ids) for n requests: request k belongs to agent k % 8, which always uses its own system prompt."""
    out = []
    for k in range(n):
        a = k % AGENTS
        msgs = [{"role": "system", "content": SYSTEM.format(role=ROLES[a])},
                {"role": "user", "content": QUESTIONS[(k // AGENTS) % len(QUESTIONS)]}]
        out.append((a, tok.encode(tok.chat(msgs))))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def random_adapter(model, seed: int, r: int = 8):
    """A LoRA (r=8 on every projection) with random nonzero A and B, as a fine-tuned agent would have."""
    from slimswarm.compress.lora import LoRAConfig, target_modules

    cfg = LoRAConfig(r=r, alpha=2 * r)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, lin in target_modules(model, cfg.targets).items():
        sd[f"{name}.lora_A"] = torch.randn(r, lin.in_features, generator=g) / lin.in_features**0.5
        sd[f"{name}.lora_B"] = torch.randn(lin.out_features, r, generator=g) * 0.01
    return cfg, sd


# ---------------------------------------------------------------------------------------------- contenders
def prepare_int4(out: str) -> None:
    """Quantize SmolLM2 with w4g128-rtn into a checkpoint, so the int4 contender never holds the fp32 weights."""
    from slimswarm import load
    from slimswarm.compress.quant.apply import quantize_model
    from slimswarm.compress.recipe import load_recipe
    from slimswarm.models.checkpoint import save_checkpoint

    base = load("smollm2-135m")
    recipe = load_recipe("w4g128-rtn")
    meta = quantize_model(base.model, recipe.quantize)
    save_checkpoint(base.model, base.tokenizer, out, {"recipe": recipe.model_dump(), "quantization": meta},
                    overwrite=True)


@torch.inference_mode()
def run_engine(source: str, n: int, max_tokens: int, max_batch: int) -> dict:
    from slimswarm import load
    from slimswarm.compress.lora import AdapterBank
    from slimswarm.engine.engine import Engine
    from slimswarm.evaluate.size import weight_bytes
    from slimswarm.models.sampling import SamplingParams

    loaded = load(source)
    model, tok = loaded.model, loaded.tokenizer
    bank = AdapterBank(model, {f"agent{i}": random_adapter(model, i) for i in range(AGENTS)})
    reqs = workload(tok, n)
    # KV slots for the longest prompt plus its answer, in whole 16-token blocks: the cache this workload needs
    max_len = -(-(max(len(ids) for _, ids in workload(tok, max(n, 2 * AGENTS))) + max_tokens) // 16) * 16
    eng = Engine(model, tok, max_batch=max_batch, max_len=max_len, max_waiting=4 * n, adapters=bank)
    eng.eos = set()  # fixed-length answers: the same work as the transformers side, whatever the adapters say
    params = SamplingParams(max_tokens=max_tokens)
    rss_loaded = rss_now()

    def run_alone(a, ids, k=max_tokens):
        r = eng.submit(ids, SamplingParams(max_tokens=k), f"agent{a}")
        while not r.done:
            eng.step()
        return r

    run_alone(0, tok.encode("Warm-up: allocate the buffers and pick the kernels."), 4)
    # time to first token alone: the agent's first question (cold), then its next one (system prompt cached)
    probe = workload(tok, 2 * AGENTS)
    cold, warm, cached = [], [], []
    for a in range(3):
        eng.prefix.clear()
        cold.append(run_alone(a, probe[a][1], 1).ttft_s)
        r = run_alone(a, probe[a + AGENTS][1], 1)
        warm.append(r.ttft_s)
        cached.append(r.cached_tokens)
    eng.prefix.clear()
    before = eng.stats()

    t0 = time.perf_counter()
    live = [eng.submit(ids, params, f"agent{a}") for a, ids in reqs]
    while not all(r.done for r in live):
        eng.step()
    wall = time.perf_counter() - t0
    s = eng.stats()
    toks = sum(len(r.tokens) for r in live)
    return {"generated_tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall,
            "latency_p50_s": pct([r.t_done - t0 for r in live], 0.5),
            "latency_p95_s": pct([r.t_done - t0 for r in live], 0.95),
            "ttft_burst_p50_s": pct([r.t_first - t0 for r in live], 0.5),
            "ttft_alone_cold_s": statistics.median(cold), "ttft_alone_prefix_cached_s": statistics.median(warm),
            "prefix_cached_tokens_alone": statistics.median(cached),
            "burst_prefix_cache_hits": s["prefix_cache_hits"] - before["prefix_cache_hits"],
            "burst_cached_prompt_tokens": s["cached_prompt_tokens"] - before["cached_prompt_tokens"],
            "prompt_tokens": sum(len(ids) for _, ids in reqs),
            "max_batch": max_batch, "weight_bytes": weight_bytes(model), "adapter_bytes": bank.nbytes(),
            "kv_cache_bytes": eng.kv_bytes,
            "rss_after_load_bytes": rss_loaded, "rss_after_run_bytes": rss_now(), "peak_rss_bytes": peak_rss()}


@torch.inference_mode()
def run_transformers(n: int, max_tokens: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from slimswarm import load
    from slimswarm.evaluate.size import weight_bytes

    ours = load("smollm2-135m")
    tok = ours.tokenizer
    d = ours.model.config.to_hf()
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    first = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    first.load_state_dict(ours.model.state_dict(), strict=False)
    first.tie_weights()
    del ours
    gc.collect()
    try:
        import peft  # noqa: F401

        lora = True
    except ImportError:
        lora = False
    # one full model per agent: what a team without a shared base runs. Copies first: peft's get_peft_model injects
    # its LoRA layers into the model in place, so copying a wrapped model would stack a second adapter on it
    bases = [copy.deepcopy(first) for _ in range(AGENTS - 1)] + [first]
    models = []
    for m in bases:
        if lora:
            from peft import LoraConfig, get_peft_model

            m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                             "o_proj", "gate_proj", "up_proj", "down_proj"], init_lora_weights=False))
            m.eval()
        models.append(m)
    reqs = workload(tok, n)
    rss_loaded = rss_now()

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.t = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.t is None:  # the first put is the prompt
                self.t = time.perf_counter()

        def end(self):
            pass

    def call(m, ids, k):
        x = torch.tensor([ids])
        st = FirstToken()
        t = time.perf_counter()
        out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k, do_sample=False,
                         pad_token_id=tok.pad_id, streamer=st)
        return out.shape[1] - x.shape[1], t, st.t

    call(models[0], tok.encode("Warm-up: allocate the buffers."), 4)
    probe = workload(tok, AGENTS)
    alone = []
    for a in range(3):
        _, t, tf = call(models[a], probe[a][1], 1)
        alone.append(tf - t)
    t0 = time.perf_counter()
    done, first, toks = [], [], 0
    for a, ids in reqs:  # one request at a time, in arrival order, each on its agent's model
        k, _, tf = call(models[a], ids, max_tokens)
        toks += k
        first.append(tf - t0)
        done.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    return {"generated_tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall,
            "latency_p50_s": pct(done, 0.5), "latency_p95_s": pct(done, 0.95), "ttft_burst_p50_s": pct(first, 0.5),
            "ttft_alone_cold_s": statistics.median(alone), "ttft_alone_prefix_cached_s": None,
            "prompt_tokens": sum(len(ids) for _, ids in reqs), "peft_lora": lora,
            "weight_bytes": sum(weight_bytes(m) for m in models),
            "rss_after_load_bytes": rss_loaded, "rss_after_run_bytes": rss_now(), "peak_rss_bytes": peak_rss()}


# ---------------------------------------------------------------------------------------------- driver
def child(args) -> None:
    torch.set_num_threads(args.threads)
    if args.contender == "prepare-int4":
        prepare_int4(args.path)
        return
    if args.contender == "transformers":
        res = run_transformers(args.requests, args.max_tokens)
    else:
        res = run_engine(args.path, args.requests, args.max_tokens, int(args.max_batch))
    Path(args.result).write_text(json.dumps(res))


def spawn(args, contender: str, path: str = "", result: str = "", max_batch: int = AGENTS) -> dict | None:
    cmd = [sys.executable, __file__, "--child", contender, "--path", path, "--result", result,
           "--max-batch", str(max_batch), "--requests", str(args.requests), "--max-tokens", str(args.max_tokens),
           "--threads", str(args.threads)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  {contender}: {time.perf_counter() - t:.0f}s", flush=True)
    return json.loads(Path(result).read_text()) if result else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", default="8,32", help="engine batch rows, one run each (comma-separated)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every contender (1: steadier on a "
                    "shared machine, where a second OpenMP thread waits on a busy core)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "team_throughput"))
    ap.add_argument("--child", dest="contender", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.contender:
        child(args)
        return
    from slimswarm.evaluate.report import write_report

    work = Path(tempfile.mkdtemp(prefix="team-throughput-"))
    try:
        ck = str(work / "smollm2-w4g128-rtn")
        print("preparing the int4 base (w4g128-rtn) ...", flush=True)
        spawn(args, "prepare-int4", ck)
        batches = [int(b) for b in args.max_batch.split(",")]
        runs = [(f"slimswarm engine, {base} base + 8 LoRA, max_batch {b}", "engine", path, b)
                for base, path in (("fp32", "smollm2-135m"), ("int4 w4g128-rtn", ck)) for b in batches]
        runs.append(("transformers, 8 fp32 model copies, one request at a time", "transformers", "", 1))
        rows = []
        for name, kind, path, b in runs:
            print(f"running {name} ...", flush=True)
            res = spawn(args, kind, path, str(work / f"{len(rows)}.json"), b)
            rows.append({"name": name, **res})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = rows[-1]
    for r in rows:
        r["throughput_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["peak_rss_ratio"] = r["peak_rss_bytes"] / ref["peak_rss_bytes"]
    peft = ref.get("peft_lora")
    notes = [
        f"{args.requests} requests from {AGENTS} agents arrive at once; each agent has its own system prompt "
        f"({AGENTS} shared prompts) and a random r=8 LoRA on every projection; {args.max_tokens} new tokens each, "
        "greedy, EOS ignored on both sides",
        "engine: one process, one base, continuous batching over mixed adapters (max_batch rows), prefix cache, "
        "KV cache sized to the longest prompt + answer; "
        "transformers: one model copy per agent, generate() one request at a time in arrival order" +
        ("" if peft else " — peft is not installed, so the copies run the base model without LoRA (less work "
                         "per token than the engine does)"),
        "latency = finish time counted from the common arrival; ttft_alone_* = one request on an idle contender "
        "(cold vs. its system prompt already in the prefix cache); peak RSS of each contender's own subprocess",
        f"ratios against the transformers row; {args.threads} torch threads; a 2-core machine shared with other "
        "jobs, so absolute numbers move between runs",
    ]
    for r in rows[:-1]:
        notes.append(f"{r['name']}: {r['throughput_ratio']:.2f}x the tokens/s at {r['peak_rss_ratio']:.2f}x the "
                     f"peak memory (goal: >= 4x at <= 0.25x)")
    cmd = "nice .venv/bin/python benchmarks/team_throughput.py " + " ".join(sys.argv[1:])
    paths = write_report(rows, args.out, cmd.strip(), notes)
    cols = ["name", "tokens_per_s", "latency_p50_s", "latency_p95_s", "ttft_alone_cold_s", "ttft_alone_prefix_cached_s",
            "peak_rss_bytes", "throughput_ratio", "peak_rss_ratio"]
    from slimswarm.evaluate.report import markdown_table

    print(markdown_table(rows, cols))
    print("\n".join(notes))
    print("wrote", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
