"""deploy/: `slimswarm devices probe`: measure this machine (memory, read bandwidth as `bench` does, cores) and fit
its decode cost model; the result is a device profile."""

from __future__ import annotations

import os
import platform

import psutil
import torch

from ..evaluate.speed import measure_bandwidth
from .costmodel import fit_decode_cost
from .devices import Device


def runtime_rss_bytes() -> int:
    """Resident bytes of this process now (Python + torch + slimswarm imported, no model): a serving process's floor."""
    return psutil.Process().memory_info().rss


def probe_device(name: str | None = None, memory_bytes: int | None = None, threads: int | None = None,
                 fit: bool = True, log=print) -> tuple[Device, list[dict]]:
    """This machine as a device profile. ``memory_bytes``/``threads`` carve a smaller simulated device out of it."""
    if threads:
        torch.set_num_threads(threads)
    runtime = runtime_rss_bytes()
    log(f"  bandwidth: reading a 1 GiB buffer ({torch.get_num_threads()} threads) ...")
    bw = measure_bandwidth()
    log(f"  bandwidth: {bw:.1f} GB/s")
    cost, rows = (fit_decode_cost(bw, log=log, runtime_bytes=runtime) if fit else (None, []))
    vm = psutil.virtual_memory()
    dev = Device(
        name=name or platform.node() or "this-machine",
        memory_bytes=memory_bytes or vm.total,
        bandwidth_gb_s=round(bw, 2),
        cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        threads=threads or torch.get_num_threads(),
        cost=cost,
        source=f"measured by slimswarm devices probe on {platform.node()} ({platform.processor() or platform.machine()})",
    )
    return dev, rows
