"""Trace: every agent call of a run as JSONL, per-agent accounting, and a timeline PNG (one lane per agent)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from .message import Message


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), None for no values."""
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class Tracer:
    """Collects records in memory and, given a path, appends each as one JSON line as it happens (a crash keeps
    everything up to it). Record types: run (header: team config and tasks), call, tool, task."""

    def __init__(self, path: str | Path | None = None):
        self.records: list[dict] = []
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("w", encoding="utf-8")

    def add(self, rec: dict) -> None:
        with self._lock:
            self.records.append(rec)
            if self._fh is not None:
                self._fh.write(json.dumps(rec, default=str) + "\n")
                self._fh.flush()

    def call(self, task_id, agent, model: str, messages: list[Message], comp, start: float, end: float,
             error: str | None, structured: dict | None = None) -> None:
        rec = {"type": "call", "task": task_id, "agent": agent.name, "model": model, "adapter": agent.model.adapter,
               "messages": [m.to_dict() for m in messages], "reply": None if comp is None else comp.text,
               "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "latency_s": end - start,
               "ttft_s": None, "start": start, "end": end, "error": error}
        if comp is not None:
            rec.update(prompt_tokens=comp.prompt_tokens, completion_tokens=comp.completion_tokens,
                       cached_tokens=comp.cached_tokens, latency_s=comp.latency_s, ttft_s=comp.ttft_s,
                       finish_reason=comp.finish_reason)
            if comp.logprobs is not None:
                rec["logprobs"] = comp.logprobs
            if getattr(comp, "route", None):
                rec["route"] = comp.route
            if comp.tool_calls:
                rec["tool_calls"] = comp.tool_calls
        if structured:  # the tools / response_format the call was decoded under (replay takes the same path)
            rec["structured"] = structured
        self.add(rec)

    def tool(self, task_id, agent: str, tool: str, arguments, result, error: str | None) -> None:
        self.add({"type": "tool", "task": task_id, "agent": agent, "tool": tool, "arguments": arguments,
                  "result": result, "error": error})

    def calls(self) -> list[dict]:
        return [r for r in self.records if r["type"] == "call"]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def agent_summary(calls: list[dict], kv_bytes_per_token: dict[str, int] | None = None) -> dict[str, dict]:
    """Per agent: calls, errors, tokens, cache hits, latency p50/p95, and (given KV bytes a token) the peak KV
    bytes one of its sequences held — the memory an agent adds on top of the shared weights."""
    out: dict[str, dict] = {}
    for r in calls:
        a = out.setdefault(r["agent"], {"model": r.get("model"), "calls": 0, "errors": 0, "prompt_tokens": 0,
                                        "completion_tokens": 0, "cached_tokens": 0, "cache_hits": 0,
                                        "_lat": [], "_peak": 0})
        a["calls"] += 1
        a["errors"] += bool(r.get("error"))
        a["prompt_tokens"] += r.get("prompt_tokens", 0)
        a["completion_tokens"] += r.get("completion_tokens", 0)
        a["cached_tokens"] += r.get("cached_tokens", 0)
        a["cache_hits"] += r.get("cached_tokens", 0) > 0
        if not r.get("error"):
            a["_lat"].append(r["latency_s"])
        a["_peak"] = max(a["_peak"], r.get("prompt_tokens", 0) + r.get("completion_tokens", 0))
    for name, a in out.items():
        lat = a.pop("_lat")
        peak = a.pop("_peak")
        a["latency_p50_s"] = percentile(lat, 50)
        a["latency_p95_s"] = percentile(lat, 95)
        if kv_bytes_per_token and name in kv_bytes_per_token:
            a["peak_kv_bytes"] = peak * kv_bytes_per_token[name]
    return out


def timeline_png(calls: list[dict], path: str | Path, title: str = "agent calls") -> Path:
    """One horizontal lane per agent, one bar per call (start → end, seconds from the first call); red = failed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    agents = list(dict.fromkeys(r["agent"] for r in calls))
    t0 = min((r["start"] for r in calls), default=0.0)
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(agents) + 1.5))
    tasks = list(dict.fromkeys(r.get("task") for r in calls))
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 3]  # red is kept for failures
    for r in calls:
        lane = agents.index(r["agent"])
        color = "tab:red" if r.get("error") else palette[tasks.index(r.get("task")) % len(palette)]
        # translucent: with tasks in parallel, one agent's calls overlap in its lane
        ax.barh(lane, max(r["end"] - r["start"], 1e-4), left=r["start"] - t0, color=color, alpha=0.75,
                edgecolor="black", linewidth=0.3, height=0.6)
    ax.set_yticks(range(len(agents)), agents)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first call (colour: task; red: failed)")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
