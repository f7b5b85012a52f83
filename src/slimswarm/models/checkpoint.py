"""The compressed checkpoint: safetensors + ``slimswarm.json`` (config, recipe, quantization layout, parent hash)
+ tokenizer files. Written to a temporary folder and renamed, so a crash never leaves half a checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import SlimswarmError
from .llama import CausalLM, ModelConfig, rope_inv_freq
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

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SlimswarmError(f"{out}: output folder exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None):
    """Rebuild the (compressed) model exactly as saved: quantized modules first, then the tensors."""
    from safetensors import SafetensorError, safe_open

    from ..compress.quant.linear import QuantEmbedding, QuantLinear
    from .load import Loaded
    from .materialize import empty_model, load_streamed

    path = Path(path)
    try:
        doc = json.loads((path / "slimswarm.json").read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise SlimswarmError(f"{path / 'slimswarm.json'}: unreadable ({e})") from None
    if doc.get("format") != FORMAT:
        raise SlimswarmError(f"{path / 'slimswarm.json'}: unknown format {doc.get('format')!r} (expected {FORMAT})")
    try:  # tensors are read one layer at a time below (plain reads: no mapped file pages stay resident)
        st = safe_open(str(path / "model.safetensors"), framework="pt", backend="pread")
    except (SafetensorError, OSError) as e:
        raise SlimswarmError(f"{path / 'model.safetensors'}: corrupt or truncated ({str(e).splitlines()[0]})") from None
    cfg = ModelConfig(**doc["config"])
    target = dtype or getattr(torch, doc.get("dtype", "float32"))
    model = empty_model(cfg, target)  # uninitialised: every tensor is overwritten below
    q = doc.get("quantization", {})
    for name, info in q.items():
        if name == "lm_head":
            head = QuantLinear(cfg.hidden_size, cfg.vocab_size, info["bits"], info["group_size"])
            model.lm_head = head
            if info["tied"]:
                model.model.embed_tokens = QuantEmbedding(head, shared=True)
            else:
                model.model.embed_tokens = QuantEmbedding(
                    QuantLinear(cfg.hidden_size, cfg.vocab_size, info["bits"], info["group_size"]), shared=False)
            continue
        lin = model.get_submodule(name)
        ql = QuantLinear(lin.in_features, lin.out_features, info["bits"], info["group_size"], lin.bias is not None)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, ql)
    for name, spec in doc.get("modules", {}).items():
        spec = dict(spec)
        cls = _module_class(spec.pop("type", None), path / "slimswarm.json")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, cls.from_spec(spec))
    if cfg.tie_word_embeddings and "lm_head" not in q:
        model.lm_head.weight = model.model.embed_tokens.weight
    try:
        missing, unexpected = load_streamed(model, ((k, st.get_tensor(k)) for k in st.keys()))
    except (SafetensorError, OSError) as e:
        raise SlimswarmError(f"{path / 'model.safetensors'}: corrupt or truncated ({str(e).splitlines()[0]})") from None
    del st
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise SlimswarmError(f"{path}: checkpoint does not match its slimswarm.json "
                             f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    model.inv_freq = rope_inv_freq(cfg).float()
    model.eval()
    if doc["tokenizer"] == "hf":
        from .hf import read_hf_tokenizer

        tok = read_hf_tokenizer(path, cfg)
    else:
        tok = SentencePieceTokenizer(path / "tokenizer.model")
    return Loaded(model, tok, str(path), "slimswarm", doc)
