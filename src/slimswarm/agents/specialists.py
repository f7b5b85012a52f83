"""Specialist agents: LoRA adapters trained per role (sentiment, topic, math) on one shared base, cached on disk."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import SlimswarmError

ROLES = {"sentiment": "sst2", "topic": "agnews", "math": "gsm8k"}
SPEC_VERSION = 1  # bump when training changes in a way the fields below do not capture
DEFAULT_ROOT = Path("out/adapters")


@dataclass(frozen=True)
class SpecialistSpec:
    """Everything that decides an adapter's weights; a cached adapter is reused only when all of it matches."""

    role: str
    base: str = "smollm2-135m"
    quantize: str | None = None  # an RTN recipe applied before training (QLoRA-style); the adapter then serves on it
    examples: int = 480
    steps: int = 60
    batch_size: int = 8
    r: int = 8
    lr: float = 1e-3
    upper_layers: int | None = None  # LoRA on the top N layers only (the backward stops there); None: all layers
    max_len: int = 192
    seed: int = 0

    def __post_init__(self):
        if self.role not in ROLES:
            raise SlimswarmError(f"specialist role {self.role!r}: expected one of {', '.join(ROLES)}")

    @property
    def task(self) -> str:
        return ROLES[self.role]

    @property
    def name(self) -> str:
        return self.role + (f"-{self.quantize}" if self.quantize else "")

    def key(self) -> dict:
        return {"version": SPEC_VERSION, **asdict(self)}


def lora_targets(n_layers: int, upper: int | None) -> list[str]:
    from ..compress.lora import DEFAULT_TARGETS

    if not upper or upper >= n_layers:
        return list(DEFAULT_TARGETS)
    return [f"*.layers.{i}.*_proj" for i in range(n_layers - upper, n_layers)]


