"""Does a plan run within its budgets? Two simulated devices carved out of this machine (memory: a checked budget on
each device process's peak RSS; one torch thread each), the example team placed on them by the planner, and every
agent driven at its planned request rate: measured p95 latency per agent against the plan's budget and prediction.

  python benchmarks/plan_simulated_devices.py [--seconds 400]

Each device is a process: it loads the variants the plan gives it (a base shared by several agents once), serves
its agents from one engine (continuous batching), and a sampler thread records its resident bytes every 20 ms; the
run fails when a device's peak (VmHWM) passes its memory. Requests are Poisson at each agent's rate, prompts of the
agent's prompt_tokens random ids, and exactly max_tokens new tokens (EOS ignored), so each request is the size the
planner priced."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
MIN_REQUESTS = 5
sys.path.insert(0, str(ROOT / "src"))


def device_main(plan_path: str, device: str, team_path: str, seconds: float, seed: int, core: int | None) -> None:
    import os

    import psutil
    import torch

    if core is not None:  # the device's own core: the two devices do not share one
        os.sched_setaffinity(0, {core})
    from slimswarm.evaluate.speed import measure_bandwidth

    bw_start = measure_bandwidth()  # the probe's 1 GiB read, in a child that inherits this core: what it gets now

    from slimswarm.deploy.planner import load_team
    from slimswarm.deploy.plan_command import load_plan
    from slimswarm.deploy.variants import vm_hwm_bytes
    from slimswarm.engine.engine import Engine
    from slimswarm.models.load import load
    from slimswarm.models.sampling import SamplingParams

    torch.set_num_threads(1)
    team, tables = load_team(team_path)
    plan = load_plan(plan_path, team)  # refused if made for another team
    cap = plan["devices"][device]["capacity_bytes"]
    peak = {"rss": 0}
    stop = threading.Event()

    def sample():
        p = psutil.Process()
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], p.memory_info().rss)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    mine = [a for a in plan["agents"] if a["devices"] == [device]]
    specs = {a.name: a for a in team.agents}
    engines = {}
    for a in mine:  # one engine per (base, variant): agents sharing a base share its weights and its batch
        key = (specs[a["agent"]].base, a["variant"])
        if key not in engines:
            v = tables[key[0]].get(key[1])
            m = load(v.checkpoint)
            rows = sum(specs[x["agent"]].concurrency for x in mine
                       if (specs[x["agent"]].base, x["variant"]) == key)
            ctx = max(specs[x["agent"]].context for x in mine if (specs[x["agent"]].base, x["variant"]) == key)
            # the prefix cache the planner counted (the sim team sets 0: its prompts are random ids, never a hit)
            e = Engine(m.model, m.tokenizer, max_batch=rows, max_len=ctx, prefix_cache_bytes=team.prefix_cache_bytes)
            e.eos = set()  # every request decodes exactly max_tokens: the size the planner priced
            engines[key] = e.start()
    lat: dict[str, list[float]] = {a["agent"]: [] for a in mine}
    log: list[dict] = []
    t_start = time.perf_counter()

    def drive(a):
        s = specs[a["agent"]]
        eng = engines[(s.base, a["variant"])]
        rng = random.Random(f"{seed}-{s.name}")
        vocab = 49152
        pending = []
        t0 = time.perf_counter()
        t_next = 0.0
        while True:  # Poisson arrivals for `seconds` (at least MIN_REQUESTS of them)
            t_next += rng.expovariate(s.rate_per_s) if s.rate_per_s > 0 else 0.0
            if t_next > seconds and len(pending) >= MIN_REQUESTS:
                break
            wait = t0 + t_next - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            prompt = [rng.randrange(3, vocab) for _ in range(s.prompt_tokens)]
            pending.append(eng.submit(prompt, SamplingParams(max_tokens=s.max_tokens)))
        for r in pending:
            r.wait(600)
            lat[s.name].append(r.latency_s)
            log.append({"agent": s.name, "t_submit_s": round(r.t_submit - t_start, 4),
                        "wait_s": round(r.t_admit - r.t_submit, 4), "prefill_s": round(r.t_first - r.t_admit, 4),
                        "decode_s": round(r.t_done - r.t_first, 4), "latency_s": round(r.latency_s, 4),
                        "prompt_tokens": len(r.prompt), "cached_tokens": r.cached_tokens, "tokens": len(r.tokens)})

    threads = [threading.Thread(target=drive, args=(a,)) for a in mine]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in engines.values():
        e.stop()
    stop.set()
    hwm = vm_hwm_bytes()
    bw_end = measure_bandwidth()
    out = {"device": device, "core": core, "bandwidth_gb_s": [round(bw_start, 2), round(bw_end, 2)],
           "capacity_bytes": cap, "peak_rss_bytes": max(hwm, peak["rss"]),
           "within_memory": max(hwm, peak["rss"]) <= cap, "wall_s": round(time.perf_counter() - t_start, 1),
           "engines": {f"{b}:{v}": {k: e.counters[k] for k in ("steps", "decode_rows", "prefill_s", "decode_s")}
                       for (b, v), e in engines.items()},
           "agents": {}, "requests": sorted(log, key=lambda r: r["t_submit_s"])}
    for a in mine:
        xs = sorted(lat[a["agent"]])
        mine_log = [r for r in log if r["agent"] == a["agent"]]
        out["agents"][a["agent"]] = {
            "variant": a["variant"], "requests": len(xs), "measured_p95_s": quantile(xs, 0.95),
            "measured_p50_s": quantile(xs, 0.5), "predicted_p95_s": a["predicted_p95_s"], "budget_s": a["budget_s"],
            "meets_budget": quantile(xs, 0.95) <= a["budget_s"],
            "mean_wait_s": sum(r["wait_s"] for r in mine_log) / len(mine_log),
            "p50_prefill_s": quantile(sorted(r["prefill_s"] for r in mine_log), 0.5),
            "p95_prefill_s": quantile(sorted(r["prefill_s"] for r in mine_log), 0.95),
            "p50_decode_s": quantile(sorted(r["decode_s"] for r in mine_log), 0.5),
            "interfered": sum(not _alone(r, log) for r in mine_log),
            "alone_p50_s": quantile(sorted(r["latency_s"] for r in mine_log if r["wait_s"] < 0.01
                                           and _alone(r, log)), 0.5)}
    print(json.dumps(out))


def _alone(r: dict, log: list[dict]) -> bool:
    """Nothing else on the device overlapped this request (its service time, uninterrupted)."""
    a0, a1 = r["t_submit_s"], r["t_submit_s"] + r["latency_s"]
    return not any(o is not r and o["t_submit_s"] < a1 and o["t_submit_s"] + o["latency_s"] > a0 for o in log)


def quantile(xs: list[float], q: float) -> float | None:
    """The q-quantile of sorted ``xs`` by linear interpolation (numpy's default); None for no data."""
    if not xs:
        return None
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=400,
                    help="each agent sends Poisson requests at its planned rate for this long (at least 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device")  # internal: run one device process
    ap.add_argument("--plan")
    ap.add_argument("--core", type=int)  # internal: the core a device process is pinned to
    ap.add_argument("--team", default=str(ROOT / "examples/teams/sim_desk_placement.yaml"))
    args = ap.parse_args()
    if args.device:
        device_main(args.plan, args.device, args.team, args.seconds, args.seed, args.core)
        return
    import yaml

    from slimswarm.deploy.devices import load_devices
    from slimswarm.deploy.planner import load_team, solve
    from slimswarm.deploy.plan_command import plan_rows, write_plan
    from slimswarm.deploy.report import memory_bar_plot
    from slimswarm.evaluate.report import markdown_table, write_keeping_notes

    team, tables = load_team(args.team)
    devices = load_devices(RESULTS / "devices_simulated.yaml")
    plan = solve(team, tables, devices, "latency")
    plan_path = write_plan(plan, RESULTS / "plan_simulated_devices_plan.yaml",
                           "python benchmarks/plan_simulated_devices.py")
    memory_bar_plot(plan.device_bytes, plan.capacity, RESULTS / "plan_simulated_devices.png",
                    f"{team.name} on two devices carved out of this machine")
    print(markdown_table(plan_rows(plan)), flush=True)
    import os

    load0 = os.getloadavg()
    ncpu = os.cpu_count() or 1
    t0 = time.perf_counter()
    print(f"running {len(plan.device_bytes)} device processes: {args.seconds:.0f} s of Poisson requests "
          f"(about " + ", ".join(f"{a.name} {max(5, round(a.rate_per_s * args.seconds))}" for a in team.agents)
          + ") ...",
          flush=True)
    procs = {d: subprocess.Popen([sys.executable, __file__, "--device", d, "--plan", str(plan_path), "--team",
                                  args.team, "--seconds", str(args.seconds), "--seed", str(args.seed),
                                  "--core", str(i % ncpu)],
                                 stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                         "SLIMSWARM_QUIET": "1"})
             for i, d in enumerate(plan.device_bytes)}
    res = {}
    for d, p in procs.items():
        out, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"device {d} failed ({p.returncode})")
        res[d] = json.loads(out.strip().splitlines()[-1])
    load1 = os.getloadavg()
    split = predicted_split(team, tables, devices, plan)
    rows = []
    for d, r in res.items():
        for name, a in r["agents"].items():
            sp = split[name]
            rows.append({"agent": name, "device": d, "variant": a["variant"], "requests": a["requests"],
                         "measured_p50_s": _r(a["measured_p50_s"]), "measured_p95_s": _r(a["measured_p95_s"]),
                         "predicted_p95_s": _r(a["predicted_p95_s"]), "budget_s": a["budget_s"],
                         "meets_budget": a["meets_budget"],
                         "p95_err_pct": round(100 * (a["predicted_p95_s"] / a["measured_p95_s"] - 1), 1),
                         "device_peak_MiB": round(r["peak_rss_bytes"] / 2**20),
                         "device_capacity_MiB": round(r["capacity_bytes"] / 2**20),
                         "device_within_memory": r["within_memory"]})
    split_rows = []
    for d, r in res.items():
        for name, a in r["agents"].items():
            sp = split[name]
            split_rows.append({"agent": name, "pred_prefill_s": _r(sp["prefill_s"]),
                               "meas_prefill_p50_s": _r(a["p50_prefill_s"]),
                               "meas_prefill_p95_s": _r(a["p95_prefill_s"]), "pred_decode_s": _r(sp["decode_s"]),
                               "meas_decode_p50_s": _r(a["p50_decode_s"]), "pred_service_s": _r(sp["service_s"]),
                               "meas_alone_p50_s": _r(a["alone_p50_s"]), "meas_mean_wait_s": _r(a["mean_wait_s"]),
                               "requests_overlapped": f"{a['interfered']}/{a['requests']}",
                               "device_load_rho": round(plan.load[d], 3)})
    cmd = "python benchmarks/plan_simulated_devices.py " + " ".join(sys.argv[1:])
    (RESULTS / "plan_simulated_devices.json").write_text(json.dumps({
        "command": cmd, "load_average_start": load0, "load_average_end": load1,
        "wall_s": round(time.perf_counter() - t0, 1), "plan": plan.as_dict(), "rows": rows, "split": split_rows,
        "runs": res}, indent=1))
    ok = all(r["meets_budget"] for r in rows)
    mem_ok = all(r["within_memory"] for r in res.values())
    md = ["# A plan on two simulated devices carved out of this machine\n", f"Command: `{cmd}` (or "
          "`benchmarks/plan_remeasure_all.sh`, which probes and re-measures the variants first)\n",
          "Devices (`benchmarks/results/devices_simulated.yaml`): memory limits are a checked budget (each device "
          "process samples its RSS every 20 ms and reads VmHWM at the end; over its memory the row says so); each "
          "device process is pinned to its own core of the 2-vCPU VM and runs one torch thread. Requests: Poisson at "
          "each agent's rate, random-id prompts of its prompt_tokens (no prefix-cache hits), exactly max_tokens new "
          "tokens. Other helpers' jobs share the VM: load average (1 min) "
          f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end. Read bandwidth (the probe's 1 GiB read) on each "
          "device's core at its start and end: " + ", ".join(f"{d} {r['bandwidth_gb_s'][0]} -> "
                                                             f"{r['bandwidth_gb_s'][1]} GB/s" for d, r in res.items())
          + f"; the cost model was fitted at {devices.devices[0].bandwidth_gb_s} GB/s.\n",
          "## The plan\n", markdown_table(plan_rows(plan)), "\n## Measured p95 against budget and prediction\n",
          markdown_table(rows), "",
          "p95 is interpolated over each agent's requests (numpy's default); p95_err_pct = predicted / measured - 1.\n",
          "## Where a request's time goes (the log of every request is in the JSON)\n",
          markdown_table(split_rows), "",
          "pred_*: the planner's cost model for one request alone (prefill of the prompt, which yields the first "
          "token, then max_tokens - 1 decode steps). meas_prefill_*: the prefill forward of each request, the same "
          "work every time, so its p95/p50 spread is the machine's noise (other jobs on the core), not queueing; "
          "meas_decode_p50_s: first token to last (another request's prefill in between counts here); "
          "meas_alone_p50_s: the median latency of the requests that overlapped no other request on their device; "
          "meas_mean_wait_s: queue wait before the prefill began.\n",
          f"All budgets met: {ok}; all devices within memory: {mem_ok}.\n"]
    write_keeping_notes(RESULTS / "plan_simulated_devices.md", "\n".join(md))
    print(markdown_table(rows))
    print(markdown_table(split_rows))


def _r(x):
    return None if x is None else round(x, 3)


def predicted_split(team, tables, devices, plan) -> dict[str, dict]:
    """The planner's prefill / decode / service seconds of one request of each agent, alone on its device."""
    from slimswarm.deploy.planner import decode_s, prefill_s

    by = devices.by_name()
    out = {}
    for p in plan.placements:
        a = next(x for x in team.agents if x.name == p.agent)
        t = tables[a.base]
        v, d = t.get(p.variant), by[p.devices[0]]
        pre = prefill_s(v, d, t, a.prompt_tokens)
        dec = (a.max_tokens - 1) * decode_s(v, d, t, 1.0, a.prompt_tokens + a.max_tokens // 2)
        out[p.agent] = {"prefill_s": pre, "decode_s": dec, "service_s": p.service_s}
    return out


if __name__ == "__main__":
    main()
