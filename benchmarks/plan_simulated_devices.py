"""Does a plan run within its budgets? Two simulated devices carved out of this machine (memory: a checked budget on
each device process's peak RSS; one torch thread each), the example team placed on them by the planner, and every
agent driven at its planned request rate: measured p95 latency per agent against the plan's budget and prediction.

  python benchmarks/plan_simulated_devices.py [--requests 12]

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
sys.path.insert(0, str(ROOT / "src"))


def device_main(plan_path: str, device: str, team_path: str, requests: int, seed: int) -> None:
    import psutil
    import torch

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
            e = Engine(m.model, m.tokenizer, max_batch=rows, max_len=ctx)
            e.eos = set()  # every request decodes exactly max_tokens: the size the planner priced
            engines[key] = e.start()
    lat: dict[str, list[float]] = {a["agent"]: [] for a in mine}

    def drive(a):
        s = specs[a["agent"]]
        eng = engines[(s.base, a["variant"])]
        rng = random.Random(f"{seed}-{s.name}")
        vocab = 49152
        pending = []
        t0 = time.perf_counter()
        t_next = 0.0
        for _ in range(requests):
            t_next += rng.expovariate(s.rate_per_s) if s.rate_per_s > 0 else 0.0
            wait = t0 + t_next - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            prompt = [rng.randrange(3, vocab) for _ in range(s.prompt_tokens)]
            pending.append(eng.submit(prompt, SamplingParams(max_tokens=s.max_tokens)))
        for r in pending:
            r.wait(600)
            lat[s.name].append(r.latency_s)

    threads = [threading.Thread(target=drive, args=(a,)) for a in mine]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in engines.values():
        e.stop()
    stop.set()
    hwm = vm_hwm_bytes()
    out = {"device": device, "capacity_bytes": cap, "peak_rss_bytes": max(hwm, peak["rss"]),
           "within_memory": max(hwm, peak["rss"]) <= cap, "agents": {}}
    for a in mine:
        xs = sorted(lat[a["agent"]])
        p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
        out["agents"][a["agent"]] = {"variant": a["variant"], "requests": len(xs), "measured_p95_s": p95,
                                     "measured_p50_s": xs[len(xs) // 2], "predicted_p95_s": a["predicted_p95_s"],
                                     "budget_s": a["budget_s"], "meets_budget": p95 <= a["budget_s"]}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device")  # internal: run one device process
    ap.add_argument("--plan")
    ap.add_argument("--team", default=str(ROOT / "examples/teams/sim_desk_placement.yaml"))
    args = ap.parse_args()
    if args.device:
        device_main(args.plan, args.device, args.team, args.requests, args.seed)
        return
    import yaml

    from slimswarm.deploy.devices import load_devices
    from slimswarm.deploy.planner import load_team, solve
    from slimswarm.deploy.plan_command import plan_rows, write_plan
    from slimswarm.deploy.report import memory_bar_plot
    from slimswarm.evaluate.report import markdown_table

    team, tables = load_team(args.team)
    devices = load_devices(RESULTS / "devices_simulated.yaml")
    plan = solve(team, tables, devices, "latency")
    plan_path = write_plan(plan, RESULTS / "plan_simulated_devices_plan.yaml",
                           "python benchmarks/plan_simulated_devices.py")
    memory_bar_plot(plan.device_bytes, plan.capacity, RESULTS / "plan_simulated_devices.png",
                    f"{team.name} on two devices carved out of this machine")
    print(markdown_table(plan_rows(plan)), flush=True)
    procs = {d: subprocess.Popen([sys.executable, __file__, "--device", d, "--plan", str(plan_path), "--team",
                                  args.team, "--requests", str(args.requests), "--seed", str(args.seed)],
                                 stdout=subprocess.PIPE, text=True, env={**__import__("os").environ,
                                                                         "OMP_NUM_THREADS": "1",
                                                                         "SLIMSWARM_QUIET": "1"})
             for d in plan.device_bytes}
    res = {}
    for d, p in procs.items():
        out, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"device {d} failed ({p.returncode})")
        res[d] = json.loads(out.strip().splitlines()[-1])
    rows = []
    for d, r in res.items():
        for name, a in r["agents"].items():
            rows.append({"agent": name, "device": d, **a, "device_peak_MiB": round(r["peak_rss_bytes"] / 2**20),
                         "device_capacity_MiB": round(r["capacity_bytes"] / 2**20),
                         "device_within_memory": r["within_memory"]})
    cmd = "python benchmarks/plan_simulated_devices.py " + " ".join(sys.argv[1:])
    (RESULTS / "plan_simulated_devices.json").write_text(json.dumps({"command": cmd, "plan": plan.as_dict(),
                                                                      "runs": res}, indent=1))
    md = [f"# A plan on two simulated devices carved out of this machine\n", f"Command: `{cmd}`\n",
          "Devices (`benchmarks/results/devices_simulated.yaml`): memory limits are a checked budget (each device "
          "process samples its RSS every 20 ms and reads VmHWM at the end; over its memory the row says so), one torch "
          "thread each, both on the same shared 2-vCPU VM (other jobs were running: absolute times are noisy).\n",
          "## The plan\n", markdown_table(plan_rows(plan)), "\n## Measured\n", markdown_table(rows),
          f"\nAll budgets met: {all(r['meets_budget'] for r in rows)}; all devices within memory: "
          f"{all(r['within_memory'] for r in res.values())}.\n"]
    (RESULTS / "plan_simulated_devices.md").write_text("\n".join(md))
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
