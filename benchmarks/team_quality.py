"""Team quality on SST-2 and AG News: zero-shot base, a LoRA specialist on the fp32 and the int4 base, a 3-voter panel,
and routers (learned bandit, fixed rule, prompt) on a mixed stream — accuracy with 95% Wilson intervals, latency,
tokens and memory (one shared base + N adapters against N model copies). Every request goes through the agents
layer and one Engine per base (continuous batching, the adapters of a batch applied per row by an AdapterBank).

    nice .venv/bin/python benchmarks/team_quality.py            # SST-2 test (872), AG News held-out (500)
    nice .venv/bin/python benchmarks/team_quality.py --quick    # 48 + 48 items, a smoke run

Specialists come from out/adapters/ (trained there first when missing; see slimswarm.agents.specialists).
Each measured section is cached under out/team_quality/ by its settings, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path("out/team_quality")
INT4 = "w4g128-rtn"
ZERO_SHOT_TOKENS = 10
GSM8K_TOKENS = 256  # a worked solution: GSM8K's are ~110 tokens on average
MAX_LEN = 512  # the longest AG News prompt is ~200 tokens: a short context keeps the KV cache small
REVIEW_WORDS = ["film", "movie", "story", "characters", "funny", "comedy", "director", "performances", "audience",
                "drama", "script", "cinema", "screen", "actors", "plot", "entertaining", "boring"]
HAND_NEWS_WORDS = ["reuters", "ap", "afp", "said", "says", "percent", "company", "government", "officials",
                   "president", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "inc",
                   "corp", "quot", "shares", "minister", "billion", "million", "season", "league", "internet",
                   "software"]


def news_words(k: int = 120, n: int = 3000, seed: int = 11) -> list[str]:
    """The hand list plus the ``k`` words found in most AG News *train* items that occur in under 0.2% of SST-2
    *train* items (``n`` of each): the keywords of the fixed rule and of the keyword bandit. On those train items
    the hand list alone sent 67% of the news to the topic specialist (99% of reviews to sentiment); with k=120,
    92% (96%)."""
    import collections
    import re as _re

    from slimswarm.tasks import load_task

    word = _re.compile(r"[a-z0-9']+")
    sst, ag = load_task("sst2", "train", n=n, seed=seed), load_task("agnews", "train", n=n, seed=seed)
    in_ag = collections.Counter(w for it in ag for w in set(word.findall(it.input.lower())))
    in_sst = collections.Counter(w for it in sst for w in set(word.findall(it.input.lower())))
    mined = [w for w, _ in in_ag.most_common(400) if in_sst[w] / len(sst) < 0.002 and len(w) > 1][:k]
    return sorted(set(HAND_NEWS_WORDS + mined))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials (well-behaved near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def items_for(task: str, n: int | None):
    from slimswarm.tasks import load_task

    return load_task(task, "test", n=n, seed=0)


def as_tasks(items) -> list[dict]:
    return [{"id": it.id, "input": it.input, "expected": it.label} for it in items]


def team_config(adapters: dict[str, Path], base: str) -> dict:
    """Every agent of the benchmark on two engines: `fp32` (the base, with the fp32-trained adapters) and `int4`
    (the same base quantized, with the int4-trained adapters and, for the panel, the fp32-trained ones)."""
    from slimswarm.tasks import SYSTEM

    a = {k: str(v) for k, v in adapters.items()}
    models = {
        "fp32": {"base": base, "max_len": MAX_LEN, "max_batch": 8,
                 "adapters": {"sentiment": a["sentiment"], "topic": a["topic"]}},
        "int4": {"base": base, "compress": INT4, "max_len": MAX_LEN, "max_batch": 8,
                 "adapters": {"sentiment": a[f"sentiment-{INT4}"], "topic": a[f"topic-{INT4}"],
                              "sentiment-fp32": a["sentiment"], "topic-fp32": a["topic"]}},
    }
    if f"math-{INT4}" in a:
        models["int4"]["adapters"]["math"] = a[f"math-{INT4}"]
    agents = []
    for role, task in (("sentiment", "sst2"), ("topic", "agnews")):
        p = {"max_tokens": 3}
        sysp = SYSTEM[task]
        agents += [
            # the base gets room to say more than the label ("The sentiment is positive."): scored on its first label
            {"name": f"base_{task}", "system": sysp, "model": "fp32", "params": {"max_tokens": ZERO_SHOT_TOKENS}},
            {"name": f"{role}_fp32", "system": sysp, "model": "fp32", "adapter": role, "params": p,
             "capabilities": [role]},
            {"name": f"{role}_int4", "system": sysp, "model": "int4", "adapter": role, "params": p,
             "capabilities": [role]},
            # panel voters beside {role}_int4: the fp32-trained adapter served on the int4 base, and the
            # int4 adapter sampled at T=0.7 — three different answerers on one shared int4 base
            {"name": f"{role}_int4_xfer", "system": sysp, "model": "int4", "adapter": f"{role}-fp32", "params": p},
            {"name": f"{role}_int4_t07", "system": sysp, "model": "int4", "adapter": role,
             "params": {**p, "temperature": 0.7, "seed": 1}},
        ]
    gp = {"max_tokens": GSM8K_TOKENS}
    agents += [{"name": "base_gsm8k", "system": SYSTEM["gsm8k"], "model": "fp32", "params": gp}]
    if f"math-{INT4}" in a:
        agents += [{"name": "math_int4", "system": SYSTEM["gsm8k"], "model": "int4", "adapter": "math", "params": gp,
                    "capabilities": ["math"]}]
    agents.append({"name": "router", "model": "fp32", "params": {"max_tokens": 6},
                   "system": "You route requests to a specialist. Answer with exactly one name."})
    return {"name": "team_quality", "models": models, "agents": agents, "teams": [{"name": "x", "topology": "pipeline",
                                                                                    "members": ["base_sst2"]}]}


def label_scoring(base: str, items) -> dict:
    """Zero-shot accuracy of the fp32 base picking the most likely label (evaluate.choice): no generation."""
    from slimswarm.evaluate.choice import choice_accuracy
    from slimswarm.models.load import load

    m = load(base)
    t = time.perf_counter()
    res = choice_accuracy(m.model, m.tokenizer, items)
    wall = time.perf_counter() - t
    lo, hi = wilson(res["correct"], res["items"])
    return {"items": res["items"], "accuracy": res["accuracy"], "ci_low": lo, "ci_high": hi, "failed": 0,
            "wall_s": wall, "items_per_s": res["items"] / wall,
            "label_counts": {k: res["picks"].count(k) for k in sorted(set(res["picks"]))}}


def build(cfg: dict, team: dict, labels: list[str], costs: dict[str, float] | None = None):
    """A Team from the shared config with ``team`` as its main team."""
    from slimswarm.agents.config import build_team, parse_config

    c = dict(cfg, teams=[team], main=team["name"], answer={"labels": labels})
    t = build_team(parse_config(c, "team_quality"))
    for a in t.agents():
        if costs and a.name in costs:
            a.cost = costs[a.name]
    return t


def run_team(team, items, backend, parallel: int = 8) -> dict:
    """Run ``items`` through ``team``, scored with tasks.is_correct (label synonyms as in `slimswarm finetune`)."""
    from slimswarm.agents.runner import run_tasks
    from slimswarm.agents.trace import Tracer, percentile
    from slimswarm.tasks import is_correct

    tracer = Tracer()
    rep = run_tasks(team, as_tasks(items), backend, tracer, None, parallel)
    by_id = {it.id: it for it in items}
    ok = sum(r.status == "ok" and is_correct(by_id[r.id], r.output or "") for r in rep.tasks)
    n = len(rep.tasks)
    lat = [r.latency_s for r in rep.tasks if r.status == "ok"]
    calls = tracer.calls()
    agents = {a.name: a for a in team.agents()}
    cost = sum(agents[c["agent"]].cost * (c["prompt_tokens"] + c["completion_tokens"]) / 1000 for c in calls)
    lo, hi = wilson(ok, n)
    return {"items": n, "accuracy": ok / n, "ci_low": lo, "ci_high": hi,
            "failed": sum(r.status != "ok" for r in rep.tasks),
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "tokens_per_item": sum(r.tokens for r in rep.tasks) / n,
            "generated_per_item": sum(c["completion_tokens"] for c in calls) / n,
            "calls_per_item": len(calls) / n, "cost_per_item": cost / n, "wall_s": rep.wall_s,
            "items_per_s": n / rep.wall_s if rep.wall_s else None}


def cache_tag(base: str, specs) -> str:
    """Results are cached by base model and by the exact specs of the adapters they used."""
    import hashlib

    return Path(base).name + "-" + hashlib.sha1(json.dumps([s.key() for s in specs]).encode()).hexdigest()[:8]


def quality_key(tag: str, task: str, n: int, name: str) -> str:
    return f"quality-{tag}-{task}-{n}-{name}".replace(" ", "_").replace("(", "").replace(")", "")


def cached(key: str, fn):
    """``fn()``'s result, stored under out/team_quality/KEY.json so an interrupted benchmark resumes."""
    p = CACHE / f"{key}.json"
    if p.is_file():
        return json.loads(p.read_text())
    out = fn()
    CACHE.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=2))
    return out


