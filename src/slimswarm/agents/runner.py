"""Runs a team over JSONL tasks {id, input, expected}: scoring, failures isolated per task, router feedback,
the run report (accuracy, completion, latency, tokens, memory per agent), backends from a team config, replay."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field

from ..errors import SlimswarmError
from .backends import Backend, BackendError, ReplayBackend, ReplayDivergence, load_jsonl
from .router import reward
from .runtime import BudgetExceeded, TaskContext
from .team import Team
from .trace import Tracer, agent_summary, percentile


@dataclass
class TaskResult:
    id: str
    status: str  # ok | failed | budget_exceeded
    output: str | None = None
    answer: str | None = None
    expected: str | None = None
    correct: bool | None = None
    error: str | None = None
    latency_s: float = 0.0
    tokens: int = 0
    calls: int = 0


@dataclass
class RunReport:
    tasks: list[TaskResult]
    agents: dict[str, dict]
    wall_s: float
    peak_rss_bytes: int
    extra: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        scored = [t for t in self.tasks if t.expected is not None]
        return sum(bool(t.correct) for t in scored) / len(scored) if scored else None

    @property
    def completion_rate(self) -> float:
        return sum(t.status == "ok" for t in self.tasks) / len(self.tasks) if self.tasks else 0.0

    def summary(self) -> dict:
        lat = [t.latency_s for t in self.tasks if t.status == "ok"]
        return {"tasks": len(self.tasks), "accuracy": self.accuracy, "completion_rate": self.completion_rate,
                "failed": sum(t.status == "failed" for t in self.tasks),
                "budget_exceeded": sum(t.status == "budget_exceeded" for t in self.tasks),
                "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
                "tokens": sum(t.tokens for t in self.tasks), "wall_s": self.wall_s,
                "peak_rss_bytes": self.peak_rss_bytes, **self.extra}


def read_tasks(path, max_tasks: int | None = None) -> list[dict]:
    rows = load_jsonl(path)
    out = []
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or "input" not in r:
            raise SlimswarmError(f"{path}:{i}: a task is a JSON object with keys id, input, expected")
        out.append({"id": str(r.get("id", i)), "input": str(r["input"]),
                    "expected": None if r.get("expected") is None else str(r["expected"])})
    ids = [t["id"] for t in out]
    dup = next((x for x in ids if ids.count(x) > 1), None)
    if dup is not None:
        raise SlimswarmError(f"{path}: task id {dup!r} appears twice (trace replay keys calls by task id)")
    return out[:max_tasks] if max_tasks else out


def run_task(team: Team, task: dict, backend: Backend, tracer: Tracer | None, budget_tokens: int | None) -> TaskResult:
    """One task; a failing backend or a spent budget ends this task only."""
    ctx = TaskContext(task["id"], backend, tracer, budget_tokens, logprobs=team.needs_logprobs())
    res = TaskResult(task["id"], "ok", expected=task.get("expected"))
    t0 = time.perf_counter()
    try:
        res.output = team.run(task["input"], ctx)
    except BudgetExceeded as e:
        res.status, res.error = "budget_exceeded", str(e)
    except ReplayDivergence:
        raise  # a replay that diverges is the answer to "does it reproduce", not one failed task
    except (BackendError, SlimswarmError) as e:
        res.status, res.error = "failed", str(e)
    except Exception as e:  # a bug in a tool, a router, a backend: recorded, the run goes on
        res.status, res.error = "failed", f"{type(e).__name__}: {e}"
    res.latency_s = time.perf_counter() - t0
    res.tokens, res.calls = ctx.used_tokens, ctx.calls
    if res.output is not None:
        res.answer = team.extract(res.output, res.expected)
    if res.expected is not None:
        res.correct = res.status == "ok" and team.extract.correct(res.output, res.expected)
    # learned routers learn from the outcome: accuracy − λ·cost of the member they picked
    for note in ctx.notes.get("routes", []):
        r = note["team"].router
        if res.expected is not None:
            r.update(note["text"], note["arm"], reward(bool(res.correct), note["tokens"], note["cost"],
                                                       getattr(r, "lam", 0.0)))
    if tracer is not None:
        rec = {"type": "task", **asdict(res)}
        rec["routes"] = [n["arm"] for n in ctx.notes.get("routes", [])]
        tracer.add(rec)
    return res


def run_tasks(team: Team, tasks: list[dict], backend: Backend, tracer: Tracer | None = None,
              budget_tokens: int | None = None, parallel: int = 1, header: dict | None = None,
              on_result=None) -> RunReport:
    """Run every task (``parallel`` at a time: more rows in each engine batch, but a learned router then sees
    its rewards in completion order). Returns the report; the trace gets a header, every call, every task."""
    team.validate()
    if tracer is not None:
        tracer.add({"type": "run", "backend": backend.name, "budget_tokens": budget_tokens, "parallel": parallel,
                    "tasks": tasks, **(header or {})})
    t0 = time.perf_counter()
    results: list[TaskResult] = []
    if parallel <= 1:
        for t in tasks:
            results.append(run_task(team, t, backend, tracer, budget_tokens))
            if on_result:
                on_result(results[-1])
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(parallel, thread_name_prefix="task") as pool:
            futs = [pool.submit(run_task, team, t, backend, tracer, budget_tokens) for t in tasks]
            for f in futs:
                results.append(f.result())
                if on_result:
                    on_result(results[-1])
    wall = time.perf_counter() - t0
    kv = None
    if hasattr(backend, "kv_bytes_per_token"):
        kv = {}
        for a in team.agents():
            try:
                kv[a.name] = backend.kv_bytes_per_token(a)
            except Exception:  # an agent served remotely has no local KV cache
                pass
    calls = tracer.calls() if tracer is not None else []
    # ru_maxrss is KiB on Linux: the whole process, shared weights included
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return RunReport(results, agent_summary(calls, kv), wall, rss)


def replay(trace_path, team: Team | None = None) -> tuple[RunReport, list[str]]:
    """Re-run a recorded run with no model: same team (from the trace header), same tasks, replies from the trace.
    Returns the new report and a list of mismatches against the recorded task outputs (empty: reproduced)."""
    records = load_jsonl(trace_path)
    head = next((r for r in records if r.get("type") == "run"), None)
    if head is None:
        raise SlimswarmError(f"{trace_path}: no run header (was it written by slimswarm team run?)")
    if team is None:
        from .config import build_team, parse_config

        if "team_config" not in head:
            raise SlimswarmError(f"{trace_path}: the header holds no team_config")
        team = build_team(parse_config(head["team_config"], f"{trace_path} team_config"))
    recorded = {r["id"]: r for r in records if r.get("type") == "task"}
    backend = ReplayBackend(records)
    tracer = Tracer()
    report = run_tasks(team, head["tasks"], backend, tracer, head.get("budget_tokens"), head.get("parallel", 1))
    diffs = []
    for t in report.tasks:
        old = recorded.get(t.id)
        if old is None:
            diffs.append(f"task {t.id}: not in the recorded run")
        elif (old["status"], old["output"]) != (t.status, t.output):
            diffs.append(f"task {t.id}: recorded {old['status']} {str(old['output'])[:60]!r}, "
                         f"replayed {t.status} {str(t.output)[:60]!r}")
    if backend.unused():
        diffs.append(f"{backend.unused()} recorded calls were not replayed")
    return report, diffs


def backend_from_config(cfg, kind: str, url: str | None = None, timeout_s: float = 120.0,
                        http_model: str | None = None) -> Backend:
    """The backend a team file asks for: engine (loads its models), http (a server at ``url``), or scripted
    (the file's ``script`` rules). Agents on declared endpoints always go to those endpoints."""
    from .backends import EngineBackend, HTTPBackend, RoutedBackend, ScriptedBackend

    if kind == "scripted":
        if not cfg.script:
            raise SlimswarmError("--backend scripted: the team file has no `script` rules")
        default: Backend = ScriptedBackend([r.model_dump() for r in cfg.script])
    elif kind == "http":
        if not url:
            raise SlimswarmError("--backend http needs --url URL")
        names = {k: m.base for k, m in cfg.models.items()}
        default = HTTPBackend(url, http_model, timeout_s, names=names)
    elif kind == "engine":
        if not cfg.models:
            raise SlimswarmError("--backend engine: the team file declares no model (model: {base: ...})")
        default = EngineBackend({k: load_engine(m) for k, m in cfg.models.items()}, timeout_s)
    else:
        raise SlimswarmError(f"--backend {kind!r}: expected engine, http or scripted")
    if not cfg.endpoints:
        return default
    return RoutedBackend(default, {k: HTTPBackend(e.url, e.model, e.timeout_s) for k, e in cfg.endpoints.items()})


def load_engine(spec):
    """Load a model spec (base, optional compression recipe applied at load, optional LoRA adapters) into an
    Engine. LoRA needs compress/lora.py's AdapterBank; without it, declaring adapters is a clear error."""
    import torch

    from ..engine.engine import Engine
    from ..models.load import load

    loaded = load(spec.base, dtype=getattr(torch, spec.dtype))
    if spec.compress:
        from ..compress.quant.apply import quantize_model
        from ..compress.recipe import load_recipe

        recipe = load_recipe(spec.compress)
        if recipe.quantize is None:
            raise SlimswarmError(f"model {spec.base}: recipe {spec.compress} has no quantize section")
        if recipe.quantize.needs_calibration:
            from ..compress.calibrate import calibration_batch

            c = recipe.calibration
            calib = calibration_batch(loaded.tokenizer, None, c.samples, c.seq_len)
        else:
            calib = None
        quantize_model(loaded.model, recipe.quantize, calib)
    bank = None
    if spec.adapters:
        try:
            from ..compress.lora import AdapterBank
        except ImportError:
            raise SlimswarmError(f"model {spec.base}: adapters need slimswarm.compress.lora (not available yet)") from None
        bank = AdapterBank(loaded.model, dict(spec.adapters))
    max_len = min(spec.max_len, getattr(loaded.model.config, "max_position_embeddings", spec.max_len))
    eng = Engine(loaded.model, loaded.tokenizer, max_batch=spec.max_batch, max_len=max_len, adapters=bank)
    eng.source = loaded.source  # for trace labels: which weights answered
    eng.recipe = spec.compress
    return eng
