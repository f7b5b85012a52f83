"""LoRA adapters on any linear (float or QuantLinear): add, train, merge, save alone; a bank of many adapters per batch row.

One shared base, many specialists: an adapter is two thin matrices per target linear, ΔW = (α/r)·B·A, stored on its
own (``adapter.safetensors`` + ``adapter.json``: 9.8 MB in fp32 for SmolLM2 at r=8 on all seven projections,
1.8% of the fp32 base). Training freezes the base,
so it works on a quantized base too (QLoRA-style: the base's de-quantized weight is used in the forward, gradients
flow only into A and B). ``AdapterBank`` wraps every target linear once and applies, per batch row, the adapter
that row's request asked for, so the engine runs different adapters in one forward.
"""

from __future__ import annotations

import fnmatch
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from ..errors import SlimswarmError
from ..progress import progress

ADAPTER_FORMAT = "slimswarm-lora/1"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter.json"
DEFAULT_TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


class LoRAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))  # fnmatch on module names

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _is_linear(m: nn.Module) -> bool:
    from .quant.linear import QuantLinear

    return isinstance(m, (nn.Linear, QuantLinear))


def target_modules(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """{name: linear} for the linears whose names match a target pattern (the LM head never, unless named)."""
    out = {}
    for name, m in model.named_modules():
        if _is_linear(m) and any(fnmatch.fnmatchcase(name, t) for t in targets):
            out[name] = m
    return out


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class LoRALinear(nn.Module):
    """base(x) + (α/r)·B·A·x, A [r, in] Kaiming-initialised, B [out, r] zero: the adapter starts as the identity."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.scaling = r, alpha / r
        dev = next(iter(base.buffers()), None)
        dev = base.weight.device if isinstance(base, nn.Linear) else (dev.device if dev is not None else None)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        d = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (d * self.scaling).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """ΔW [out, in] in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def add_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every target linear in a LoRALinear and freeze everything else; returns the wrapped names."""
    mods = target_modules(model, cfg.targets)
    if not mods:
        raise SlimswarmError(f"LoRA targets {cfg.targets} match no linear layer of this model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in mods.items():
        _set(model, name, LoRALinear(lin, cfg.r, cfg.alpha, cfg.dropout))
    return list(mods)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: {"<module>.lora_A": A, "<module>.lora_B": B}."""
    sd = {}
    for name, m in lora_modules(model).items():
        sd[f"{name}.lora_A"] = m.lora_A.detach().float().contiguous().clone()
        sd[f"{name}.lora_B"] = m.lora_B.detach().float().contiguous().clone()
    return sd


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear into its base weight and unwrap it; returns how many were merged.

    A float base absorbs ΔW exactly. A QuantLinear base is re-quantized (round-to-nearest at its own bits and group
    size) with ΔW added: the merged model is again packed, and slightly different from base + adapter."""
    from .quant.linear import QuantLinear
    from .quant.rtn import rtn_quantize

    n = 0
    for name, m in list(lora_modules(model).items()):
        base = m.base
        if isinstance(base, QuantLinear):
            w = base.dequantize(torch.float32) + m.delta().to(base.qweight.device)
            codes, scales, zeros = rtn_quantize(w, base.bits, base.group_size)
            new = QuantLinear.from_codes(codes, scales, zeros, base.bits, base.group_size,
                                         None if base.bias is None else base.bias.detach())
            _set(model, name, new.to(base.qweight.device))
        else:
            base.weight += m.delta().to(base.weight.dtype)
            _set(model, name, base)
        n += 1
    return n


def unwrap_lora(model: nn.Module) -> None:
    """Drop every adapter (LoRALinear → its base), leaving the base untouched."""
    for name, m in list(lora_modules(model).items()):
        _set(model, name, m.base)


# -- storage ------------------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, out: str | Path, cfg: LoRAConfig, meta: dict | None = None,
                 extra_files: dict | None = None) -> Path:
    """Write the adapter alone to ``out`` (a folder), atomically: a temporary folder renamed at the end.
    ``extra_files`` {name: write(path)} adds files (a loss plot) to the folder before it is published."""
    from safetensors.torch import save_file

    sd = lora_state_dict(model)
    if not sd:
        raise SlimswarmError("save_adapter: the model has no LoRA modules (call add_lora first)")
    from ..atomic import publish_dir, staging_dir

    out = Path(out)
    tmp = staging_dir(out)
    try:
        save_file(sd, str(tmp / ADAPTER_FILE))
        shapes = {k[: -len(".lora_A")]: [int(v.shape[1]), int(sd[k[:-1] + "B"].shape[0])]
                  for k, v in sd.items() if k.endswith(".lora_A")}
        doc = {"format": ADAPTER_FORMAT, "config": cfg.model_dump(), "modules": shapes, **(meta or {})}
        (tmp / ADAPTER_META).write_text(json.dumps(doc, indent=2))
        for name, write in (extra_files or {}).items():  # e.g. the loss plot: inside the folder before it appears
            write(tmp / name)
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_adapter(path: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict]:
    """(config, {module: lora tensors}, metadata) from an adapter folder, with one-line errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_dir():
        raise SlimswarmError(f"adapter {p}: no such folder")
    meta_p, w_p = p / ADAPTER_META, p / ADAPTER_FILE
    if not meta_p.is_file() or not w_p.is_file():
        raise SlimswarmError(f"adapter {p}: needs {ADAPTER_META} and {ADAPTER_FILE}")
    try:
        doc = json.loads(meta_p.read_text())
    except json.JSONDecodeError as e:
        raise SlimswarmError(f"{meta_p}: invalid JSON ({e.msg})") from None
    if doc.get("format") != ADAPTER_FORMAT:
        raise SlimswarmError(f"{meta_p}: format {doc.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    try:
        cfg = LoRAConfig.model_validate(doc.get("config", {}))
    except ValidationError as e:
        err = e.errors()[0]
        raise SlimswarmError(f"{meta_p}: config.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    try:
        sd = load_file(str(w_p))
    except (SafetensorError, OSError) as e:
        raise SlimswarmError(f"{w_p}: unreadable safetensors ({e})") from None
    for k, v in sd.items():
        if not (k.endswith(".lora_A") or k.endswith(".lora_B")) or v.dim() != 2:
            raise SlimswarmError(f"{w_p}: unexpected tensor {k!r} {tuple(v.shape)}")
    return cfg, sd, doc


def apply_adapter(model: nn.Module, path_or_state, source: str = "adapter") -> LoRAConfig:
    """Add LoRA modules to ``model`` and fill them from an adapter folder or a (cfg, state) pair."""
    cfg, sd = _cfg_state(path_or_state)
    names = sorted({k.rsplit(".", 1)[0] for k in sd})
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        lin = _lookup(model, name, source)
        a, b = sd[f"{name}.lora_A"], sd[f"{name}.lora_B"]
        _check_shapes(lin, a, b, name, source)
        m = LoRALinear(lin, a.shape[0], cfg.alpha, cfg.dropout)
        with torch.no_grad():
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)
        _set(model, name, m)
    return cfg


def _cfg_state(path_or_state) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    if isinstance(path_or_state, (str, Path)):
        cfg, sd, _ = load_adapter(path_or_state)
        return cfg, sd
    cfg, sd = path_or_state
    return cfg, sd


def _lookup(model: nn.Module, name: str, source: str) -> nn.Module:
    try:
        lin = model.get_submodule(name)
    except AttributeError:
        raise SlimswarmError(f"{source}: module {name!r} does not exist in this base model") from None
    if isinstance(lin, (LoRALinear, MultiLoRALinear)):
        lin = lin.base
    if not _is_linear(lin):
        raise SlimswarmError(f"{source}: module {name!r} is not a linear layer")
    return lin


def _check_shapes(lin, a: torch.Tensor, b: torch.Tensor, name: str, source: str) -> None:
    if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features or a.shape[0] != b.shape[1]:
        raise SlimswarmError(f"{source}: {name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a "
                             f"{lin.in_features}→{lin.out_features} linear")


# -- many adapters, one batch -------------------------------------------------------------------------------------


class _Rows:
    """Per-row adapter slots shared by every MultiLoRALinear of a bank (slot 0: no adapter)."""

    def __init__(self):
        self.ids: torch.Tensor | None = None  # [B] long, or None when every row uses the same slot
        self.uniform = 0  # the slot every row uses when ids is None
        self.mask: torch.Tensor | None = None  # [B, 1, slots·R]: 1 on each row's own slot (the dense path)
        self.r = 1  # R: every slot is padded to the bank's largest rank


class MultiLoRALinear(nn.Module):
    """base(x) + per-row ΔW, all adapters side by side: A_cat [slots·R, in], B_cat [out, slots·R] (slot 0 zeros,
    scaling folded into B). B is stored transposed (``Bt_cat`` [slots·R, out], ``B_cat`` is its view): a slot's R
    rows of it are contiguous, which is what the native decode step streams (one axpy per rank and row).

    A batch whose rows share one slot does two thin matmuls (none for slot 0). A mixed batch projects every row onto
    every adapter's A at once, zeroes the slots a row did not ask for, and multiplies by B_cat: two dense matmuls that
    read each adapter once per call, instead of gathering per-row copies of A and B (which cost a copy of B·R·(in+out)
    floats per linear per step). With far more adapters than rows the gather is cheaper, and is used."""

    def __init__(self, base: nn.Module, rows: _Rows, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base, self.rows, self.dtype = base, rows, dtype
        self.in_features, self.out_features = base.in_features, base.out_features
        self.A_cat = torch.zeros(1, self.in_features, dtype=dtype)
        self.Bt_cat = torch.zeros(1, self.out_features, dtype=dtype)

    @property
    def B_cat(self) -> torch.Tensor:
        return self.Bt_cat.t()

    @property
    def slots(self) -> int:
        return self.A_cat.shape[0] // self.rows.r

    def slot(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [R, in], scaled B [out, R]) of slot ``i`` (views)."""
        r = self.rows.r
        return self.A_cat[i * r:(i + 1) * r], self.B_cat[:, i * r:(i + 1) * r]

    def set_slots(self, a_list: list[torch.Tensor | None], b_list: list[torch.Tensor | None], r: int,
                  device) -> None:
        """Rebuild from per-adapter (A, scaled B); None marks an adapter that does not touch this linear."""
        n = len(a_list) + 1
        A = torch.zeros(n * r, self.in_features, device=device, dtype=self.dtype)
        Bt = torch.zeros(n * r, self.out_features, device=device, dtype=self.dtype)
        for i, (a, b) in enumerate(zip(a_list, b_list), 1):
            if a is not None:
                k = min(a.shape[0], r)  # ranks above r are zero padding of an older, wider stack
                A[i * r:i * r + k] = a[:k]
                Bt[i * r:i * r + k] = b[:, :k].t()
        self.A_cat, self.Bt_cat = A, Bt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.rows
        if rows.ids is None:
            if rows.uniform == 0:
                return y
            a, b = self.slot(rows.uniform)
            return y + F.linear(F.linear(x.float(), a.float()), b.float()).to(y.dtype)
        ids = rows.ids
        if x.shape[0] != ids.shape[0]:
            raise SlimswarmError(f"adapter rows set for {ids.shape[0]} rows, batch has {x.shape[0]}")
        # fp32 math whatever the stacks' storage (a bf16 bank's values are widened, as the native step does)
        x3 = x.reshape(x.shape[0], -1, self.in_features).float()
        if rows.mask is not None:
            d = F.linear(F.linear(x3, self.A_cat.float()) * rows.mask, self.B_cat.float())
        else:
            r = rows.r
            a = self.A_cat.view(-1, r, self.in_features)[ids].float()  # [B, R, in]
            b = self.B_cat.view(self.out_features, -1, r)[:, ids].permute(1, 0, 2).float()  # [B, out, R]
            d = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))
        return y + d.view(*x.shape[:-1], self.out_features).to(y.dtype)


class AdapterBank:
    """Many LoRA adapters resident on one base: ``set_rows([name or None, ...])`` before each forward.

    Adapters live only in the stacked matrices of the wrapped linears (one copy, fp32 or bf16); the base stays shared
    and unchanged (float or quantized)."""

    def __init__(self, model: nn.Module, adapters: dict[str, object] | None = None,
                 dtype: torch.dtype = torch.float32):
        """``dtype``: the stacks' storage, fp32 (exact) or bf16 (half the bytes resident and streamed per decode step;
        each adapter weight rounded once, the math stays fp32)."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise SlimswarmError(f"adapter bank dtype {dtype}: use torch.float32 or torch.bfloat16")
        self.model, self.dtype = model, dtype
        self._rows = _Rows()
        self._cfgs: dict[str, LoRAConfig] = {}
        self._ranks: dict[str, int] = {}
        self._wrapped: dict[str, MultiLoRALinear] = {}
        self._slot: dict[str, int] = {}
        for name, ref in (adapters or {}).items():
            self.add(name, ref)

    @property
    def names(self) -> list[str]:
        return list(self._cfgs)

    def __contains__(self, name: object) -> bool:
        return name in self._cfgs

    def __len__(self) -> int:
        return len(self._cfgs)

    def nbytes(self) -> int:
        return sum(w.A_cat.numel() * w.A_cat.element_size() + w.Bt_cat.numel() * w.Bt_cat.element_size()
                   for w in self._wrapped.values())

    def add(self, name: str, path_or_state) -> None:
        """Load an adapter (a folder or a (cfg, state) pair) under ``name``; replaces one of the same name."""
        if not name or not isinstance(name, str):
            raise SlimswarmError(f"adapter name must be a non-empty string, got {name!r}")
        source = f"adapter {name!r}" + (f" ({path_or_state})" if isinstance(path_or_state, (str, Path)) else "")
        cfg, sd = _cfg_state(path_or_state)
        mods = sorted({k.rsplit(".", 1)[0] for k in sd})
        if not mods:
            raise SlimswarmError(f"{source}: holds no LoRA tensors")
        for m in mods:  # validate everything before touching the model
            if f"{m}.lora_A" not in sd or f"{m}.lora_B" not in sd:
                raise SlimswarmError(f"{source}: {m} lacks lora_A or lora_B")
            _check_shapes(_lookup(self.model, m, source), sd[f"{m}.lora_A"], sd[f"{m}.lora_B"], m, source)
        for m in mods:
            if m not in self._wrapped:
                lin = self.model.get_submodule(m)
                wrapped = MultiLoRALinear(lin, self._rows, self.dtype)
                wrapped.set_slots([None] * len(self._cfgs), [None] * len(self._cfgs), self._rows.r, _device_of(lin))
                _set(self.model, m, wrapped)
                self._wrapped[m] = wrapped
        new = {m: (sd[f"{m}.lora_A"].float(), sd[f"{m}.lora_B"].float() * cfg.scaling) for m in mods}
        self._restack(name, cfg, max(a.shape[0] for a, _ in new.values()), new, drop=name)

    def remove(self, name: str) -> None:
        if name not in self._cfgs:
            raise SlimswarmError(f"unknown adapter {name!r}")
        self._restack(None, None, 0, {}, drop=name)

    def _restack(self, name, cfg, rank: int, new: dict, drop: str | None) -> None:
        """Rebuild every stack from the current slots (minus ``drop``) plus the new adapter, in one consistent step."""
        old = list(self._cfgs)
        keep = [n for n in old if n != drop]
        ranks = {n: self._ranks[n] for n in keep}
        if name is not None:
            ranks[name] = rank
        r = max([1] + list(ranks.values()))
        for m, w in self._wrapped.items():
            a_list, b_list = [], []
            for n in keep:
                a, b = w.slot(old.index(n) + 1)
                a_list.append(a.clone())
                b_list.append(b.clone())
            if name is not None:
                a, b = new.get(m, (None, None))
                a_list.append(a)
                b_list.append(b)
            w.set_slots(a_list, b_list, r, w.A_cat.device if w.A_cat.numel() > 1 else _device_of(w.base))
        self._rows.r = r
        self._cfgs = {n: self._cfgs[n] for n in keep}
        self._ranks = {n: self._ranks[n] for n in keep}
        if name is not None:
            self._cfgs[name], self._ranks[name] = cfg, rank
        self._slot = {n: i for i, n in enumerate(self._cfgs, 1)}
        self.set_rows([None])

    def set_rows(self, names: list[str | None]) -> None:
        """The adapter of each batch row for the following forwards (None: the base alone)."""
        slots = []
        for n in names:
            if n is None:
                slots.append(0)
            elif n in self._slot:
                slots.append(self._slot[n])
            else:
                raise SlimswarmError(f"unknown adapter {n!r} (loaded: {', '.join(self._cfgs) or 'none'})")
        rows = self._rows
        if len(set(slots)) <= 1:
            rows.ids, rows.mask, rows.uniform = None, None, (slots[0] if slots else 0)
            return
        dev = _device_of(next(iter(self._wrapped.values())).base) if self._wrapped else torch.device("cpu")
        rows.ids = torch.tensor(slots, dtype=torch.long, device=dev)
        n = len(self._cfgs) + 1
        if n <= 4 * len(slots):  # dense path: reading every adapter once beats gathering per-row copies
            mask = torch.zeros(len(slots), n, rows.r, device=dev)
            mask[torch.arange(len(slots)), rows.ids] = 1.0
            rows.mask = mask.view(len(slots), 1, n * rows.r)
        else:
            rows.mask = None


def _device_of(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


# -- training -----------------------------------------------------------------------------------------------------


class FinetuneConfig(BaseModel):
    """Supervised LoRA fine-tuning on (prompt, completion) pairs: loss on completion tokens only."""

    model_config = ConfigDict(extra="forbid")
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    max_len: int = Field(256, ge=8)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    save_every: int = Field(0, ge=0)  # with a state path: a training checkpoint every N steps (0: never)


@dataclass
class FinetuneResult:
    history: list[dict]
    trained_params: int
    seconds: float
    resumed_from: int = 0  # the step a killed run continued from (0: a fresh start)


FINETUNE_STATE_FORMAT = "slimswarm-finetune-state/1"


def _finetune_fingerprint(model, data, cfg: FinetuneConfig) -> str:
    """What makes a run itself: base weights, tokenized data and every setting that changes the trajectory."""
    import hashlib

    h = hashlib.sha256(json.dumps(cfg.model_dump(exclude={"save_every", "log_every"}), sort_keys=True).encode())
    for ids, labels in data:
        h.update(repr((ids, labels)).encode())
    for name, t in sorted(model.state_dict().items()):
        if ".lora_" not in name:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _load_finetune_state(path: Path, fingerprint: str) -> dict | None:
    if not path.exists():
        return None
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise SlimswarmError(f"{path}: unreadable training checkpoint ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(st, dict) or st.get("format") != FINETUNE_STATE_FORMAT:
        raise SlimswarmError(f"{path}: not a slimswarm finetune checkpoint")
    if st.get("fingerprint") != fingerprint:
        raise SlimswarmError(f"{path}: checkpoint of a different run (base, data or settings changed); delete it "
                             "or use another --out")
    return st


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per pair: the prompt's labels are -100; the completion ends with EOS and is trained.

    Over-long examples keep their completion and lose the prompt's start (the instruction sits at the end)."""
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    out = []
    for prompt, completion in pairs:
        p = tokenizer.encode(prompt)
        c = tokenizer.encode(completion, bos=False) + ([eos] if eos is not None else [])
        c = c[: max_len - 1]
        p = p[-(max_len - len(c)):]
        out.append((p + c, [-100] * len(p) + c))
    return out


def _collate(batch: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token labels (shifted by one; padding ignored)."""
    t = max(len(ids) for ids, _ in batch)
    x = torch.full((len(batch), t), pad, dtype=torch.long)
    y = torch.full((len(batch), t), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(ids) - 1] = torch.tensor(lab[1:])
    return x, y


def finetune_lora(model, tokenizer, pairs: list[tuple[str, str]], cfg: FinetuneConfig,
                  on_log=None, state_path: str | Path | None = None) -> FinetuneResult:
    """Add LoRA to ``model`` (float or quantized base) and train it on ``pairs``; the base stays frozen.

    With ``state_path``, a training checkpoint (adapter, optimizer, schedule, data order, RNG) is written there
    atomically every ``cfg.save_every`` steps, and a run killed after one continues from it exactly: the same
    losses and, bit for bit, the same adapter as a run that was never stopped."""
    import time

    from ..models.llama import CausalLM

    if not pairs:
        raise SlimswarmError("finetune: no training examples")
    torch.manual_seed(cfg.seed)
    if not lora_modules(model):
        add_lora(model, cfg.lora)
    params = [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]
    for p in params:
        p.requires_grad_(True)
    data = encode_pairs(tokenizer, pairs, cfg.max_len)
    order = list(range(len(data)))
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    from .distill import warmup_cosine

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps))
    if hasattr(model, "clear_cache"):
        model.clear_cache()
    model.train()
    history, cursor, t0, run, start = [], len(order), time.perf_counter(), 0.0, 0
    state_path = Path(state_path) if state_path is not None else None
    fingerprint = _finetune_fingerprint(model, data, cfg) if state_path is not None else ""
    st = _load_finetune_state(state_path, fingerprint) if state_path is not None else None
    if st is not None:
        with torch.no_grad():
            for p, saved in zip(params, st["params"]):
                p.copy_(saved)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["torch_rng"])
        rng.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in st["python_rng"]))
        order, cursor, run, start = list(st["order"]), st["cursor"], st["run"], st["step"]
        history = list(st["history"])

    def save_state(step: int) -> None:
        from ..atomic import write_file

        doc = {"format": FINETUNE_STATE_FORMAT, "fingerprint": fingerprint, "step": step,
               "params": [p.detach().clone() for p in params], "optimizer": opt.state_dict(),
               "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(), "python_rng": rng.getstate(),
               "order": order, "cursor": cursor, "run": run, "history": history}
        write_file(state_path, lambda f: torch.save(doc, f))

    with torch.enable_grad():
        for step in progress(range(start, cfg.steps), "finetune (lora)", total=cfg.steps - start):
            batch = []
            while len(batch) < cfg.batch_size:
                if cursor >= len(order):
                    rng.shuffle(order)
                    cursor = 0
                batch.append(data[order[cursor]])
                cursor += 1
            x, y = _collate(batch, tokenizer.pad_id)
            x, y = x.to(params[0].device), y.to(params[0].device)
            keep = y != -100
            if isinstance(model, CausalLM):
                # the LM head only where a label is: a completion is a few tokens after a long prompt, and
                # projecting every prompt position onto the vocabulary is ~20% of SmolLM2's forward FLOPs
                logits = model.lm_head(model(x, hidden_only=True)[keep])
            else:
                logits = model(x)[keep]
            loss = F.cross_entropy(logits.float(), y[keep])
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            run = loss.item() if step == 0 else 0.9 * run + 0.1 * loss.item()
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                rec = {"step": step + 1, "loss": loss.item(), "loss_ema": run, "lr": sched.get_last_lr()[0]}
                history.append(rec)
                if on_log:
                    on_log(rec)
            if state_path is not None and cfg.save_every and (step + 1) % cfg.save_every == 0 \
                    and step + 1 < cfg.steps:
                save_state(step + 1)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return FinetuneResult(history, sum(p.numel() for p in params), time.perf_counter() - t0, start)
