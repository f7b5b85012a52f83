"""Test helpers for the hostile-file tests: small real model files in every format we read, and their mutations."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

# Values that break naive readers: zero, negatives, off-by-one around powers of two, and sizes far past any file.
EXTREME_INTS = [0, 1, 2, 3, 7, 255, 2**15, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1]


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's half-split RoPE layout → the interleaved pairs that GGUF and llama2.c store."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_tiny_gguf(loaded, path: Path, quantized: bool = True) -> Path:
    """stories260k (``loaded``) as a llama-architecture GGUF written with the ``gguf`` package: F32 norms, Q8_0
    matrices (``quantized``) so the mutations also reach the block de-quantizer, and its SentencePiece vocabulary."""
    import gguf
    from gguf.quants import quantize

    cfg = loaded.model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id or 1)
    w.add_eos_token_id(cfg.eos_token_id[0] if cfg.eos_token_id else 2)
    import sentencepiece as spm

    from slimswarm.data import data_dir

    sp = spm.SentencePieceProcessor(model_file=str(data_dir() / "models/stories260K/hf/tokenizer.model"))
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(sp.vocab_size())]
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    w.add_token_types(types)
    back = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in loaded.model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.float()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            parts = name.split(".")  # model.layers.i.<module>.<sub>.weight
            mod = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{back[mod]}.{parts[-1]}"
            if mod == "self_attn.q_proj":
                t = permute_rope(t, cfg.num_attention_heads)
            elif mod == "self_attn.k_proj":
                t = permute_rope(t, cfg.num_key_value_heads)
        arr = t.numpy()
        if quantized and arr.ndim == 2 and arr.shape[1] % 32 == 0:
            q = quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    dst.chmod(0o755)
    return dst


def safetensors_header_span(raw: bytes) -> int:
    """Bytes of a safetensors file's length prefix + JSON header (the part worth mutating)."""
    (n,) = struct.unpack_from("<Q", raw)
    return 8 + min(n, len(raw))


def json_paths(doc, prefix=()):
    """Every (path, value) in a JSON document, leaves and containers alike."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from json_paths(v, prefix + (i,))


def json_replace(doc, path, value):
    """A copy of ``doc`` with the value at ``path`` replaced (``value`` is ``DELETE``: removed)."""
    doc = json.loads(json.dumps(doc))
    if not path:
        return value
    node = doc
    for k in path[:-1]:
        node = node[k]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


DELETE = object()


def load_weights(kind: str, path: Path):
    """Parse ``path`` the way ``slimswarm.load`` does for its format, short of the tokenizer: the model or an error."""
    from slimswarm.models.checkpoint import load_checkpoint
    from slimswarm.models.gguf import read_gguf
    from slimswarm.models.hf import read_hf_config, read_hf_weights
    from slimswarm.models.llama2c import read_llama2c
    from slimswarm.models.load import build_model

    if kind == "gguf":
        return build_model(*read_gguf(path)[:2], str(path))
    if kind == "llama2c":
        return build_model(*read_llama2c(path), str(path))
    if kind == "hf":
        return build_model(read_hf_config(path), read_hf_weights(path), str(path))
    if kind == "slimswarm":
        return load_checkpoint(path).model
    if kind == "adapter":  # a LoRA adapter folder, loaded into a bank on a fresh stories260k (as `serve` does)
        from slimswarm import load
        from slimswarm.compress.lora import AdapterBank

        AdapterBank(load("stories260k").model, {"x": str(path)})
        return None
    raise ValueError(kind)


def mutate_bytes(raw: bytes, op: tuple) -> bytes:
    """One mutation: ("truncate", n) | ("flip", [(offset, byte), ...]) | ("int", offset, value, width)."""
    if op[0] == "truncate":
        return raw[: op[1]]
    b = bytearray(raw)
    if op[0] == "flip":
        for off, v in op[1]:
            b[off % len(b)] = v
        return bytes(b)
    _, off, value, width = op
    off = min(off, len(b) - width)
    b[off : off + width] = struct.pack("<Q" if width == 8 else "<I", value % (1 << (8 * width)))
    return bytes(b)


def random_byte_op(rng, raw: bytes, span: int) -> tuple:
    """A random ``mutate_bytes`` operation from ``random.Random`` (the benchmark's larger runs)."""
    k = rng.random()
    if k < 0.3:
        return ("truncate", rng.randrange(len(raw)))
    if k < 0.65:
        return ("flip", [(rng.randrange(min(span, len(raw))), rng.randrange(256)) for _ in range(rng.randint(1, 4))])
    return ("int", rng.randrange(max(1, min(span, len(raw)) - 8)), rng.choice(EXTREME_INTS), rng.choice([4, 8]))


JSON_VALUES = [None, 0, -1, 1, 2**31 - 1, 2**40, 0.5, 1e308, "", "x", "../../etc/passwd", [], [2**31], {}, {"a": 1},
               True, False]
