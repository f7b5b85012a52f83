"""Assemble the variants table from a `slimswarm plan --measure` run that crashed before writing it (the run of
benchmarks/results/variants_smollm2_measure.log.txt died at its final print after a mid-run code change): layouts
from the saved checkpoints, perplexity and KL from the log, SST-2 accuracy recomputed on the same 64 items, and
decode speed and peak memory re-measured by `plan_variants_smollm2.py --remeasure` afterwards.

  python benchmarks/plan_variants_from_log.py && python benchmarks/plan_variants_smollm2.py --remeasure"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks/results"


def main():
    from slimswarm.data import default_eval_text
    from slimswarm.deploy.devices import load_devices
    from slimswarm.deploy.variants import Measured, VariantsTable, describe, write_variants
    from slimswarm.evaluate.choice import choice_accuracy
    from slimswarm.models.load import load
    from slimswarm.tasks import load_task

    log = (RESULTS / "variants_smollm2_measure.log.txt").read_text()
    pat = re.compile(r"\[\d+/\d+\] (\S+): \d+ MB, ppl ([0-9.]+), KL ([0-9.]+), ([0-9.]+) tok/s, peak RSS (\d+) MiB")
    rows = {m.group(1): m for m in pat.finditer(log)}
    items = load_task("sst2", "test", n=64, seed=0)
    machine = load_devices(RESULTS / "devices_this_machine.yaml").devices[0]
    variants = []
    for name, m in rows.items():
        ck = ROOT / "out/variants" / name
        lm = load(str(ck))
        v = describe(lm.model, name, None if name == "fp32" else name)
        v.checkpoint = str(ck.relative_to(ROOT))
        v.perplexity, v.kl = float(m.group(2)), float(m.group(3))
        v.accuracy = {"sst2": choice_accuracy(lm.model, lm.tokenizer, items)["accuracy"]}
        v.measured = Measured(decode_tokens_per_s=float(m.group(4)), peak_rss_bytes=int(m.group(5)) * 2**20, batch=1,
                              context=256, new_tokens=32)
        print(name, v.perplexity, v.kl, v.accuracy, flush=True)
        variants.append(v)
    base = next(v for v in variants if v.name == "fp32").perplexity
    for v in variants:
        v.delta_ppl = v.perplexity / base - 1
    _, source = default_eval_text()
    t = VariantsTable(base="smollm2-135m", text=source, tokens=4096, machine=machine, variants=variants)
    write_variants(t, RESULTS / "variants_smollm2.yaml", "python benchmarks/plan_variants_from_log.py (from the log of "
                   "`slimswarm plan --measure --machine benchmarks/results/devices_this_machine.yaml --recipes "
                   "fp32,w8,w4g128-rtn,w4g128-gptq,struct-25 --variants benchmarks/results/variants_smollm2.yaml`)")


if __name__ == "__main__":
    main()
