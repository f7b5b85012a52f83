"""deploy/: the ``slimswarm devices probe`` and ``slimswarm plan`` subcommands: parse, call deploy/, print."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import SlimswarmError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_devices_probe(args) -> int:
    from .devices import parse_bytes, write_yaml_atomic
    from .probe import probe_device

    mem = None
    if args.memory:
        try:
            mem = parse_bytes(args.memory)
        except ValueError as e:
            raise SlimswarmError(f"--memory: {e}") from None
        if not isinstance(mem, int) or mem <= 0:
            raise SlimswarmError(f"--memory must be a positive size, got {args.memory!r}")
    if args.threads is not None and args.threads < 1:
        raise SlimswarmError(f"--threads must be >= 1, got {args.threads}")
    _log(f"devices probe: measuring this machine{' (no cost fit)' if args.no_fit else ''} ...")
    dev, _ = probe_device(args.name, mem, args.threads, fit=not args.no_fit, log=_log)
    header = ("# Written by `slimswarm " + " ".join(sys.argv[1:]) + "`: measured on this machine, not a spec sheet.\n")
    out = write_yaml_atomic({"devices": [dev.model_dump(exclude_none=True)]}, args.out, header)
    print(f"{dev.name}: {dev.memory_bytes / 2**30:.1f} GiB, {dev.bandwidth_gb_s:.1f} GB/s read, {dev.cores} cores, "
          f"{dev.threads} threads -> {out}")
    if dev.cost:
        c = dev.cost
        print("decode cost: " + ", ".join(f"{k} efficiency {v:.2f}" for k, v in c.efficiency.items())
              + "".join(f", {k} {v * 1e9:.2f} ns a group" for k, v in c.group_s.items())
              + f"; fixed {c.fixed_s * 1e3:.2f} ms + {c.fixed_s_per_layer * 1e3:.3f} ms/layer a token; "
              f"prefill {c.prefill_gflops:.1f} GFLOP/s (float32), de-quantization a call "
              + ", ".join(f"{k} {v * 1e9:.2f} ns/param" for k, v in c.dequant_s_per_param.items())
              + f"; runtime {c.runtime_bytes / 2**20:.0f} MiB")
    return 0


def _measure(args) -> int:
    from .devices import load_devices
    from .probe import probe_device
    from .variants import FLOAT, measure_variants, write_variants

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not recipes:
        raise SlimswarmError("--recipes: give at least one recipe (fp32 is the base itself)")
    if args.processes < 1:
        raise SlimswarmError(f"--processes must be at least 1, got {args.processes}")
    if args.tokens < 2 * args.window:
        raise SlimswarmError(f"--tokens must be at least two windows ({2 * args.window}), got {args.tokens}")
    from ..compress.recipe import load_recipe

    for r in recipes:
        if r != FLOAT:
            load_recipe(r)
    if args.machine:
        ds = load_devices(args.machine)
        machine = ds.devices[0]
        if machine.cost is None:
            raise SlimswarmError(f"{args.machine}: field devices.0.cost: missing (probe without --no-fit)")
    else:
        _log("plan --measure: probing this machine first (bandwidth and decode cost fit) ...")
        machine, _ = probe_device(None, None, args.threads, log=_log)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    table = measure_variants(args.base, recipes, args.checkpoints, machine, tokens=args.tokens, window=args.window,
                             kl_tokens=min(args.tokens, 2048), task_items=args.task_items, tasks=tasks, log=_log,
                             processes=args.processes)
    out = write_variants(table, args.variants, "slimswarm " + " ".join(sys.argv[1:]))
    from .report import variants_rows
    from ..evaluate.report import markdown_table

    print(markdown_table(variants_rows(table)))
    print(f"variants table: {out}")
    return 0


def cmd_plan(args) -> int:
    if args.measure:
        return _measure(args)
    from .plan_command import run_plan

    return run_plan(args)


def add_deploy_parsers(sub) -> None:
    dv = sub.add_parser("devices", help="device profiles: probe this machine")
    dsub = dv.add_subparsers(dest="devices_cmd", required=True)
    pr = dsub.add_parser("probe", help="measure this machine (memory, read bandwidth, cores, decode cost) into a profile")
    pr.add_argument("--out", default="devices/this-machine.yaml", help="profile YAML to write")
    pr.add_argument("--name", help="device name (default: the host name)")
    pr.add_argument("--memory", help="carve a smaller simulated device: its memory (e.g. 700MiB)")
    pr.add_argument("--threads", type=int, help="torch threads to measure with (default: torch's)")
    pr.add_argument("--no-fit", action="store_true", help="skip the decode cost fit (memory and bandwidth only)")
    pr.set_defaults(fn=cmd_devices_probe)

    pl = sub.add_parser("plan", help="place a team's agents on devices (variant + device each), or --measure variants")
    pl.add_argument("team", nargs="?", help="team YAML with a placement section (agents' bases, budgets, rates)")
    pl.add_argument("--devices", nargs="+", help="device profile YAML file(s)")
    pl.add_argument("--variants", default="out/variants.yaml", help="variants table to read (or write with --measure)")
    pl.add_argument("--objective", choices=("latency", "bytes", "devices"), default="latency",
                    help="latency: minimise the worst p95/budget ratio; bytes: total bytes; devices: devices used")
    pl.add_argument("--out", default="plan.yaml", help="plan file to write (nothing is written when infeasible)")
    pl.add_argument("--png", help="per-device memory bar plot (default: beside --out)")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--measure", action="store_true", help="fill the variants table on this machine instead")
    pl.add_argument("--base", default="smollm2-135m", help="--measure: the base model")
    pl.add_argument("--recipes", default="fp32,w8,w4g128-rtn,w4g128-gptq", help="--measure: comma-separated")
    pl.add_argument("--machine", help="--measure: this machine's probed profile (default: probe now)")
    pl.add_argument("--threads", type=int, default=1, help="--measure: torch threads for the speed runs")
    pl.add_argument("--processes", type=int, default=3,
                    help="--measure: fresh processes per variant for speed and peak memory (round-robin; medians)")
    pl.add_argument("--tokens", type=int, default=4096, help="--measure: perplexity tokens")
    pl.add_argument("--window", type=int, default=512)
    pl.add_argument("--task-items", type=int, default=64, help="--measure: test items per task (label scoring)")
    pl.add_argument("--tasks", default="sst2", help="--measure: comma-separated tasks for accuracy (empty: none)")
    pl.add_argument("--checkpoints", default="out/variants", help="--measure: where the variants are saved")
    pl.set_defaults(fn=cmd_plan)
