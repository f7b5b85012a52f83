"""GGUF files (llama.cpp): read the Llama-family config and de-quantize the weights into our names."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import SlimswarmError
from .llama import ModelConfig
from .tokenizer import HFTokenizer

_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


_TOP_LEVEL = ("token_embd.weight", "output_norm.weight", "output.weight")


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the interleaved-pair RoPE layout (llama.cpp, Meta, llama2.c) into Hugging Face's half split."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _gguf_config(reader, path: Path) -> ModelConfig:
    """Our config from the GGUF metadata (raises TypeError/ValueError on missing or mistyped fields)."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise SlimswarmError(f"unsupported architecture {arch!r} (llama, qwen2, mistral)")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_heads, n_kv = int(g("attention.head_count")), int(g("attention.head_count_kv", g("attention.head_count")))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(g("vocab_size", len(tokens.data) if tokens is not None else 0))
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    scaling = None
    if g("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=int(g("embedding_length")),
        intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=int(g("attention.key_length", 0) or 0),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(g("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=[] if eos is None else [int(eos)],
        model_type=arch,
    )
    return cfg


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(ModelConfig, state dict in our names, GGUFReader) from a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # truncated or not a GGUF at all
        raise SlimswarmError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    try:
        cfg = _gguf_config(reader, path)
    except SlimswarmError as e:
        raise SlimswarmError(f"{path}: {e}") from None
    except (TypeError, ValueError, OverflowError, KeyError, IndexError) as e:  # a metadata field missing or mistyped
        raise SlimswarmError(f"{path}: bad or missing model metadata ({type(e).__name__}: {e})") from None
    arch, n_heads, n_kv = cfg.model_type, cfg.num_attention_heads, cfg.num_key_value_heads
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.name not in _TOP_LEVEL and not (len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_TO_HF):
            continue  # e.g. rope_freqs: recomputed from the config
        try:
            arr = dequantize(t.data, t.tensor_type)
            rows = [int(x) for x in reversed(t.shape.tolist())]
            w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(rows))
            if arch == "llama" and parts[2:3] in (["attn_q"], ["attn_k"]):  # llama.cpp permutes q/k for llama only
                w = unpermute_rope(w, n_heads if parts[2] == "attn_q" else n_kv)
        except Exception as e:  # noqa: BLE001 - the de-quantizer's and numpy's errors alike: a corrupt tensor
            raise SlimswarmError(f"{path}: tensor {t.name!r} cannot be read ({type(e).__name__}: {e})") from None
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        else:
            key = f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}"
        sd[key] = w.to(dtype)
    return cfg, sd, reader


def gguf_tokenizer(path: str | Path, cfg: ModelConfig) -> HFTokenizer:
    """The tokenizer embedded in a GGUF, converted once by transformers and cached on disk."""
    from transformers import AutoTokenizer

    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha1(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SLIMSWARM_CACHE", Path.home() / ".cache" / "slimswarm")) / "tokenizers" / key
    if (cache / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(cache))
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:  # noqa: BLE001 - transformers' converter fails in many ways on a broken vocabulary
            raise SlimswarmError(f"{path}: the embedded tokenizer cannot be read ({type(e).__name__}: {e})") from None
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    return HFTokenizer(tok, cfg.eos_token_id)
