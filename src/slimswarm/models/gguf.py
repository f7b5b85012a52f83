"""GGUF files (llama.cpp): read the Llama-family config and de-quantize the weights into our names."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import SlimswarmError
from .gguf_header import GGUFTensor, read_header
from .llama import ModelConfig
from .tokenizer import HFTokenizer, cache_root, replayed_or_loaded

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
CHUNK_BYTES = 1 << 20  # bytes of a GGUF tensor read and de-quantized per step (bounds the temporaries)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the interleaved-pair RoPE layout (llama.cpp, Meta, llama2.c) into Hugging Face's half split."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def open_gguf(path: str | Path) -> tuple[ModelConfig, list[GGUFTensor]]:
    """(ModelConfig, tensor table) from a GGUF file's header; the weights stay on disk (see ``gguf_weights``)."""
    path = Path(path)
    try:
        meta, table = read_header(path)
    except (ValueError, OSError, struct.error, OverflowError, KeyError, IndexError, MemoryError) as e:  # truncated, hostile, or not a GGUF
        raise SlimswarmError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise SlimswarmError(f"{path}: unsupported architecture {arch!r} (llama, qwen2, mistral)")
    try:
        return _gguf_config(meta, arch, table), table
    except SlimswarmError as e:
        raise SlimswarmError(f"{path}: {e}") from None
    except (TypeError, ValueError, OverflowError, KeyError, IndexError) as e:  # a metadata field missing or mistyped
        raise SlimswarmError(f"{path}: bad or missing model metadata ({type(e).__name__}: {e})") from None


def _gguf_config(meta: dict, arch: str, table: list[GGUFTensor]) -> ModelConfig:
    """Our config from the GGUF metadata (raises TypeError/ValueError on missing or mistyped fields)."""
    g = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
    n_heads, n_kv = int(g("attention.head_count")), int(g("attention.head_count_kv", g("attention.head_count")))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(g("vocab_size", len(tokens) if tokens is not None else 0))
    names = {t.name for t in table}
    eos = meta.get("tokenizer.ggml.eos_token_id")
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
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=[] if eos is None else [int(eos)],
        model_type=arch,
    )
    return cfg


def gguf_shapes(table: list[GGUFTensor]) -> dict[str, torch.Tensor]:
    """Meta tensors with the shapes the header declares, in our names (checked against the config before loading)."""
    return {k: torch.empty(list(t.shape), device="meta") for t in table if (k := _hf_name(t.name)) is not None}


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_TO_HF:
        return f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}"
    return None  # e.g. rope_freqs: recomputed from the config


# (values, bytes) per block of the formats de-quantized here with torch ops straight into the output tensor;
# every other format goes through gguf.quants (numpy), one chunk at a time.
_TORCH_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q4_1": (32, 20)}


def _dequant_blocks(raw: torch.Tensor, kind: str, out: torch.Tensor) -> None:
    """``raw`` [blocks, bytes] of GGUF ``kind`` de-quantized into ``out`` [blocks, values] (fp32), with the same
    arithmetic as gguf.quants (fp32 products of the fp16 scales, then the offset), so the values are bit-identical."""
    if kind in ("F32", "F16"):
        out.copy_(raw.view(torch.float32 if kind == "F32" else torch.float16))
    elif kind == "Q8_0":  # d (fp16), 32 int8 codes: d * q
        out.copy_(raw[:, 2:].view(torch.int8))
        out.mul_(raw[:, :2].view(torch.float16).float())
    else:  # Q4_1: d, m (fp16), 16 bytes of 4-bit codes, low nibbles first: d * q + m
        qs = raw[:, 4:]
        out[:, :16].copy_(qs & 15)
        out[:, 16:].copy_(qs >> 4)
        out.mul_(raw[:, :2].view(torch.float16).float()).add_(raw[:, 2:4].view(torch.float16).float())


