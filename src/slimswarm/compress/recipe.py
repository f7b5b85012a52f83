"""Recipes: YAML in, validated pydantic configs out; named presets; the one verb ``compress(model, recipe, calib)``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ..errors import SlimswarmError
from .distill import DistillConfig
from .prune.masks import parse_pattern


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str  # fnmatch on module names, e.g. "model.layers.0.*" or "*.down_proj"
    bits: Literal[2, 3, 4, 5, 6, 8] | None = None
    group_size: int | None = None
    skip: bool = False


class QuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    bits: Literal[2, 3, 4, 5, 6, 8] = 4
    group_size: int = 128  # -1 or 0: per output channel
    per_tensor: bool = False  # one scale for the whole weight (rtn only; group_size is then ignored)
    symmetric: bool = False
    group_fallback: bool = False  # where group_size does not divide a width, use its largest divisor <= group_size that is a multiple of 16
    act_order: bool = False
    # How each group's scale and zero point are chosen: "minmax" spans the group's extremes; "mse" searches clipped
    # ranges for the least squared error; "imatrix" weights that error per input column by E[x²] on calibration text
    # (llama.cpp's importance matrix). Works with rtn and gptq; the stored format is the same.
    range_search: Literal["minmax", "mse", "imatrix"] = "minmax"
    damp: float = Field(0.01, gt=0, lt=1)
    head_bits: Literal[8] | None = 8  # embeddings + lm_head as int8 per row; null keeps them float
    # How the embeddings / LM head table is rounded: "rtn" (each row on its own), or "gptq": the LM head as a linear,
    # its Hessian from the final hidden states of the already-quantized model on the calibration text (the stored
    # format is the same; a tied table's embedding role is not optimised). Needs calibration text.
    head_method: Literal["rtn", "gptq"] = "rtn"
    overrides: list[Override] = []
    # Mixed precision: give one budget for the whole checkpoint (bits per parameter, or bytes of model.safetensors);
    # each decoder linear then gets the format from ``formats`` that minimises the predicted KL (quant/mixed.py),
    # and ``bits`` / ``group_size`` are not used. Needs calibration text (the sensitivity pass).
    budget_bpw: float | None = Field(None, gt=0)
    budget_bytes: int | None = Field(None, gt=0)
    formats: list[str] = ["w3g64", "w4g128", "w4g64", "w8"]
    # with a budget, the embeddings / LM head table (one item; tied: one table) chooses from these (null: head_bits)
    head_formats: list[str] | None = None
    # with a budget, the sensitivity pass (a forward + backward per sequence, the costly part) reads only the first
    # N calibration sequences; GPTQ's Hessians use them all (null: the pass reads all of them too)
    sensitivity_samples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _per_tensor_rtn(self) -> "QuantizeConfig":
        if self.per_tensor and self.method != "rtn":
            raise ValueError(f"per_tensor works with method rtn, not {self.method}")
        if self.range_search != "minmax" and (self.method == "awq" or self.per_tensor):
            raise ValueError(f"range_search {self.range_search} works with rtn and gptq groups, not "
                             f"{'per_tensor' if self.per_tensor else 'awq'}")
        if self.budget_bpw is not None and self.budget_bytes is not None:
            raise ValueError("give one of budget_bpw or budget_bytes")
        if self.budgeted:
            if self.method == "awq" or self.per_tensor or self.overrides:
                raise ValueError("a budget (mixed precision) works with rtn or gptq, without per_tensor or overrides")
            from .quant.formats import WeightFormat

            if not self.formats:
                raise ValueError("formats: give at least one format for the budget to choose from")
            for f in self.formats + (self.head_formats or []):
                try:
                    WeightFormat.parse(f)
                except SlimswarmError as e:
                    raise ValueError(str(e)) from None
        return self

    @property
    def budgeted(self) -> bool:
        return self.budget_bpw is not None or self.budget_bytes is not None

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" or self.range_search == "imatrix" or self.budgeted or self.head_method == "gptq"

    @field_validator("group_size")
    @classmethod
    def _gs(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"group_size must be -1, 0 or positive, got {v}")
        return v


class StructuredConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heads: float = 0.0  # fraction of key-value head groups to remove (each with its query heads)
    channels: float = 0.0  # fraction of MLP channels to remove
    layers: int = Field(0, ge=0)  # how many whole decoder layers to remove (lowest block influence)
    # "layer": every layer loses the same fraction of heads/channels; "global": rank them across all layers at once.
    # SmolLM2-135M, 25% of heads and channels: WikiText-2 ppl 75 per layer vs 1,578 global (results/prune_distill_smollm2).
    scope: Literal["layer", "global"] = "layer"

    @field_validator("heads", "channels")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"{v} is outside [0, 1)")
        return v


class PruneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    sparsity: float = 0.0  # unstructured fraction of weights set to zero; an N:M pattern implies 1 - N/M
    pattern: str = "unstructured"  # or "N:M", e.g. "2:4", "4:8": keep N of every M consecutive inputs
    per_row: bool = True  # compare scores within each output row (Wanda's choice) or across the whole layer
    structured: StructuredConfig | None = None
    storage: Literal["sparse", "dense"] = "sparse"  # sparse: SparseLinear modules, so the bytes really shrink
    targets: list[str] = ["model.layers.*"]  # fnmatch on decoder linear names
    block: int = Field(128, ge=1)  # SparseGPT column block
    damp: float = Field(0.01, gt=0, lt=1)
    _nm: tuple[int, int] | None = PrivateAttr(None)  # ``pattern`` parsed once, at validation

    @property
    def nm(self) -> tuple[int, int] | None:
        """The N:M pattern as (N, M), or None for unstructured."""
        return self._nm

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"sparsity {v} is outside [0, 1)")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            parse_pattern(v)
        except SlimswarmError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "PruneConfig":
        nm = self._nm = parse_pattern(self.pattern)
        if nm and self.sparsity and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} (which means {1 - nm[0] / nm[1]})")
        st = self.structured
        if not nm and not self.sparsity and (st is None or not (st.heads or st.channels or st.layers)):
            raise ValueError("nothing to prune: set sparsity, an N:M pattern or structured")
        return self


class LowRankConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int | None = Field(None, ge=1)
    energy: float | None = Field(None, gt=0, le=1)  # keep the smallest rank holding this fraction of Σσ²
    activation_aware: bool = True  # whiten by the calibration inputs (SVD-LLM / ASVD)
    whitening: Literal["cholesky", "scale"] = "cholesky"
    targets: list[str] = ["model.layers.*"]
    damp: float = Field(0.01, ge=0, lt=1)

    @model_validator(mode="after")
    def _one(self) -> "LowRankConfig":
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank or energy")
        return self


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(64, ge=1)
    seq_len: int = Field(256, ge=16)


class LoRARecoveryConfig(BaseModel):
    """Recovery fine-tuning with a LoRA (base frozen), trained by distillation from the uncompressed model and merged."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]
    train: DistillConfig = DistillConfig(steps=100, lr=1e-3)


