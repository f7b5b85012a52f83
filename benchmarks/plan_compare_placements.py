"""How does the planner's placement compare with exo-style memory-proportional layer sharding and with "every agent
fp32 where it fits", on the example devices (Raspberry Pi 5, Jetson Orin Nano, MacBook Air M2, an H200 node)?
Memory, predicted p95 latency and predicted quality per agent, all from the same cost and queueing model.

  python benchmarks/plan_compare_placements.py [--team examples/teams/edge_desk_placement.yaml]

- planner: `slimswarm plan`'s exact MILP (objective: worst p95/budget ratio, then bytes).
- exo-style: exo shards one model's layers over every device in proportion to its memory and runs them as a ring;
  no compression and no per-agent adapters, so one fp32 base serves every agent through all devices and links.
- fp32-where-it-fits: every agent gets its own fp32 copy on the device with the most free memory (the most accurate
  variant that fits if fp32 fits nowhere); no shared base.
Predictions only (no device here is real); the figures come from the variants table measured on the 2-core VM."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slimswarm.deploy.devices import load_devices  # noqa: E402
from slimswarm.deploy.pipeline import hop_seconds, unit_bytes  # noqa: E402
from slimswarm.deploy.planner import (Candidate, assess, kv_bytes, load_team, prefill_s,  # noqa: E402
                                      quality_ok, runtime_bytes, service_s, solve)
from slimswarm.evaluate.report import markdown_table  # noqa: E402

RESULTS = ROOT / "benchmarks/results"


def exo_choice(team, tables, devices):
    devs = devices.devices
    out = {}
    for a in team.agents:
        t = tables[a.base]
        v = t.get("fp32")
        units = unit_bytes(v)
        cap = [d.usable_bytes for d in devs]
        share = [c / sum(cap) for c in cap]
        # contiguous ranges with byte shares closest to the memory shares
        bounds, acc, k = [0], 0.0, 0
        for i, b in enumerate(units):
            acc += b / sum(units)
            if k < len(devs) - 1 and acc >= sum(share[: k + 1]) and i + 1 < len(units):
                bounds.append(i + 1)
                k += 1
        bounds.append(len(units))
        stages, stage_s, agent_bytes, layers, pre = [], {}, {}, [], {}
        hop_total = 0.0
        chain = []
        for k in range(len(bounds) - 1):
            lo, hi = bounds[k], bounds[k + 1]
            d = devs[k]
            wb = sum(units[lo:hi])
            nl = max(0, min(hi, len(units) - 1) - max(lo, 1))
            stages.append((d.name, wb))
            stage_s[d.name] = service_s(a, v, d, t) * wb / sum(units)
            pre[d.name] = prefill_s(v, d, t, a.prompt_tokens) * wb / sum(units)  # holds up that stage's batch
            agent_bytes[d.name] = int(kv_bytes(a, v) * nl / v.layers)
            layers.append((max(lo, 1) - 1, min(hi, len(units) - 1) - 1))
            chain.append(d.name)
        for x, y in zip(chain, chain[1:] + chain[:1]):
            link = devices.link(x, y)
            hop_total += hop_seconds(link, v.hidden_size or 576, a) if link else math.inf
        total = sum(stage_s.values()) + hop_total
        stage_s = {d: s + hop_total / len(chain) for d, s in stage_s.items()}
        out[a.name] = Candidate(a.name, "fp32", f"{a.base}:fp32", stages, agent_bytes, total, stage_s, layers,
                                shared_stages=True, stage_pre=pre)  # one sharded model serves every agent
    return out


def fp32_choice(team, tables, devices):
    free = {d.name: d.usable_bytes for d in devices.devices}
    by = devices.by_name()
    out = {}
    for a in team.agents:
        t = tables[a.base]
        order = [t.get("fp32")] + sorted((v for v in t.variants if v.name != "fp32"),
                                         key=lambda v: v.delta_ppl or 0)
        for v in order:
            held = v.weight_bytes + team.prefix_cache_bytes  # one engine per agent here: its own prefix cache
            need = held + a.adapter_bytes + kv_bytes(a, v)
            d = max(free, key=lambda n: free[n] - (runtime_bytes(by[n], t) if free[n] == by[n].usable_bytes else 0))
            extra = runtime_bytes(by[d], t) if free[d] == by[d].usable_bytes else 0
            if need + extra <= free[d]:
                free[d] -= need + extra
                s = service_s(a, v, by[d], t)
                out[a.name] = Candidate(a.name, v.name, f"{a.base}:{v.name}[{a.name}]", [(d, held)],
                                        {d: a.adapter_bytes + kv_bytes(a, v)}, s, {d: s},
                                        stage_pre={d: prefill_s(v, by[d], t, a.prompt_tokens)},
                                        prefix_cache_bytes=team.prefix_cache_bytes)
                break
        else:
            raise SystemExit(f"fp32-where-it-fits: agent {a.name} fits nowhere")
    return out


def rows_for(name, team, tables, devices, choice):
    r = assess(team, tables, devices, choice)
    rows = []
    for a in team.agents:
        c = choice[a.name]
        v = tables[a.base].get(c.variant)
        rows.append({"placement": name, "agent": a.name, "variant": c.variant, "on": "+".join(c.devices),
                     "pred_p95_s": round(r["p95"][a.name], 3), "budget_s": a.p95_budget_s,
                     "meets_budget": r["p95"][a.name] <= a.p95_budget_s, "meets_quality": quality_ok(a, v),
                     "delta_ppl_%": round(100 * (v.delta_ppl or 0), 2),
                     **{f"acc_{k}": round(x, 3) for k, x in v.accuracy.items()}})
    total = sum(sum(p.values()) for p in r["parts"].values())
    summary = {"placement": name, "total_MiB": round(total / 2**20, 1), "devices_used": len(r["parts"]),
               "worst_p95_over_budget": round(max(r["p95"][a.name] / a.p95_budget_s for a in team.agents), 3),
               "agents_meeting_budget": sum(x["meets_budget"] for x in rows),
               "agents_meeting_quality": sum(x["meets_quality"] for x in rows),
               "per_device_MiB": {d: round(sum(p.values()) / 2**20, 1) for d, p in r["parts"].items()}}
    return rows, summary


def compare(team, tables, devices, label):
    from slimswarm.deploy.planner import candidates

    cands = candidates(team, tables, devices)
    choices = []
    for objective in ("latency", "bytes"):
        plan = solve(team, tables, devices, objective)
        choices.append((f"planner ({objective})", {p.agent: next(c for c in cands[p.agent] if c.variant == p.variant
                                                                 and c.devices == p.devices)
                                                   for p in plan.placements}))
    choices += [("exo-style", exo_choice(team, tables, devices)),
                ("fp32-where-it-fits", fp32_choice(team, tables, devices))]
    all_rows, summaries = [], []
    for name, choice in choices:
        rows, s = rows_for(name, team, tables, devices, choice)
        all_rows += rows
        summaries.append({"devices": label, **s})
    return all_rows, summaries


def main():
    from slimswarm.deploy.devices import DeviceSet

    ap = argparse.ArgumentParser()
    ap.add_argument("--team", default=str(ROOT / "examples/teams/edge_desk_placement.yaml"))
    ap.add_argument("--devices", default=str(ROOT / "examples/devices/edge_lab.yaml"))
    args = ap.parse_args()
    team, tables = load_team(args.team)
    devices = load_devices(args.devices)
    edge = DeviceSet(devices=[d.model_copy(update={"links": {k: v for k, v in d.links.items() if k != "h200-node"}})
                              for d in devices.devices if d.name != "h200-node"])
    all_rows, summaries = [], []
    for label, ds in (("all four", devices), ("edge only (no H200)", edge)):
        r, s = compare(team, tables, ds, label)
        all_rows += [{"devices": label, **x} for x in r]
        summaries += s
    cmd = "python benchmarks/plan_compare_placements.py " + " ".join(sys.argv[1:])
    (RESULTS / "plan_compare_placements.json").write_text(json.dumps({"command": cmd, "summary": summaries,
                                                                       "agents": all_rows}, indent=1))
    flat = [{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in s.items()} for s in summaries]
    text = "\n".join(["# Planner vs exo-style memory-proportional sharding vs fp32 where it fits\n",
                      f"Command: `{cmd}`\n",
                      f"Team `{Path(args.team).name}` on `{Path(args.devices).name}` (all four devices, and the three "
                      "edge devices alone); predictions from the variants table measured on the 2-core VM and each "
                      "device's spec figures (see the YAML comments). Devices without their own cost fit use the VM's "
                      "efficiencies, with per-layer overheads and prefill scaled by the bandwidth ratio.\n",
                      markdown_table(flat), "", markdown_table(all_rows), ""])
    (RESULTS / "plan_compare_placements.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