# ---------------------------------------------------------------------------------------------- memory probe
def peak_rss() -> int:
    """This process's peak RSS from VmHWM: getrusage's ru_maxrss survives exec, so a probe started by a large
    parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb * 1024


def probe(kind: str, adapters: dict[str, Path], base: str, n_items: int) -> dict:
    """Peak RSS of this process after loading one configuration and running ``n_items`` mixed items through it:
    team-int4 / team-fp32 (one base, every adapter) or single (one fp32 model, no adapter: one agent's copy)."""
    import torch

    from slimswarm.agents.backends import EngineBackend
    from slimswarm.agents.config import ModelSpec
    from slimswarm.agents.runner import load_engine, run_tasks
    from slimswarm.evaluate.size import weight_bytes

    rss0 = peak_rss()
    cfg = team_config(adapters, base)
    if kind == "single":
        spec = {"base": base, "max_len": MAX_LEN, "max_batch": 8}
    else:
        spec = cfg["models"]["int4" if kind == "team-int4" else "fp32"]
    if kind == "team-int4":
        # a saved int4 checkpoint: quantizing at load would first hold the fp32 weights and set the peak
        spec = {**spec, "base": str(int4_checkpoint(base)), "compress": None}
    eng = load_engine(ModelSpec(**spec))
    backend = EngineBackend({"int4" if kind == "team-int4" else "fp32": eng})
    mixed = items_for("sst2", n_items // 2) + items_for("agnews", n_items // 2)
    if kind == "single":
        team = build(cfg, {"name": "p", "topology": "pipeline", "members": ["base_sst2"]}, [])
    else:
        sfx = "int4" if kind == "team-int4" else "fp32"
        team = build(cfg, {"name": "p", "topology": "route", "members": [f"sentiment_{sfx}", f"topic_{sfx}"],
                           "router": {"type": "rule", "rules": {f"topic_{sfx}": HAND_NEWS_WORDS}}}, [])
    run_tasks(team, as_tasks(mixed), backend, None, None, 8)
    backend.close()
    bank = eng.adapters
    with open("/proc/self/statm") as f:
        rss_end = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"kind": kind, "peak_rss_bytes": peak_rss(),
            "rss_end_bytes": rss_end,
            "rss_before_load_bytes": rss0, "weight_bytes": weight_bytes(eng.model),
            "adapter_bytes": bank.nbytes() if bank is not None else 0, "adapters": len(bank) if bank else 0,
            "kv_bytes": eng.kv_bytes}


def int4_checkpoint(base: str) -> Path:
    """The base quantized with the int4 recipe, saved once (bit-identical to quantizing it at load)."""
    from slimswarm.compress.quant.apply import quantize_model
    from slimswarm.compress.recipe import load_recipe
    from slimswarm.models.checkpoint import save_checkpoint
    from slimswarm.models.load import load

    ck = CACHE / f"{Path(base).name}-{INT4}"
    if not (ck / "slimswarm.json").exists():
        loaded, recipe = load(base), load_recipe(INT4)
        meta = quantize_model(loaded.model, recipe.quantize)
        save_checkpoint(loaded.model, loaded.tokenizer, ck, {"recipe": recipe.model_dump(), "quantization": meta,
                                                             "parent": {"source": str(loaded.source)}}, overwrite=True)
    return ck


def run_probe(kind: str, n_items: int, base: str, adapters: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--probe", kind, "--probe-items", str(n_items), "--base", base,
                          "--adapters", adapters],
                         capture_output=True, text=True, env={**os.environ, "SLIMSWARM_QUIET": "1"})
    if out.returncode != 0:
        raise SystemExit(f"memory probe {kind} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main
def plot(rows: list[dict], path: Path, model: str = "SmolLM2-135M") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = [r for r in rows if r["section"] == "quality"]
    configs = list(dict.fromkeys(r["config"] for r in q))
    tasks = list(dict.fromkeys(r["task"] for r in q))
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / max(1, len(tasks))
    for j, t in enumerate(tasks):
        rs = [next((r for r in q if r["config"] == c and r["task"] == t), None) for c in configs]
        xs = [i + (j - (len(tasks) - 1) / 2) * w for i in range(len(configs))]
        acc = [r["accuracy"] if r else 0 for r in rs]
        err = [[r["accuracy"] - r["ci_low"] if r else 0 for r in rs],
               [r["ci_high"] - r["accuracy"] if r else 0 for r in rs]]
        ax.bar(xs, acc, w, yerr=err, capsize=3, label=f"{t} (n={rs[0]['items'] if rs[0] else 0})")
    r = [r for r in rows if r["section"] == "router"]
    ax.set_xticks(range(len(configs)), configs, rotation=15, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.axhline(0.85, ls="--", color="gray", lw=0.8)
    ax.legend(fontsize=8)
    ax.set_title(f"{model}: zero-shot base vs LoRA specialists vs a 3-voter panel", fontsize=10)
    if r:
        ax2 = ax.inset_axes([1.08, 0.0, 0.35, 1.0])
        ax2.bar(range(len(r)), [x["accuracy"] for x in r],
                yerr=[[x["accuracy"] - x["ci_low"] for x in r], [x["ci_high"] - x["accuracy"] for x in r]], capsize=3)
        ax2.set_xticks(range(len(r)), [x["config"].replace("router: ", "") for x in r], rotation=30, ha="right",
                       fontsize=7)
        ax2.set_ylim(0, 1)
        ax2.set_title("routers, mixed stream", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="48 SST-2 + 48 AG News items, 48 mixed: a smoke run")
    ap.add_argument("--sst2", type=int, default=872)
    ap.add_argument("--agnews", type=int, default=500)
    ap.add_argument("--gsm8k", type=int, default=100, help="GSM8K test items (worked solutions: ~100x the tokens)")
    ap.add_argument("--mixed", type=int, default=240, help="items in the router stream (half SST-2, half AG News)")
    ap.add_argument("--router-train", type=int, default=240,
                    help="train-split items (half SST-2, half AG News) the learned routers learn from before the test stream")
    ap.add_argument("--lam", type=float, default=1.0, help="router reward = correct − λ·cost·tokens/1000")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--adapters", default="out/adapters", help="where specialists are cached (trained when missing)")
    ap.add_argument("--sections", default="quality,memory,router")
    ap.add_argument("--out", default=str(RESULTS / "team_quality"))
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--probe-items", type=int, default=16, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("SLIMSWARM_THREADS", "2")))
    from slimswarm.agents.specialists import default_specs, ensure_specialists

    specs = default_specs(base=args.base)
    if args.probe:
        adapters = {s.name: Path(args.adapters) / s.name for s in specs}
        print(json.dumps(probe(args.probe, adapters, args.base, args.probe_items)))
        return 0
    if args.quick:
        args.sst2 = args.agnews = args.mixed = 48
        args.gsm8k, args.router_train = 8, 48
    sections = set(args.sections.split(","))
    log = lambda s: print(time.strftime("%H:%M:%S"), s, flush=True)  # noqa: E731
    log("specialists:")
    adapters = ensure_specialists(specs, args.adapters, log)
    train_s = {n: json.loads((p / "adapter.json").read_text())["train"]["seconds"] for n, p in adapters.items()}

    from slimswarm.agents.backends import EngineBackend
    from slimswarm.agents.config import ModelSpec
    from slimswarm.agents.runner import load_engine
    from slimswarm.evaluate.size import weight_bytes
    from slimswarm.tasks import LABELS, load_task

    cfg = team_config(adapters, args.base)
    engines = {}

    def backend():
        if not engines:
            for k, spec in cfg["models"].items():
                log(f"loading engine {k} ...")
                engines[k] = load_engine(ModelSpec(**spec))
        return EngineBackend(engines)

    tag = cache_tag(args.base, [s for s in specs if s.role != "math"])  # router + memory: sentiment and topic
    rows: list[dict] = []
    if "quality" in sections:
        single = {"zero-shot base fp32": ("base_{task}", None), "specialist fp32": ("{role}_fp32", None),
                  f"specialist {INT4}": ("{role}_int4", None),
                  f"panel of 3 ({INT4})": (None, ["{role}_int4", "{role}_int4_xfer", "{role}_int4_t07"])}
        math_only = {"zero-shot base fp32": ("base_gsm8k", None), f"specialist {INT4}": ("math_int4", None)}
        for task, role, n in (("sst2", "sentiment", args.sst2), ("agnews", "topic", args.agnews),
                              ("gsm8k", "math", args.gsm8k)):
            items = items_for(task, n)
            # cached per task, by the specs of that task's adapters only
            ttag = cache_tag(args.base, [s for s in specs if s.task == task])
            for name, (one, voters) in (math_only if task == "gsm8k" else single).items():
                if voters:
                    team = {"name": "t", "topology": "vote", "vote": "majority",
                            "members": [v.format(role=role) for v in voters]}
                else:
                    team = {"name": "t", "topology": "pipeline", "members": [one.format(task=task, role=role)]}
                key = quality_key(ttag, task, len(items), name)
                log(f"{task}: {name} on {len(items)} items ...")
                res = cached(key, lambda: run_team(build(cfg, team, LABELS.get(task, [])), items, backend()))
                log(f"  accuracy {res['accuracy']:.3f} [{res['ci_low']:.3f}, {res['ci_high']:.3f}], "
                    f"p50 {res['latency_p50_s']:.2f}s, {res['wall_s']:.0f}s")
                rows.append({"section": "quality", "task": task, "config": name, **res})
            if task in LABELS:  # the base's best case: the most likely label, with no generation at all
                name = "zero-shot base fp32 (label scoring)"
                log(f"{task}: {name} on {len(items)} items ...")
                res = cached(quality_key(ttag, task, len(items), name), lambda: label_scoring(args.base, items))
                log(f"  accuracy {res['accuracy']:.3f} [{res['ci_low']:.3f}, {res['ci_high']:.3f}]")
                rows.append({"section": "quality", "task": task, "config": name, **res})

    if "router" in sections:
        mixed = items_for("sst2", args.mixed // 2) + items_for("agnews", args.mixed - args.mixed // 2)
        random.Random(0).shuffle(mixed)
        b = backend()
        w = {k: weight_bytes(e.model) for k, e in engines.items()}
        # an arm's price per 1k tokens: the weight bytes its decode reads, relative to the fp32 base
        costs = {}
        for role in ("sentiment", "topic"):
            costs[f"{role}_fp32"], costs[f"{role}_int4"] = 1.0, w["int4"] / w["fp32"]
        costs["router"] = 1.0
        arms = ["sentiment_fp32", "sentiment_int4", "topic_fp32", "topic_int4"]
        news = news_words()
        feats = {"review": REVIEW_WORDS, "news": news}
        routers = {
            "router: fixed rule": {"type": "rule", "rules": {"topic_fp32": news}, "default": "sentiment_fp32"},
            "router: learned (LinUCB, keywords)": {"type": "bandit", "features": feats, "alpha": 0.5,
                                                   "lambda": args.lam},
            "router: learned (LinUCB, hashed words)": {"type": "bandit", "hashed": 256, "alpha": 0.5,
                                                       "lambda": args.lam},
            # less exploration and fewer buckets: in 257 dimensions every unseen word keeps the α-bonus high
            "router: learned (LinUCB, hashed words, alpha 0.1, 64 buckets)": {"type": "bandit", "hashed": 64,
                                                                          "alpha": 0.1, "lambda": args.lam},
            "router: prompt (base model)": {"type": "prompt", "agent": "router"},
        }
        # the learned routers first learn from a stream of train-split items (bandit feedback: only the chosen arm's
        # reward), then keep learning on the test stream that is scored; train and test items never overlap
        warm = load_task("sst2", "train", args.router_train // 2, seed=7) + \
            load_task("agnews", "train", args.router_train - args.router_train // 2, seed=7)
        random.Random(7).shuffle(warm)
        labels = LABELS["sst2"] + LABELS["agnews"]
        for name, r in routers.items():
            team = {"name": "desk", "topology": "route", "members": arms, "router": r}
            learned = r["type"] in ("bandit", "epsilon")
            # a router's keyword lists are part of its cache key
            words = hashlib.sha1(json.dumps(r).encode()).hexdigest()[:6] + "-" if "rules" in r or "features" in r else ""
            key = (f"router-{tag}-{len(mixed)}-{args.lam}-{len(warm) if learned else 0}-{words}{name}"
                   .replace(" ", "_").replace("(", "").replace(")", "").replace(",", ""))
            log(f"mixed stream: {name} on {len(mixed)} items"
                f"{f' after {len(warm)} train-split items' if learned else ''} ...")

            def go(team=team, learned=learned):
                t = build(cfg, team, labels, costs)
                pre = _route_run(t, warm, b) if learned else None
                res = _route_run(t, mixed, b)
                if pre is not None:
                    res.update(train_items=pre["items"], train_accuracy=pre["accuracy"],
                               train_arm_counts=pre["arm_counts"])
                return res

            # parallel 1: the bandit sees each reward before its next choice, as it would in a live stream
            res = cached(key, go)
            log(f"  accuracy {res['accuracy']:.3f}, cost/item {res['cost_per_item']:.4f}, arms {res['arm_counts']}")
            rows.append({"section": "router", "task": "mixed", "config": name, **res})

    if "memory" in sections:
        n_agents = 4  # sentiment + topic specialists x (fp32-trained, int4-trained) adapters on the int4 base
        log("memory probes (one subprocess each) ...")
        int4_checkpoint(args.base)
        probes = {k: cached(f"memory-{tag}-{k}", lambda k=k: run_probe(k, 16, args.base, args.adapters))
                  for k in ("single", "team-fp32", "team-int4")}
        one = probes["single"]
        one_bytes = one["weight_bytes"] + one["kv_bytes"]
        for k, p in probes.items():
            n = 1 if k == "single" else n_agents if k == "team-int4" else 2
            team_bytes = p["weight_bytes"] + p["adapter_bytes"] + p["kv_bytes"]
            rows.append({"section": "memory", "task": "mixed", "config": k, "agents": n, "adapters": p["adapters"],
                         "weight_bytes": p["weight_bytes"], "adapter_bytes": p["adapter_bytes"],
                         "kv_bytes": p["kv_bytes"],
                         "weights_kv_adapters_bytes": team_bytes, "peak_rss_bytes": p["peak_rss_bytes"],
                         "rss_end_bytes": p["rss_end_bytes"],
                         "n_copies_bytes": n * one_bytes, "n_copies_rss_bytes": n * one["peak_rss_bytes"],
                         "bytes_vs_one_model": team_bytes / one_bytes,
                         "rss_vs_one_model": p["peak_rss_bytes"] / one["peak_rss_bytes"]})

    for e in engines.values():
        e.stop()
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "SLIMSWARM_THREADS") if k in os.environ)
    cmd = (env + " " if env else "") + "nice .venv/bin/python benchmarks/team_quality.py " + " ".join(sys.argv[1:])
    notes = ["each row is cached under out/team_quality/ by its settings and adapter specs: a split or interrupted "
             "run resumes, and this table may join rows measured by earlier invocations",
             f"training seconds per adapter (2 cores shared with other jobs, 1 torch thread): {json.dumps(train_s)}",
             f"quality: greedy, max_tokens 3 (zero-shot base: {ZERO_SHOT_TOKENS}; GSM8K: {GSM8K_TOKENS}), tasks.is_correct "
             "scoring (the first label word named; GSM8K: the number after '####', else the last number); parallel 8 "
             "tasks in flight (latency includes queueing in the shared batch)",
             "zero-shot base fp32 (label scoring): the fp32 base's most likely label as the reply's continuation "
             "(log P summed over the label's tokens; slimswarm.evaluate.choice), no generation: the base's best case",
             "panel: majority of {int4 adapter greedy, fp32-trained adapter served on the int4 base, int4 adapter "
             "T=0.7 seed 1}, all on one int4 base in one batch",
             "memory: peak RSS (VmHWM) and RSS at the end, in one subprocess per configuration (team-int4 loads a "
             "saved int4 checkpoint); N copies computed as N x the single fp32 model, not loaded; adapter_bytes is "
             "the AdapterBank's resident stacks (one zero slot included); KV = 8 rows x 512 tokens",
             "router: arms = {sentiment, topic} x {fp32 (cost 1), int4 (cost = int4/fp32 weight bytes)}, reward = "
             "correct - lambda*cost*tokens/1000; one task at a time so the bandit learns before its next choice; the learned "
             f"routers first learn online from {args.router_train} train-split items (train_accuracy: on that stream), "
             "then are scored on the test stream while still learning"]
    paths = write(rows, Path(args.out), cmd, notes, Path(args.base).name)
    log(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _route_run(team, items, backend) -> dict:
    from collections import Counter

    router, picks = team.router, []
    choose = router.choose

    def counted(text, ctx=None):
        arm = choose(text, ctx)
        picks.append(arm)
        return arm

    router.choose = counted  # the run report says what was answered, not who was picked: count the picks here
    res = run_team(team, items, backend, parallel=1)
    res["arm_counts"] = dict(Counter(picks))
    return res


def write(rows: list[dict], stem: Path, cmd: str, notes: list[str], model: str) -> list[Path]:
    from slimswarm.evaluate.report import write_report

    from slimswarm.evaluate.report import markdown_table

    paths = list(write_report(rows, stem, cmd, notes).values())
    # one table a section: the rows of the JSON share no columns across sections
    cols = {"quality": ["task", "config", "items", "accuracy", "ci_low", "ci_high", "latency_p50_s", "latency_p95_s",
                        "tokens_per_item", "generated_per_item", "calls_per_item", "items_per_s", "failed"],
            "router": ["config", "items", "accuracy", "ci_low", "ci_high", "cost_per_item", "tokens_per_item",
                       "arm_counts", "train_items", "train_accuracy", "latency_p50_s"],
            "memory": ["config", "agents", "adapters", "weight_bytes", "adapter_bytes", "kv_bytes",
                       "weights_kv_adapters_bytes", "n_copies_bytes", "bytes_vs_one_model", "peak_rss_bytes",
                       "rss_end_bytes", "n_copies_rss_bytes", "rss_vs_one_model"]}
    md = f"Command: `{cmd}`\n"
    for sec, c in cols.items():
        rs = [r for r in rows if r["section"] == sec]
        if rs:
            md += f"\n### {sec}\n\n" + markdown_table(rs, c) + "\n"
    md += "".join(f"\n- {n}" for n in notes) + "\n"
    stem.with_suffix(".md").write_text(md)
    if any(r["section"] == "quality" for r in rows):
        paths.append(plot(rows, stem.with_suffix(".png"), model))
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
