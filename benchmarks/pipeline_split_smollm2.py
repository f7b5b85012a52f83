"""Pipeline split of SmolLM2-135M (fp32) over simulated devices too small for it: are the perplexity and the
decoded tokens identical to the unsplit model, and what does a hop cost?

  python benchmarks/pipeline_split_smollm2.py [--tokens 1024]

The split points come from the planner's DP (deploy/pipeline.py) for devices that hold the serving floor plus 70%
(2 stages) or 50% (3 stages) of the weights (the tied embedding sits on the first and the last stage); each stage is a process on 127.0.0.1 holding its layers and its KV slice. Per-hop overhead = (wall −
Σ stage compute) / hops per decode step, median; hops = driver → stage 0, stage to stage, last stage → driver."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks/results"


def kv_total(v, a) -> int:
    return v.kv_bytes_per_token * a.concurrency * a.context


def main():
    import torch
    import torch.nn.functional as F

    from slimswarm import load
    from slimswarm.data import default_eval_text
    from slimswarm.deploy.devices import Device, DeviceSet, Link
    from slimswarm.deploy.pipeline import split_layers
    from slimswarm.deploy.pipeline_run import PipelineRunner
    from slimswarm.deploy.planner import AgentSpec
    from slimswarm.deploy.variants import describe
    from slimswarm.evaluate.report import markdown_table
    from slimswarm.evaluate.perplexity import windows_of

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    m = load("smollm2-135m")
    model = m.model
    text, source = default_eval_text()
    seqs = windows_of(m.tokenizer.encode(text), args.window, args.tokens, source)
    from slimswarm.deploy.devices import load_devices
    from slimswarm.deploy.variants import VariantsTable

    v = describe(model, "fp32", None)
    # the probed profile of this machine supplies the cost fit and the serving floor
    here = load_devices(RESULTS / "devices_this_machine.yaml").devices[0]
    table = VariantsTable(base="smollm2-135m", machine=here, variants=[v])
    agent = AgentSpec(name="big", base="smollm2-135m", p95_budget_s=60, prompt_tokens=args.window,
                      max_tokens=args.new_tokens, context=args.window + args.new_tokens)

    def nll(fwd):
        tot, n = 0.0, 0
        for s in seqs:
            x = torch.tensor([s])
            logits = fwd(x)[:, :-1].float()
            tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            n += x.shape[1] - 1
        return tot / n, n

    def greedy(step, prompt, prefill_fn):
        logits = prefill_fn(prompt)
        out, times = [], []
        pos = prompt.shape[1]
        for _ in range(args.new_tokens):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            t = time.perf_counter()
            logits = step(torch.tensor([[tok]]), pos)
            times.append(time.perf_counter() - t)
            pos += 1
        return out, sorted(times)[len(times) // 2]

    with torch.inference_mode():
        model.clear_cache()
        base_nll, n = nll(lambda x: model(x))
        prompt = torch.tensor([seqs[0]])
        model.setup_cache(1, args.window + args.new_tokens + 1)
        base_tokens, base_step = greedy(lambda x, p: model(x, p), prompt, lambda x: model(x, 0))
        model.clear_cache()
    rows = [{"stages": 1, "layers": "0-30", "perplexity": math.exp(base_nll), "tokens": n,
             "same_greedy_tokens": True, "decode_step_ms": base_step * 1e3, "per_hop_overhead_ms": 0.0}]
    from slimswarm.deploy.planner import runtime_bytes

    floor = runtime_bytes(Device(name="x", memory_bytes=1, bandwidth_gb_s=1, cores=1, threads=1), table)
    for stages, share in ((2, 0.7), (3, 0.5)):
        # each device holds the serving floor and `share` of the weights: too small for the whole model
        mem = int(floor + share * v.weight_bytes + kv_total(v, agent)) // 2**20
        devs = [Device(name=f"d{i}", memory_bytes=mem * 2**20, bandwidth_gb_s=table.machine.bandwidth_gb_s, cores=1,
                       threads=1, cost=table.machine.cost,
                       links={f"d{j}": Link(bandwidth_gb_s=1.0, latency_ms=0.6) for j in range(stages) if j != i})
                for i in range(stages)]
        cand = split_layers(agent, v, table, DeviceSet(devices=devs))
        assert cand is not None and len(cand.layers) == stages, cand
        with PipelineRunner(model, cand.layers) as p:
            p_nll, _ = nll(lambda x: p.forward(x, 0))
            kv = p.setup_cache(1, args.window + args.new_tokens + 1)
            p.stats.clear()
            toks, step = greedy(lambda x, pos: p.forward(x, pos), prompt, lambda x: p.forward(x, 0))
            hop = p.per_hop_overhead_s()
        rows.append({"stages": stages, "layers": ", ".join(f"{a}-{b}" for a, b in cand.layers),
                     "device_MiB": mem, "stage_kv_KiB": "/".join(str(k // 1024) for k in kv),
                     "perplexity": math.exp(p_nll), "tokens": n, "same_greedy_tokens": toks == base_tokens,
                     "decode_step_ms": step * 1e3, "per_hop_overhead_ms": hop * 1e3})
        print(rows[-1], flush=True)
    for r in rows:
        r["ppl_diff"] = r["perplexity"] - rows[0]["perplexity"]
    cmd = "python benchmarks/pipeline_split_smollm2.py " + " ".join(sys.argv[1:])
    (RESULTS / "pipeline_split_smollm2.json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    text = "\n".join(["# SmolLM2-135M split into pipeline stages on loopback\n", f"Command: `{cmd}`\n",
                      f"Perplexity on the first {args.tokens} tokens of {Path(source).name} ({args.window}-token "
                      f"windows); greedy decode of {args.new_tokens} tokens after the first window; one torch thread "
                      "per process; shared 2-vCPU VM (timings noisy).\n", markdown_table(rows), ""])
    (RESULTS / "pipeline_split_smollm2.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