class Recipe(BaseModel):
    """Passes run in this order: prune → lowrank → recovery (distill: the whole student; or lora) → quantize."""

    model_config = ConfigDict(extra="forbid")
    name: str = "custom"
    prune: PruneConfig | None = None
    lowrank: LowRankConfig | None = None
    distill: DistillConfig | None = None  # the compressed model learns from the uncompressed one (teacher)
    lora: LoRARecoveryConfig | None = None
    quantize: QuantizeConfig | None = None
    calibration: CalibrationConfig = CalibrationConfig()

    @model_validator(mode="after")
    def _recovery(self) -> "Recipe":
        if self.distill is not None and self.lora is not None:
            raise ValueError("give one recovery pass: distill (trains every weight) or lora (trains an adapter)")
        for name, cfg in (("distill", self.distill), ("lora", self.lora and self.lora.train)):
            if cfg is not None and cfg.mode == "kd" and self.prune is None and self.lowrank is None:
                raise ValueError(f"{name}: nothing to recover from (no prune or lowrank pass before it); "
                                 "quantization runs after recovery")
        return self

    @model_validator(mode="after")
    def _composable(self) -> "Recipe":
        # QuantLinear replaces nn.Linear modules; SparseLinear / LowRankLinear are not quantized (not supported yet).
        if self.quantize is not None and self.lowrank is not None:
            raise ValueError("lowrank + quantize is not supported: LowRankLinear factors are not quantized")
        if self.quantize is not None and self.prune is not None and self.prune.storage == "sparse" and (
                self.prune.sparsity or self.prune.pattern != "unstructured"):
            raise ValueError("prune.storage sparse + quantize is not supported: use prune.storage dense "
                             "(zeros are then quantized like any weight)")
        return self

    @property
    def needs_calibration(self) -> bool:
        p, lr, q = self.prune, self.lowrank, self.quantize
        return bool((p and (p.structured is not None or p.method != "magnitude"))
                    or (lr and lr.activation_aware) or (q and q.needs_calibration))


