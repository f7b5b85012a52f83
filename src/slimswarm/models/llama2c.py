"""Our reader for llama2.c checkpoints (``run.c`` format: a 7-int header, then float32 tensors)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import SlimswarmError
from .gguf import unpermute_rope
from .llama import ModelConfig

_HEADER = struct.Struct("<7i")


def read_llama2c(path: str | Path, dtype: torch.dtype = torch.float32):
    """(ModelConfig, state dict in our names) from a llama2.c ``.bin`` (legacy version-0 export)."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < _HEADER.size:
        raise SlimswarmError(f"{path}: too short for a llama2.c header ({len(raw)} bytes)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _HEADER.unpack_from(raw)
    shared = vocab > 0  # llama2.c signals an untied classifier by a negative vocab size
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv:
        raise SlimswarmError(f"{path}: not a llama2.c checkpoint (header {dim, hidden, n_layers, n_heads, n_kv})")
    if (dim // n_heads) % 2:
        raise SlimswarmError(f"{path}: not a llama2.c checkpoint (head size {dim // n_heads} is odd)")
    try:
        cfg = ModelConfig(
            vocab_size=vocab,
            hidden_size=dim,
            intermediate_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=seq_len,
            tie_word_embeddings=shared,
            bos_token_id=1,
            eos_token_id=[2],
        )
    except SlimswarmError as e:
        raise SlimswarmError(f"{path}: {e}") from None
    hd = dim // n_heads
    kv_dim = n_kv * hd
    shapes = [
        ("model.embed_tokens.weight", (vocab, dim)),
        ("input_layernorm", (n_layers, dim)),
        ("q_proj", (n_layers, dim, dim)),
        ("k_proj", (n_layers, kv_dim, dim)),
        ("v_proj", (n_layers, kv_dim, dim)),
        ("o_proj", (n_layers, dim, dim)),
        ("post_attention_layernorm", (n_layers, dim)),
        ("gate_proj", (n_layers, hidden, dim)),
        ("down_proj", (n_layers, dim, hidden)),
        ("up_proj", (n_layers, hidden, dim)),
        ("model.norm.weight", (dim,)),
        ("freq_cis_real", (seq_len, hd // 2)),
        ("freq_cis_imag", (seq_len, hd // 2)),
    ]
    if not shared:
        shapes.append(("lm_head.weight", (vocab, dim)))
    need = sum(int(np.prod(s)) for _, s in shapes) * 4 + _HEADER.size
    if len(raw) < need:
        raise SlimswarmError(f"{path}: truncated llama2.c file ({len(raw)} bytes, header implies {need})")
    flat = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=_HEADER.size).copy())
    tensors, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        tensors[name] = flat[off : off + n].view(shape)
        off += n
    sd = {k: tensors[k] for k in ("model.embed_tokens.weight", "model.norm.weight")}
    if not shared:
        sd["lm_head.weight"] = tensors["lm_head.weight"]
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    for i in range(n_layers):
        for part in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{i}.{part}.weight"] = tensors[part][i]
        for part in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            w = tensors[part][i]
            if part == "q_proj":
                w = unpermute_rope(w, n_heads)
            elif part == "k_proj":
                w = unpermute_rope(w, n_kv)
            sd[f"model.layers.{i}.{'self_attn' if part in attn else 'mlp'}.{part}.weight"] = w
    return cfg, {k: v.contiguous().to(dtype) for k, v in sd.items()}
