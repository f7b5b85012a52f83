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
              + f"; fixed {c.fixed_s * 1e3:.2f} ms + {c.fixed_s_per_layer * 1e3:.3f} ms/layer a token; "
              f"prefill {c.prefill_gflops:.1f} GFLOP/s; runtime {c.runtime_bytes / 2**20:.0f} MiB")
    return 0


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