def finetune_config(spec, n_layers: int):
    """The LoRA fine-tuning settings of a specialist spec (any spec with r, upper_layers, steps, batch_size, lr,
    max_len, seed): rank r with alpha 2r on the top ``upper_layers`` layers, a warmup of a fifth of the steps (<= 10)."""
    from ..compress.lora import FinetuneConfig, LoRAConfig

    lora = LoRAConfig(r=spec.r, alpha=2.0 * spec.r, targets=lora_targets(n_layers, spec.upper_layers))
    return FinetuneConfig(lora=lora, steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr, max_len=spec.max_len,
                          seed=spec.seed, warmup=min(10, spec.steps // 5), log_every=max(1, spec.steps // 10))


def cached(path: str | Path, spec: SpecialistSpec) -> bool:
    """Whether ``path`` holds an adapter trained from exactly ``spec``."""
    meta = Path(path) / "adapter.json"
    if not meta.is_file() or not (Path(path) / "adapter.safetensors").is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("slimswarm") == spec.key()
    except json.JSONDecodeError:
        return False


def load_base(base: str, quantize: str | None):
    """The shared base, quantized in place with an RTN recipe when asked (what training and serving both see)."""
    from ..compress.quant.apply import quantize_model
    from ..compress.recipe import load_recipe
    from ..models.load import load

    loaded = load(base)
    if quantize:
        recipe = load_recipe(quantize)
        if recipe.quantize is None or recipe.quantize.needs_calibration:
            raise SlimswarmError(f"specialist base recipe {quantize}: use an RTN recipe (w4g128-rtn, w8, ...)")
        quantize_model(loaded.model, recipe.quantize)
    return loaded


def train_specialist(spec: SpecialistSpec, out: str | Path, log=print) -> dict:
    """Train ``spec``'s adapter and write it to ``out`` (atomically); returns its training summary."""
    from ..compress.lora import finetune_lora, save_adapter
    from ..models.checkpoint import file_sha256
    from ..tasks import gsm8k_solutions, load_task, messages_for, target_for

    loaded = load_base(spec.base, spec.quantize)
    tok = loaded.tokenizer
    items = load_task(spec.task, "train", n=spec.examples, seed=spec.seed)
    sol = gsm8k_solutions() if spec.task == "gsm8k" else {}
    pairs = [(tok.chat(messages_for(it)), target_for(it, sol.get(it.id))) for it in items]
    cfg = finetune_config(spec, loaded.model.config.num_hidden_layers)
    log(f"  training specialist {spec.name}: {len(pairs)} {spec.task} train examples, {spec.steps} steps x "
        f"{spec.batch_size}, r={spec.r}, top {spec.upper_layers or 'all'} layers"
        f"{' on a ' + spec.quantize + ' base' if spec.quantize else ''}")
    res = finetune_lora(loaded.model, tok, pairs, cfg,
                        on_log=lambda h: log(f"    step {h['step']}/{spec.steps}  loss {h['loss_ema']:.3f}"))
    meta = {"slimswarm": spec.key(),
            "base": {"source": str(loaded.source), "sha256": file_sha256(loaded.source), "quantize": spec.quantize},
            "train": {"task": spec.task, "examples": len(pairs), "history": res.history,
                      "seconds": round(res.seconds, 1), "trained_params": res.trained_params}}
    save_adapter(loaded.model, out, cfg.lora, meta)
    log(f"  {spec.name}: {res.seconds:.0f}s, final loss {res.history[-1]['loss_ema']:.3f} -> {out}")
    return meta["train"]


def ensure_specialists(specs: list[SpecialistSpec], root: str | Path = DEFAULT_ROOT, log=print) -> dict[str, Path]:
    """{spec.name: adapter folder}: cached adapters whose meta matches are reused, the others trained now."""
    out = {}
    for spec in specs:
        path = Path(root) / spec.name
        if cached(path, spec):
            log(f"  reusing specialist {spec.name} ({path})")
        else:
            train_specialist(spec, path, log)
        out[spec.name] = path
    return out


# The benchmark's specialists per role. Sentiment reads 4x the examples of the first version (1,920 SST-2 train
# sentences, one epoch): with 480, the int4-base specialist scored 84.0% on 300 SST-2 test items, short of 85%.
# Math answers with a worked solution (GSM8K's, calculator notes removed), so its sequences are ~5x longer: LoRA on
# the top 10 layers only, where the backward stops, keeps a step affordable on a CPU.
FULL = {
    "sentiment": {"examples": 1920, "steps": 240},
    "topic": {},
    "math": {"examples": 960, "steps": 120, "batch_size": 4, "max_len": 320, "upper_layers": 10},
}


def full_spec(role: str, base: str = "smollm2-135m", quantize: str | None = None) -> SpecialistSpec:
    """The benchmark's (and the demo's preferred) specialist for ``role`` (an unknown role: SpecialistSpec's error)."""
    return SpecialistSpec(role, base, quantize, **FULL.get(role, {}))


def default_specs(quick: bool = False, base: str = "smollm2-135m", math: bool = True) -> list[SpecialistSpec]:
    """Sentiment and topic specialists on the fp32 base and on the int4 (w4g128-rtn) base, and the math specialist
    on the int4 base.

    ``quick``: 30 steps on 240 examples each, for a fresh clone's demo (a few minutes on 2 cores, less accurate)."""
    out = []
    for q in ("w4g128-rtn", None):  # the int4 ones first: the demo and the panel need them
        for role in ("sentiment", "topic"):
            out.append(replace(SpecialistSpec(role, base, q), steps=30, examples=240) if quick else
                       full_spec(role, base, q))
    if math and not quick:
        out.append(full_spec("math", base, "w4g128-rtn"))
    return out


# -- the demo: a specialist team against one uncompressed model -------------------------------------------------


def demo_items(n: int = 12, seed: int = 0):
    """``n`` held-out items, SST-2 test and AG News held-out alternating (never seen in training)."""
    from ..tasks import load_task

    a, b = load_task("sst2", "test", n=n - n // 2, seed=seed), load_task("agnews", "test", n=n // 2, seed=seed)
    return [x for pair in zip(a, b) for x in pair] + a[len(b):]


def demo_specialists(root: str | Path = DEFAULT_ROOT, quantize: str = "w4g128-rtn", base: str = "smollm2-135m",
                     log=print) -> dict[str, Path]:
    """{role: adapter folder} for the demo's sentiment and topic agents on the ``quantize`` base: the full adapters
    when the benchmark has trained them, else quick ones (30 steps, a few minutes on 2 cores), trained now."""
    out = {}
    for role in ("sentiment", "topic"):
        full = full_spec(role, base, quantize)
        quick = replace(SpecialistSpec(role, base, quantize), steps=30, examples=240)
        path = Path(root) / full.name
        if cached(path, full) or cached(path, quick):
            log(f"  reusing specialist {full.name} ({path})")
        else:
            log(f"  no cached {full.name}: training a quick one ({quick.steps} steps; the benchmark trains "
                f"{full.steps})")
            train_specialist(quick, path, log)
        out[role] = path
    return out


def baseline_config(cfg):
    """The same team on one uncompressed model: the base in fp32, no compression, no adapters."""
    models = {k: m.model_copy(update={"compress": None, "adapters": {}, "dtype": "float32"})
              for k, m in cfg.models.items()}
    agents = [a.model_copy(update={"adapter": None}) for a in cfg.agents]
    return cfg.model_copy(update={"name": f"{cfg.name}-baseline", "models": models, "agents": agents})


def compare_runs(runs: dict, items, parallel: int = 8) -> list[dict]:
    """Run the same task items through each ``{name: (team, backend)}``; one row per run, scored with
    tasks.is_correct: accuracy, latency, tokens."""
    from ..tasks import is_correct
    from .runner import run_tasks
    from .trace import percentile

    tasks = [{"id": it.id, "input": it.input, "expected": it.label} for it in items]
    by_id = {it.id: it for it in items}
    rows = []
    for name, (team, backend) in runs.items():
        rep = run_tasks(team, tasks, backend, None, None, parallel)
        ok = sum(r.status == "ok" and is_correct(by_id[r.id], r.output or "") for r in rep.tasks)
        lat = [r.latency_s for r in rep.tasks if r.status == "ok"]
        rows.append({"name": name, "correct": f"{ok}/{len(tasks)}", "accuracy": ok / len(tasks),
                     "failed": sum(r.status != "ok" for r in rep.tasks),
                     "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
                     "tokens": sum(r.tokens for r in rep.tasks), "wall_s": rep.wall_s,
                     "answers": [r.answer for r in rep.tasks]})
    return rows


def label_scoring_row(model, tokenizer, items, name: str = "one model: fp32, label scoring") -> dict:
    """The one uncompressed model given the help the team's specialists get: each item's answer is the most likely
    of its task's labels (``evaluate.choice``: log P of each label after the same chat prompt), one item at a time so
    the latency is per task like the team's."""
    import os
    import time
    from unittest import mock

    from ..evaluate.choice import choice_accuracy
    from .trace import percentile

    lat, ok, answers = [], 0, []
    for it in items:
        t = time.perf_counter()
        with mock.patch.dict(os.environ, {"SLIMSWARM_QUIET": "1"}):  # no progress line per scored item
            r = choice_accuracy(model, tokenizer, [it], batch_size=8)
        lat.append(time.perf_counter() - t)
        ok += r["correct"]
        answers.append(r["picks"][0])
    return {"name": name, "correct": f"{ok}/{len(items)}", "accuracy": ok / len(items), "failed": 0,
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95), "tokens": 0,
            "wall_s": sum(lat), "answers": answers}


def demo_team(team_file: str | Path, root: str | Path = DEFAULT_ROOT, n_items: int = 12, log=print) -> list[dict]:
    """The demo's team part: the specialist team of ``team_file`` (its adapters trained or reused under ``root``)
    and the same team on one uncompressed model (fp32, no adapters), on the same ``n_items`` held-out items.
    One row each: accuracy, latency, tokens, and the bytes of weights + adapters + KV cache."""
    from ..evaluate.size import weight_bytes
    from .config import build_team, load_team_config
    from .runner import backend_from_config

    cfg = load_team_config(team_file)
    if len(cfg.models) != 1:
        raise SlimswarmError(f"{team_file}: the demo team runs on one shared base (one model entry)")
    key, spec = next(iter(cfg.models.items()))
    if not spec.compress:
        raise SlimswarmError(f"{team_file}: the demo team needs a compressed base (model.compress)")
    trained = demo_specialists(root, spec.compress, spec.base, log)
    adapters = {name: str(trained.get(name, path)) for name, path in spec.adapters.items()}
    cfg = cfg.model_copy(update={"models": {key: spec.model_copy(update={"adapters": adapters})}})
    base = baseline_config(cfg)
    items = demo_items(n_items)
    backends = {}
    try:
        log(f"  loading the team's engine ({spec.base} + {spec.compress}, {len(adapters)} adapters) and one "
            f"{spec.base} fp32 model ...")
        for name, c in ((f"team: {spec.compress} base + {len(adapters)} LoRA specialists", cfg),
                        ("one model: fp32, no adapters", base)):
            backends[name] = (build_team(c), backend_from_config(c, "engine"))
        log(f"  running {len(items)} held-out items (SST-2 + AG News) through each ...")
        rows = compare_runs(backends, items)
        one_engine = list(backends.values())[1][1].engines[key]
        rows.append(label_scoring_row(one_engine.model, one_engine.tokenizer, items))
        for row, (_, backend) in zip(rows, [*backends.values(), list(backends.values())[1]]):
            eng = backend.engines[key]
            row.update(weight_bytes=weight_bytes(eng.model),
                       adapter_bytes=eng.adapters.nbytes() if eng.adapters is not None else 0,
                       kv_bytes=eng.kv_bytes if row is not rows[2] else 0)
            row["memory_bytes"] = row["weight_bytes"] + row["adapter_bytes"] + row["kv_bytes"]
        n = len(build_team(cfg).agents())
        one = rows[1]["memory_bytes"]  # the generating one model (with its KV cache)
        rows.append({"name": f"one fp32 model per agent ({n} agents, computed)", "memory_bytes": n * one})
        return rows
    finally:
        for _, b in backends.values():
            b.close()
            for e in b.engines.values():
                e.stop()
