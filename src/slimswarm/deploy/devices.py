"""deploy/: device profiles (memory, bandwidth, cores, accelerator, links) in YAML, validated; and `devices probe`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import SlimswarmError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(v: Any) -> Any:
    """``8 GiB``, ``512MB``, ``1e9`` or an int → bytes (an int); anything else is left for pydantic to refuse."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", v)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a size: {v!r} (use bytes or a unit: MB, GB, MiB, GiB)")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Link(_Strict):
    bandwidth_gb_s: float = Field(gt=0)  # GB/s (10^9 bytes) one way
    latency_ms: float = Field(ge=0)


class Accelerator(_Strict):
    name: str
    memory_bytes: int = Field(gt=0)
    bandwidth_gb_s: float = Field(gt=0)
    compute_gflops: float | None = Field(default=None, gt=0)

    _bytes = field_validator("memory_bytes", mode="before")(parse_bytes)


class DecodeCost(_Strict):
    """Per-token decode time t = Σ_format bytes / (bandwidth × efficiency[format]) + Σ_format (row, group) pairs ×
    group_s[format] + KV bytes read / (bandwidth × efficiency["kv"]) + layers × fixed_s_per_layer + fixed_s (a
    generate step through the native decode step; "kv" prices attention, float32's efficiency standing in where a
    profile has none). A prefill call of n tokens costs layers × prefill_fixed_s_per_layer
    + Σ_format params × (dequant_s_per_param + n × prefill_s_per_param_token): a quantized layer de-quantizes its
    whole weight once per call, then multiplies in float. Without the per-format figures (profiles written before
    they existed) prefill is 2 × params / (prefill_gflops × 10^9) seconds a token. Fitted by `devices probe`."""

    efficiency: dict[str, float]  # by weight format: float32, bfloat16, int8, int4; and kv (attention)
    fixed_s_per_layer: float = Field(ge=0)
    fixed_s: float = Field(ge=0)
    prefill_gflops: float = Field(gt=0)
    prefill_fixed_s_per_layer: float = Field(default=0.0, ge=0)
    prefill_s_per_param_token: dict[str, float] = Field(default_factory=dict)  # by format, seconds / (param·token)
    dequant_s_per_param: dict[str, float] = Field(default_factory=dict)  # by format, seconds / param, once a call
    # by format: seconds a (row, group) pair of a decode step's quantized matmul costs beside its bytes (the loops'
    # per-group sum and scale); absent in profiles fitted before it, whose efficiencies then hold it
    group_s: dict[str, float] = Field(default_factory=dict)
    runtime_bytes: int = Field(ge=0)  # resident bytes of a serving process before any model (Python, torch)
    load_overhead_bytes: int = Field(default=0, ge=0)  # transient bytes above weights while a checkpoint loads


class Device(_Strict):
    name: str = Field(min_length=1)
    memory_bytes: int = Field(gt=0)  # what the models may use: RAM (or the accelerator's memory, see below)
    reserve_bytes: int = Field(default=0, ge=0)  # held back for the OS and other programs
    bandwidth_gb_s: float = Field(gt=0)  # memory read bandwidth
    cores: int = Field(gt=0)
    threads: int = Field(gt=0)
    compute_gflops: float | None = Field(default=None, gt=0)
    accelerator: Accelerator | None = None  # when present, models run there: its memory and bandwidth count
    links: dict[str, Link] = Field(default_factory=dict)  # to other devices by name
    cost: DecodeCost | None = None  # fitted on the device itself (probe); else the variants table's machine's
    source: str = ""

    _bytes = field_validator("memory_bytes", "reserve_bytes", mode="before")(parse_bytes)

    @property
    def usable_bytes(self) -> int:
        """Bytes the models may occupy on this device."""
        if self.accelerator is not None:
            return self.accelerator.memory_bytes
        return self.memory_bytes - self.reserve_bytes

    @property
    def model_bandwidth_gb_s(self) -> float:
        return self.accelerator.bandwidth_gb_s if self.accelerator is not None else self.bandwidth_gb_s


class DeviceSet(_Strict):
    devices: list[Device] = Field(min_length=1)

    def by_name(self) -> dict[str, Device]:
        return {d.name: d for d in self.devices}

    def link(self, a: str, b: str) -> Link | None:
        """The link a→b as written on either end (links are symmetric unless both ends give one)."""
        da, db = self.by_name()[a], self.by_name()[b]
        return da.links.get(b) or db.links.get(a)


def _pydantic_line(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "missing"
    return f"{where}: field {loc}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "missing" and
                                             not isinstance(err.get("input"), dict) else "")


def read_yaml(path: str | Path, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise SlimswarmError(f"{what} {p}: no such file")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SlimswarmError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None


def devices_from_dict(d: Any, where: str = "devices") -> DeviceSet:
    if isinstance(d, dict) and "devices" not in d and "name" in d:
        d = {"devices": [d]}  # a file holding one profile (what probe writes)
    try:
        ds = DeviceSet.model_validate(d)
    except ValidationError as e:
        raise SlimswarmError(_pydantic_line(e, where)) from None
    names = [x.name for x in ds.devices]
    for i, x in enumerate(ds.devices):
        if names.count(x.name) > 1:
            raise SlimswarmError(f"{where}: field devices.{i}.name: {x.name!r} is used twice")
        for other in x.links:
            if other not in names:
                raise SlimswarmError(f"{where}: field devices.{i}.links.{other}: no device named {other!r}")
        if x.usable_bytes <= 0:
            raise SlimswarmError(f"{where}: field devices.{i}.reserve_bytes: {x.reserve_bytes} leaves no memory "
                                 f"of memory_bytes {x.memory_bytes}")
    return ds


def load_devices(paths: str | Path | list) -> DeviceSet:
    """One or more YAML files, each a ``devices:`` list or a single profile; names must be unique across them."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    merged: list[Device] = []
    for p in paths:
        merged += devices_from_dict(read_yaml(p, "--devices"), str(p)).devices
    return devices_from_dict({"devices": [m.model_dump() for m in merged]}, ", ".join(map(str, paths)))


def write_yaml_atomic(obj: Any, path: str | Path, header: str = "") -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(header + yaml.safe_dump(obj, sort_keys=False), encoding="utf-8")
    tmp.replace(p)
    return p
