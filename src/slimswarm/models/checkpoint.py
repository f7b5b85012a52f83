"""The compressed checkpoint: safetensors + ``slimswarm.json`` (config, recipe, quantization layout, parent hash)
+ tokenizer files. Written to a temporary folder and renamed, so a crash never leaves half a checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError

from ..errors import SlimswarmError
from .llama import CausalLM, ModelConfig, rope_inv_freq
from .loaded import Loaded
from .tokenizer import HFTokenizer, SentencePieceTokenizer

FORMAT = "slimswarm/1"

# Compressed module types a checkpoint can hold besides QuantLinear: name -> "module:Class". Each class has
# ``checkpoint_spec() -> dict`` (JSON constructor arguments) and ``from_spec(spec)`` (an empty module of the
# right shapes, filled by load_state_dict).
MODULE_TYPES = {
    "SparseLinear": "slimswarm.compress.prune.sparse:SparseLinear",
    "LowRankLinear": "slimswarm.compress.lowrank:LowRankLinear",
}


def register_module(cls: type) -> type:
    """Make a module class storable in checkpoints (see MODULE_TYPES)."""
    MODULE_TYPES[cls.__name__] = f"{cls.__module__}:{cls.__qualname__}"
    return cls


def _module_class(name: str, source: Path) -> type:
    import importlib

    ref = MODULE_TYPES.get(name)
    if ref is None:
        raise SlimswarmError(f"{source}: unknown module type {name!r} (known: {', '.join(MODULE_TYPES)})")
    mod, _, cls = ref.partition(":")
    return getattr(importlib.import_module(mod), cls)


def module_specs(model: torch.nn.Module) -> dict[str, dict]:
    """{name: {"type": ..., **spec}} for every storable compressed module (outermost ones only)."""
    out: dict[str, dict] = {}
    for name, m in model.named_modules():
        if any(name.startswith(k + ".") for k in out):
            continue
        if type(m).__name__ in MODULE_TYPES and hasattr(m, "checkpoint_spec"):
            out[name] = {"type": type(m).__name__, **m.checkpoint_spec()}
    return out


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a folder's weight and config files in name order."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".json", ".bin", ".gguf"))
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def save_checkpoint(model: CausalLM, tokenizer, out: str | Path, meta: dict, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    from ..atomic import publish_dir, recover, staging_dir

    out = Path(out)
    recover(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SlimswarmError(f"{out}: output folder exists and is not empty")
    tmp = staging_dir(out)
    try:
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings and "model.embed_tokens.weight" in sd:
            sd.pop("lm_head.weight", None)  # one tensor, stored once
        save_file(sd, str(tmp / "model.safetensors"))
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.hf.save_pretrained(str(tmp))
            tok_kind = "hf"
        elif isinstance(tokenizer, SentencePieceTokenizer):
            shutil.copy(tokenizer.path, tmp / "tokenizer.model")
            tok_kind = "sentencepiece"
        else:
            raise SlimswarmError(f"cannot save tokenizer of type {type(tokenizer).__name__}")
        dtypes = {str(v.dtype) for k, v in sd.items() if v.is_floating_point() and not k.endswith("scales")}
        doc = {"format": FORMAT, "config": model.config.as_dict(), "tokenizer": tok_kind,
               "dtype": "bfloat16" if dtypes == {"torch.bfloat16"} else "float32", **meta}
        specs = module_specs(model)
        if specs:
            doc["modules"] = specs
        (tmp / "slimswarm.json").write_text(json.dumps(doc, indent=2))
        publish_dir(tmp, out)  # never deletes the old checkpoint before the new one is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class _QuantEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    bits: Literal[2, 3, 4, 5, 6, 8]
    group_size: StrictInt
    tied: StrictBool = False


class _CheckpointDoc(BaseModel):
    """The parts of slimswarm.json the loader reads; the rest (recipe, parent, passes ...) is metadata."""
    model_config = ConfigDict(extra="allow")
    format: Literal["slimswarm/1"]
    config: dict[str, Any]
    tokenizer: Literal["hf", "sentencepiece"]
    dtype: Literal["float32", "bfloat16"] = "float32"
    quantization: dict[str, _QuantEntry] = {}
    modules: dict[str, dict[str, Any]] = {}


def _read_doc(path: Path) -> tuple[dict, _CheckpointDoc]:
    meta = path / "slimswarm.json"
    try:
        doc = json.loads(meta.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise SlimswarmError(f"{meta}: unreadable ({e})") from None
    if isinstance(doc, dict) and doc.get("format") != FORMAT:
        raise SlimswarmError(f"{meta}: unknown format {doc.get('format')!r} (expected {FORMAT})")
    checked = doc
    if isinstance(doc, dict) and isinstance(doc.get("quantization"), dict) and "plan" in doc["quantization"]:
        # the mixed-precision plan (compress/quant/mixed.py) is a record, not a module
        checked = {**doc, "quantization": {k: v for k, v in doc["quantization"].items() if k != "plan"}}
    try:
        return doc, _CheckpointDoc.model_validate(checked)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "document"
        raise SlimswarmError(f"{meta}: {loc}: {err['msg']}") from None


def _build(cfg: ModelConfig, d: _CheckpointDoc, target: torch.dtype, source: Path) -> CausalLM:
    """The model described by slimswarm.json, its quantized and compressed modules in place, tensors unfilled."""
    from ..compress.quant.linear import QuantEmbedding, QuantLinear
    from .materialize import empty_model

    model = empty_model(cfg, target)  # uninitialised: every tensor is overwritten by the loader
    try:
        for name, info in d.quantization.items():
            if name == "lm_head":
                head = QuantLinear(cfg.hidden_size, cfg.vocab_size, info.bits, info.group_size)
                model.lm_head = head
                if info.tied:
                    model.model.embed_tokens = QuantEmbedding(head, shared=True)
                else:
                    model.model.embed_tokens = QuantEmbedding(
                        QuantLinear(cfg.hidden_size, cfg.vocab_size, info.bits, info.group_size), shared=False)
                continue
            lin = model.get_submodule(name)
            if not isinstance(lin, torch.nn.Linear):
                raise SlimswarmError(f"quantization.{name}: not a linear layer")
            ql = QuantLinear(lin.in_features, lin.out_features, info.bits, info.group_size, lin.bias is not None)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, ql)
        for name, spec in d.modules.items():
            spec = dict(spec)
            cls = _module_class(spec.pop("type", None), source / "slimswarm.json")
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, cls.from_spec(spec))
    except SlimswarmError as e:
        raise SlimswarmError(f"{source / 'slimswarm.json'}: {e}") from None
    except (AttributeError, TypeError, ValueError, KeyError) as e:  # a module name or a constructor argument is off
        raise SlimswarmError(f"{source / 'slimswarm.json'}: modules do not fit the model "
                             f"({type(e).__name__}: {e})") from None
    if cfg.tie_word_embeddings and "lm_head" not in d.quantization:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, load_tokenizer: bool = True):
    """Rebuild the (compressed) model exactly as saved: quantized modules first, then the tensors. The model is
    built on the meta device and checked against the file's tensor shapes (read from the safetensors header)
    before any real memory is taken; the tensors are then read one layer at a time."""
    from safetensors import SafetensorError, safe_open

    from .materialize import load_streamed
    from .validate import check_layer_count, check_shapes, header_shapes

    path = Path(path)
    doc, d = _read_doc(path)
    try:  # plain reads (pread): no mapped file pages stay resident
        st = safe_open(str(path / "model.safetensors"), framework="pt", backend="pread")
        shapes = header_shapes(st)
    except (SafetensorError, OSError) as e:
        raise SlimswarmError(f"{path / 'model.safetensors'}: corrupt or truncated ({str(e).splitlines()[0]})") from None
    try:
        cfg = ModelConfig(**d.config)
    except TypeError as e:  # an unknown or missing field
        raise SlimswarmError(f"{path / 'slimswarm.json'}: config: {e}") from None
    except SlimswarmError as e:
        raise SlimswarmError(f"{path / 'slimswarm.json'}: {e}") from None
    target = dtype or getattr(torch, d.dtype)
    check_layer_count(cfg.num_hidden_layers, shapes, str(path))
    with torch.device("meta"):
        skeleton = _build(cfg, d, target, path)
    check_shapes(skeleton, shapes, str(path))
    del skeleton
    # before the weights: its build's transient stays below their peak
    tok = _checkpoint_tokenizer(path, d, cfg) if load_tokenizer else None
    model = _build(cfg, d, target, path)
    try:
        missing, unexpected = load_streamed(model, ((k, st.get_tensor(k)) for k in st.keys()))
    except (SafetensorError, OSError) as e:
        raise SlimswarmError(f"{path / 'model.safetensors'}: corrupt or truncated ({str(e).splitlines()[0]})") from None
    del st
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise SlimswarmError(f"{path}: checkpoint does not match its slimswarm.json "
                             f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    for name, m in model.named_modules():
        if hasattr(m, "check_loaded"):  # compressed formats whose indices must stay inside their matrix
            m.check_loaded(f"{path}: {name}")
    model.inv_freq = rope_inv_freq(cfg).float()
    model.eval()
    return Loaded(model, tok, str(path), "slimswarm", doc)


def _checkpoint_tokenizer(path: Path, d, cfg: ModelConfig):
    from .heap import release_freed_memory

    if d.tokenizer == "hf":
        from .hf import read_hf_tokenizer

        tok = read_hf_tokenizer(path, cfg)
    else:
        tok = SentencePieceTokenizer(path / "tokenizer.model")
    release_freed_memory()
    return tok