_PRESETS = {
    "w8": {"quantize": {"method": "rtn", "bits": 8, "group_size": -1}},
    "w4g128-rtn": {"quantize": {"method": "rtn", "bits": 4, "group_size": 128, "group_fallback": True}},
    "w4g128-gptq": {"quantize": {"method": "gptq", "bits": 4, "group_size": 128, "group_fallback": True}},
    "w4g128-awq": {"quantize": {"method": "awq", "bits": 4, "group_size": 128, "group_fallback": True}},
    "w3g128-gptq": {"quantize": {"method": "gptq", "bits": 3, "group_size": 128, "group_fallback": True}},
    "w4g64-rtn": {"quantize": {"method": "rtn", "bits": 4, "group_size": 64}},
    "w4g64-gptq": {"quantize": {"method": "gptq", "bits": 4, "group_size": 64}},
    "w4g64-gptq-imatrix": {"quantize": {"method": "gptq", "bits": 4, "group_size": 64, "range_search": "imatrix"},
                           "calibration": {"samples": 16, "seq_len": 256}},
    # Mixed precision: the checkpoint folder (model.safetensors + 3.6 MB of tokenizer files + slimswarm.json with the
    # plan) within 93.5 / 105 / 75 MB, the sizes of llama.cpp's Q3_K_M / Q4_K_M files of SmolLM2-135M and a 3-bit-class
    # target (benchmarks/quant_smollm2.py). Steps of 3, 4, 5, 6 and 8 bits, so the knapsack can give the sensitive
    # tensors (and the embeddings/LM head) a little more, not the 4 -> 8 jump.
    **{f"mixed-{mb}mb": {"quantize": {"method": "gptq", "range_search": "imatrix", "budget_bytes": nbytes,
                                      "formats": ["w3g64", "w3g128", "w4g128", "w4g96", "w4g64", "w5g64", "w6g64",
                                                  "w8"],
                                      "head_formats": ["w4g64", "w5g64", "w6g64", "w6", "w8"]},
                         "calibration": {"samples": 16, "seq_len": 256}}
       for mb, nbytes in ((93, 89_800_000), (105, 101_300_000))},
    # 75 MB: 3-bit-class bytes, where the rounding matters most. The same knapsack, and GPTQ with act-order (static
    # groups: the stored layout is the standard one) and Hessians from 64 x 256 calibration tokens (16 x 256 left
    # the 1536-wide down_proj Hessians thin); the tied embeddings/LM head rounded by GPTQ too (head_method). The
    # Fisher sensitivity pass reads the first 16 sequences (its costly backward). Dev measure (4 x 1,024 WikiText-2
    # test tokens from 40,960, outside the benchmark's windows): dPPL +41.1% with the mixed-93mb settings, +28.5% with
    # the GPTQ head, +21.7% with 64 x 256 calibration, +19.9% with act-order.
    "mixed-75mb": {"quantize": {"method": "gptq", "range_search": "imatrix", "budget_bytes": 71_300_000,
                                "act_order": True, "head_method": "gptq", "sensitivity_samples": 16,
                                "formats": ["w3g64", "w3g128", "w4g128", "w4g96", "w4g64", "w5g64", "w6g64", "w8"],
                                "head_formats": ["w4g64", "w5g64", "w6g64", "w6", "w8"]},
                   "calibration": {"samples": 64, "seq_len": 256}},
    "magnitude-50": {"prune": {"method": "magnitude", "sparsity": 0.5}},
    "wanda-50": {"prune": {"method": "wanda", "sparsity": 0.5}},
    "sparsegpt-50": {"prune": {"method": "sparsegpt", "sparsity": 0.5}},
    "wanda-2:4": {"prune": {"method": "wanda", "pattern": "2:4"}},
    "sparsegpt-2:4": {"prune": {"method": "sparsegpt", "pattern": "2:4"}},
    "struct-25": {"prune": {"structured": {"heads": 0.25, "channels": 0.25}}},
    "svd-llm-r128": {"lowrank": {"rank": 128, "activation_aware": True}},
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
        raise SlimswarmError(f"{p}: a recipe is a mapping with keys name, prune, lowrank, quantize, calibration")
    data.setdefault("name", p.stem)
    return _validate(data, str(p))


def apply_recipe(model, recipe: Recipe, calib=None, tokenizer=None, text: str | None = None) -> dict:
    """Run the recipe's passes in place, in the order prune → lowrank → distill/lora → quantize; returns each pass's
    metadata. The one verb of compression (``slimswarm.compress``).

    Calibration tokens [samples, seq_len] are needed when ``recipe.needs_calibration``; a distill/lora pass needs the
    ``tokenizer`` and trains on ``text`` (default: the training-split calibration text)."""
    if recipe.needs_calibration and calib is None:
        raise SlimswarmError(f"recipe {recipe.name}: needs calibration text")
    meta: dict = {}
    recover = recipe.distill or (recipe.lora.train if recipe.lora is not None else None)
    teacher = None
    if recover is not None:
        if tokenizer is None:
            raise SlimswarmError(f"recipe {recipe.name}: the distill/lora pass needs the tokenizer")
        if recover.mode == "kd":
            import copy

            teacher = copy.deepcopy(model).eval()  # the uncompressed model, before any pass
            for p in teacher.parameters():
                p.requires_grad_(False)
    prune_cfg = recipe.prune
    # Recovery trains dense weights: keep pruned linears dense through it, store them compactly afterwards.
    sparse_later = (recover is not None and prune_cfg is not None and prune_cfg.storage == "sparse"
                    and bool(prune_cfg.sparsity or prune_cfg.pattern != "unstructured"))
    if sparse_later:
        prune_cfg = prune_cfg.model_copy(update={"storage": "dense"})
    if prune_cfg is not None:
        from .prune.apply import prune_model

        meta["prune"] = prune_model(model, prune_cfg, calib)
    if recipe.lowrank is not None:
        from .lowrank import lowrank_model

        meta["lowrank"] = lowrank_model(model, recipe.lowrank, calib)
    if recover is not None:
        meta["recovery"] = _recover(model, teacher, tokenizer, recipe, text)
        del teacher
        if sparse_later:
            from .layerwise import set_module
            from .prune.sparse import SparseLinear

            for name in meta["prune"].get("layers", {}):
                lin = model.get_submodule(name)
                sp = SparseLinear.from_dense(lin.weight.detach(), lin.bias, recipe.prune.nm)
                set_module(model, name, sp)
                meta["prune"]["layers"][name]["format"] = sp.fmt
    if recipe.quantize is not None:
        from .quant.apply import quantize_model

        meta["quantization"] = quantize_model(model, recipe.quantize, calib)
    return meta


def _recover(model, teacher, tokenizer, recipe: Recipe, text: str | None) -> dict:
    """Train the compressed ``model`` towards ``teacher`` (distill: every weight; lora: an adapter, then merged)."""
    import shutil
    import tempfile

    from .distill import distill

    import torch

    # Pruned zeros stay zeros: training (or a merged dense LoRA delta) would fill them in and undo the sparsity.
    masks = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Linear) and w is not None and w.dim() == 2 and (w == 0).float().mean() > 0.01:
            masks[mod] = w.detach() != 0

    def remask(_rec=None) -> None:
        with torch.no_grad():
            for mod, keep in masks.items():
                mod.weight.mul_(keep)

    work = Path(tempfile.mkdtemp(prefix="slimswarm-recover-"))
    try:
        if recipe.lora is not None:
            from .lora import LoRAConfig, add_lora, merge_lora

            lcfg = LoRAConfig(r=recipe.lora.r, alpha=recipe.lora.alpha, targets=recipe.lora.targets)
            add_lora(model, lcfg)  # freezes the base: the trainer only sees A and B
            res = distill(teacher, model, tokenizer, recipe.lora.train, work, text, resume=False, save=False)
            merged = merge_lora(model)
            remask()
            for p in model.parameters():
                p.requires_grad_(False)
            return {"pass": "lora", "config": recipe.lora.model_dump(), "merged": merged, "history": res.history}
        res = distill(teacher, model, tokenizer, recipe.distill, work, text, resume=False, save=False, on_step=remask)
        for p in model.parameters():
            p.requires_grad_(False)
        return {"pass": "distill", "config": recipe.distill.model_dump(), "history": res.history}
    finally:
        shutil.rmtree(work, ignore_errors=True)