def _dequantized(f, t: GGUFTensor, dtype: torch.dtype, path: Path, buf: bytearray | None = None) -> torch.Tensor:
    """One tensor, read with plain file reads (no mapped file pages left resident) and de-quantized ``CHUNK_BYTES``
    of the file at a time straight into its final tensor of ``dtype``. ``buf``: a read buffer to reuse (grown
    when a chunk needs more), so the load allocates no temporaries between the long-lived weights."""
    shape = list(t.shape)
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    row_bytes = t.n_bytes // rows
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(rows, shape[-1])
    kind = t.tensor_type.name
    if kind == "F32" and dtype == torch.float32:  # the file's bytes are the tensor's
        view = memoryview(flat.numpy()).cast("B")
        f.seek(t.data_offset)
        if f.readinto(view) != len(view):
            raise SlimswarmError(f"{path}: tensor {t.name!r} is truncated")
        return out
    fast = _TORCH_BLOCKS.get(kind)
    if fast is not None and shape[-1] % fast[0]:
        fast = None
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    if buf is None or len(buf) < min(step, rows) * row_bytes:
        buf = bytearray(min(step, rows) * row_bytes)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        nbytes = n * row_bytes
        f.seek(t.data_offset + r0 * row_bytes)
        if f.readinto(memoryview(buf)[:nbytes]) != nbytes:
            raise SlimswarmError(f"{path}: tensor {t.name!r} is truncated")
        dst = flat[r0 : r0 + n]
        if fast is not None:
            values, size = fast
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(-1, size)
            work = dst.view(-1, values) if dtype == torch.float32 else torch.empty((raw.shape[0], values))
            _dequant_blocks(raw, kind, work)
            if work.data_ptr() != dst.data_ptr():
                dst.view(-1, values).copy_(work)
            continue
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        try:
            arr = dequantize(np.frombuffer(buf, dtype=np.uint8, count=nbytes).reshape(n, row_bytes),
                             GGMLQuantizationType(t.tensor_type.value))
        except Exception as e:  # noqa: BLE001 - the de-quantizer's and numpy's errors alike: a corrupt tensor
            raise SlimswarmError(f"{path}: tensor {t.name!r} cannot be read ({type(e).__name__}: {e})") from None
        dst.copy_(torch.from_numpy(np.asarray(arr, dtype=np.float32).reshape(n, shape[-1])))
    return out


def _unpermute_rope_(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``unpermute_rope`` in place, one head at a time (a head-sized temporary, not a second whole matrix)."""
    hd = w.shape[0] // n_heads
    for h in range(n_heads):
        rows = w[h * hd : (h + 1) * hd]
        rows.copy_(rows.reshape(hd // 2, 2, *w.shape[1:]).transpose(0, 1).reshape(rows.shape))
    return w


def gguf_weights(path: str | Path, table: list[GGUFTensor], cfg: ModelConfig, dtype: torch.dtype = torch.float32
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name in our model, tensor of ``dtype``) for each GGUF tensor, one at a time, in file order."""
    path = Path(path)
    arch = cfg.model_type
    buf = bytearray(CHUNK_BYTES)
    with open(path, "rb") as f:
        for t in table:
            key = _hf_name(t.name)
            if key is None:
                continue
            w = _dequantized(f, t, dtype, path, buf)
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if arch == "llama" and kind in ("attn_q", "attn_k"):  # llama.cpp permutes q/k for llama only
                w = _unpermute_rope_(w, cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads)
            yield key, w


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(ModelConfig, state dict in our names, tensor table): the whole state dict at once (tests, tools);
    ``load`` streams ``gguf_weights`` instead."""
    cfg, table = open_gguf(path)
    return cfg, dict(gguf_weights(path, table, cfg, dtype)), table


def gguf_tokenizer(path: str | Path, cfg: ModelConfig) -> HFTokenizer:
    """The tokenizer embedded in a GGUF, converted once by transformers and cached on disk; later loads replay the
    cached conversion without transformers (models/tokenizer.py)."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha1(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = cache_root() / key

    def load_hf():
        from transformers import AutoTokenizer

        if not (cache / "tokenizer_config.json").exists():
            _convert_gguf_tokenizer(path, cache)
        return AutoTokenizer.from_pretrained(str(cache))

    return replayed_or_loaded(cache, load_hf, cfg.eos_token_id, source=("gguf", str(path)))


def _convert_gguf_tokenizer(path: Path, cache: Path) -> None:
    """transformers' conversion of the GGUF's vocabulary, saved to ``cache`` (published by a rename)."""
    from transformers import AutoTokenizer

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
