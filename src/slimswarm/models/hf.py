"""Hugging Face model folders (config.json + safetensors or PyTorch shards), local or from the hub."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import SlimswarmError
from .llama import ModelConfig
from .tokenizer import HFTokenizer, cache_root, folder_cache_key, replayed_or_loaded


def read_hf_config(folder: Path) -> ModelConfig:
    p = folder / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SlimswarmError(f"{p}: invalid JSON ({e})") from None
    return ModelConfig.from_hf(cfg, source=str(p))


def hf_weights(folder: Path, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight of the folder, read one tensor at a time (safetensors with plain reads,
    so no mapped file pages stay resident; a PyTorch ``.bin`` shard is read whole)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(folder.glob("pytorch_model*.bin"))
        if not files:
            raise SlimswarmError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    cast = lambda v: v.to(dtype) if v.is_floating_point() else v  # noqa: E731
    for f in files:
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt", backend="pread") as st:
                    for k in st.keys():
                        yield k, cast(st.get_tensor(k))
            else:
                part = torch.load(str(f), map_location="cpu", weights_only=True)
                for k in list(part):
                    yield k, cast(part.pop(k))
        except Exception as e:  # noqa: BLE001 - safetensors, zip, and the weights-only unpickler's refusals alike
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SlimswarmError(f"{f}: corrupt or truncated weights ({first})") from None


def hf_shapes(folder: Path) -> dict[str, torch.Tensor] | None:
    """Meta tensors with the shapes the safetensors headers declare (None for PyTorch .bin shards)."""
    from safetensors import SafetensorError, safe_open

    from .validate import header_shapes

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", backend="pread") as st:
                out.update(header_shapes(st))
        except (SafetensorError, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SlimswarmError(f"{f}: corrupt or truncated weights ({first})") from None
    return out


def read_hf_weights(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The whole state dict at once (``load`` streams ``hf_weights`` instead)."""
    return dict(hf_weights(folder, dtype))


def read_hf_tokenizer(folder: Path, cfg: ModelConfig | None) -> HFTokenizer:
    """The folder's tokenizer: replayed without transformers when it has a tokenizer.json that transformers has
    loaded once before (see models/tokenizer.py), else through transformers."""
    def load_hf():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:
            raise SlimswarmError(f"{folder}: cannot load tokenizer ({type(e).__name__}: {e})") from None

    eos = cfg.eos_token_id if cfg is not None else None
    if not (folder / "tokenizer.json").is_file():
        return HFTokenizer(load_hf(), eos)
    return replayed_or_loaded(cache_root() / f"dir-{folder_cache_key(folder)}", load_hf, eos,
                              source=("hf", str(folder)))


def download_hub(repo_id: str) -> Path:
    """Fetch a hub model (config, weights, tokenizer) when the machine is online."""
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
            )
        )
    except Exception as e:
        raise SlimswarmError(f"model {repo_id!r}: not a local path and not downloadable from the hub ({type(e).__name__})") from None
