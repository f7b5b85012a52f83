"""The result of loading any checkpoint: (our model, tokenizer, source, kind, metadata); shared by load and checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from .llama import CausalLM
from .tokenizer import Tokenizer


@dataclass
class Loaded:
    model: CausalLM
    tokenizer: Tokenizer | None  # None when loaded with load_tokenizer=False
    source: str  # resolved path or hub id
    kind: str  # "hf", "gguf", "llama2c", "slimswarm"
    meta: dict
