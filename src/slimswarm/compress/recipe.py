"""Recipes: YAML in, validated pydantic configs out; named presets; the one verb ``compress(model, recipe, calib)``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import SlimswarmError


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str  # fnmatch on module names, e.g. "model.layers.0.*" or "*.down_proj"
    bits: Literal[2, 3, 4, 8] | None = None
    group_size: int | None = None
    skip: bool = False


class QuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 128  # -1 or 0: per output channel
    per_tensor: bool = False  # one scale for the whole weight (rtn only; group_size is then ignored)
    symmetric: bool = False
    group_fallback: bool = False  # where group_size does not divide a width, use its largest divisor <= group_size that is a multiple of 16
    act_order: bool = False
    damp: float = Field(0.01, gt=0, lt=1)
    head_bits: Literal[8] | None = 8  # embeddings + lm_head as int8 per row; null keeps them float
    overrides: list[Override] = []

    @model_validator(mode="after")
    def _per_tensor_rtn(self) -> "QuantizeConfig":
        if self.per_tensor and self.method != "rtn":
            raise ValueError(f"per_tensor works with method rtn, not {self.method}")
        return self

    @field_validator("group_size")
    @classmethod
    def _gs(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"group_size must be -1, 0 or positive, got {v}")
        return v


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(64, ge=1)
    seq_len: int = Field(256, ge=16)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "custom"
    quantize: QuantizeConfig | None = None
    calibration: CalibrationConfig = CalibrationConfig()


_PRESETS = {
    "w8": {"quantize": {"method": "rtn", "bits": 8, "group_size": -1}},
    "w4g128-rtn": {"quantize": {"method": "rtn", "bits": 4, "group_size": 128, "group_fallback": True}},
    "w4g128-gptq": {"quantize": {"method": "gptq", "bits": 4, "group_size": 128, "group_fallback": True}},
    "w4g128-awq": {"quantize": {"method": "awq", "bits": 4, "group_size": 128, "group_fallback": True}},
    "w3g128-gptq": {"quantize": {"method": "gptq", "bits": 3, "group_size": 128, "group_fallback": True}},
    "w4g64-rtn": {"quantize": {"method": "rtn", "bits": 4, "group_size": 64}},
    "w4g64-gptq": {"quantize": {"method": "gptq", "bits": 4, "group_size": 64}},
}
PRESETS = tuple(_PRESETS)


def _validate(data: dict, source: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise SlimswarmError(f"{source}: {where}: {err['msg']}") from None


def load_recipe(ref: str) -> Recipe:
    """A preset name or a YAML file."""
    if ref in _PRESETS:
        return _validate({"name": ref, **_PRESETS[ref]}, f"preset {ref}")
    p = Path(ref)
    if not p.is_file():
        raise SlimswarmError(f"recipe {ref!r}: not a preset ({', '.join(PRESETS)}) and no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SlimswarmError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SlimswarmError(f"{p}: a recipe is a mapping with keys name, quantize, calibration")
    data.setdefault("name", p.stem)
    return _validate(data, str(p))
