"""deploy/: our decoder → an ONNX graph for ONNX Runtime, with past key/values in and present key/values out.

The graph is built node by node with ``onnx.helper`` rather than traced with ``torch.onnx.export``: a trace of
our model would follow its runtime branches (C kernels, KV-cache slots, the engine's per-row offsets), while
the graph we want is one fixed function of (input_ids, past) with every op chosen on purpose.

Inputs ``input_ids`` int64 [batch, seq] and, per layer, ``past_key_values.{i}.key|value`` float32
[batch, kv_heads_i, past, head_dim] (past = 0 for the prompt); outputs ``logits`` [batch, seq, vocab] and
``present.{i}.key|value`` [batch, kv_heads_i, past + seq, head_dim]. Positions are ``past .. past + seq - 1``;
RoPE is computed in the graph exactly as ours (fp32 positions times fp32 inverse frequencies, Hugging Face's
half-split rotation), so no cos/sin table bounds the context.

Weights: float linears as MatMul on the transposed fp32 weight; our int4 groups as ``com.microsoft::MatMulNBits``
with the same bytes: B [N, K/block, block/2] is our ``qweight`` (codes low nibble first along K, as the op
wants), scales are our fp16 scales widened to fp32 (exact), zero points our uint8 ones packed two a byte
(low nibble first, per row). Other bit widths, quantized embeddings and the int8 head are de-quantized exactly
to fp32 (MatMulNBits needs a power-of-two block of at least 16; per-row groups of 576 are not).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import SlimswarmError
from ..models.llama import ModelConfig

OPSET = 17
MODEL_FILE = "model.onnx"


class _Graph:
    """A tiny builder: unique names, initializers, nodes."""

    def __init__(self):
        from onnx import helper

        self.h = helper
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, arr: np.ndarray, base: str = "c") -> str:
        from onnx import numpy_helper

        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), n))
        return n

    def op(self, op: str, inputs: list[str], base: str | None = None, domain: str = "", n_out: int = 1, **attrs):
        outs = [self.name(base or op.lower()) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op, inputs, outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def i64(self, *v: int) -> str:
        return self.const(np.array(v, dtype=np.int64), "i64")


def _pack_zero_points(zeros: torch.Tensor) -> np.ndarray:
    """uint8 zero points [N, G] → [N * ceil(G/2)]: two a byte, low nibble first, each row padded."""
    z = zeros.to(torch.uint8)
    if z.shape[1] % 2:
        z = torch.nn.functional.pad(z, (0, 1))
    z = z.reshape(z.shape[0], -1, 2)
    return (z[..., 0] | (z[..., 1] << 4)).contiguous().numpy().reshape(-1)


def _linear(g: _Graph, x: str, m, base: str) -> str:
    from ..compress.quant.linear import QuantLinear

    bias = getattr(m, "bias", None)
    if isinstance(m, QuantLinear) and m.bits == 4 and m.group_size >= 16 and m.group_size & (m.group_size - 1) == 0:
        n, k, bs = m.out_features, m.in_features, m.group_size
        b = g.const(m.packed_codes().numpy().reshape(n, k // bs, bs // 2), base + ".qweight")
        s = g.const(m.scales.float().numpy().reshape(-1), base + ".scales")
        z = g.const(_pack_zero_points(m.zeros), base + ".zeros")
        y = g.op("MatMulNBits", [x, b, s, z], base, domain="com.microsoft", K=k, N=n, bits=4, block_size=bs)
    elif isinstance(m, (torch.nn.Linear, QuantLinear)):
        w = m.dequantize() if isinstance(m, QuantLinear) else m.weight.detach().float()
        y = g.op("MatMul", [x, g.const(w.t().contiguous().numpy(), base + ".weight_t")], base)
    else:
        raise SlimswarmError(f"{base}: a {type(m).__name__} layer has no ONNX export (dense or int4 linears only)")
    if bias is not None:
        y = g.op("Add", [y, g.const(bias.detach().float().numpy(), base + ".bias")])
    return y


def _rms(g: _Graph, x: str, weight: torch.Tensor, eps: float, base: str) -> str:
    sq = g.op("Mul", [x, x])
    ms = g.op("ReduceMean", [sq], axes=[-1], keepdims=1)
    r = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(np.array(eps, np.float32))])])])
    return g.op("Mul", [g.const(weight.detach().float().numpy(), base + ".weight"), g.op("Mul", [x, r])])


def _heads(g: _Graph, x: str, n: int, hd: int) -> str:
    """[B, S, n*hd] → [B, n, S, hd]."""
    return g.op("Transpose", [g.op("Reshape", [x, g.i64(0, 0, n, hd)])], perm=[0, 2, 1, 3])


def _rotate(g: _Graph, x: str, cos: str, sin: str, hd: int) -> str:
    lo, hi = g.op("Split", [x, g.i64(hd // 2, hd // 2)], axis=-1, n_out=2)
    rot = g.op("Concat", [g.op("Neg", [hi]), lo], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])


def build_graph(model, name: str = "slimswarm"):
    """The ONNX ModelProto of ``model`` (our CausalLM) with past/present key-values."""
    from onnx import TensorProto, helper

    from ..compress.quant.linear import QuantEmbedding

    cfg: ModelConfig = model.config
    hd = cfg.head_dim
    g = _Graph()
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])]
    emb = model.model.embed_tokens
    table = emb.rows.dequantize() if isinstance(emb, QuantEmbedding) else emb.weight.detach().float()
    table_name = g.const(table.numpy(), "embed_tokens")
    x = g.op("Gather", [table_name, "input_ids"], axis=0)
    # positions past .. past+seq-1 (past read from layer 0's cache), RoPE as ours: cat(f, f).cos() / .sin()
    past_len = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), g.i64(2)], axis=0)
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.i64(1)], axis=0)
    total = g.op("Add", [past_len, seq_len])
    pos = g.op("Cast", [g.op("Range", [past_len, total, g.i64(1)])], to=TensorProto.FLOAT)
    inv = model.inv_freq.float().numpy()
    freqs = g.op("Mul", [g.op("Unsqueeze", [pos, g.i64(1)]), g.const(inv, "inv_freq")])  # [S, hd/2]
    emb_f = g.op("Concat", [freqs, freqs], axis=-1)
    cos, sin = g.op("Cos", [emb_f]), g.op("Sin", [emb_f])
    # causal mask over [S, past+S]: key j is visible to query i when j <= past + i
    q_pos = g.op("Unsqueeze", [g.op("Range", [past_len, total, g.i64(1)]), g.i64(1)])
    k_pos = g.op("Unsqueeze", [g.op("Range", [g.i64(0), total, g.i64(1)]), g.i64(0)])
    neg = g.const(np.array(np.finfo(np.float32).min, np.float32))
    mask = g.op("Where", [g.op("Greater", [k_pos, q_pos]), neg, g.const(np.array(0.0, np.float32))])
    scale = g.const(np.array(1.0 / np.sqrt(hd), np.float32))
    for i, layer in enumerate(model.model.layers):
        nh, nkv = cfg.heads(i), cfg.kv_heads(i)
        pre = f"model.layers.{i}"
        for kind in ("key", "value"):
            shape = ["batch", nkv, "past", hd]
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         ["batch", nkv, "total", hd]))
        a = layer.self_attn
        h = _rms(g, x, layer.input_layernorm.weight, cfg.rms_norm_eps, pre + ".input_layernorm")
        q = _rotate(g, _heads(g, _linear(g, h, a.q_proj, pre + ".q_proj"), nh, hd), cos, sin, hd)
        k = _rotate(g, _heads(g, _linear(g, h, a.k_proj, pre + ".k_proj"), nkv, hd), cos, sin, hd)
        v = _heads(g, _linear(g, h, a.v_proj, pre + ".v_proj"), nkv, hd)
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], axis=2))
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"], axis=2))
        k, v = f"present.{i}.key", f"present.{i}.value"
        if nh != nkv:  # grouped-query attention: each kv head serves nh/nkv query heads
            rep = g.i64(1, 1, nh // nkv, 1, 1)
            k = g.op("Reshape", [g.op("Tile", [g.op("Unsqueeze", [k, g.i64(2)]), rep]), g.i64(0, nh, -1, hd)])
            v = g.op("Reshape", [g.op("Tile", [g.op("Unsqueeze", [v, g.i64(2)]), rep]), g.i64(0, nh, -1, hd)])
        att = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale]), mask])
        y = g.op("MatMul", [g.op("Softmax", [att], axis=-1), v])
        y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.i64(0, 0, nh * hd)])
        x = g.op("Add", [x, _linear(g, y, a.o_proj, pre + ".o_proj")])
        mlp = layer.mlp
        h = _rms(g, x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps, pre + ".post_attention_layernorm")
        gate = _linear(g, h, mlp.gate_proj, pre + ".gate_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        x = g.op("Add", [x, _linear(g, g.op("Mul", [act, _linear(g, h, mlp.up_proj, pre + ".up_proj")]),
                                     mlp.down_proj, pre + ".down_proj")])
    x = _rms(g, x, model.model.norm.weight, cfg.rms_norm_eps, "model.norm")
    head = model.lm_head
    if isinstance(head, torch.nn.Linear) and head.weight is getattr(emb, "weight", None):  # tied: one table
        flat = g.op("Reshape", [x, g.i64(-1, cfg.hidden_size)])
        y = g.op("Gemm", [flat, table_name], transB=1)
        shape = g.op("Concat", [g.op("Shape", ["input_ids"]), g.i64(cfg.vocab_size)], axis=0)
        g.nodes.append(helper.make_node("Reshape", [y, shape], ["logits"]))
    else:
        g.nodes.append(helper.make_node("Identity", [_linear(g, x, head, "lm_head")], ["logits"]))
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="slimswarm")


def export_onnx(model, tokenizer, out: str | Path, overwrite: bool = False) -> dict:
    """Write ``out/`` = model.onnx (+ model.onnx.data for the weights) + tokenizer files + config.json, atomically."""
    import onnx

    from ..models.tokenizer import HFTokenizer, SentencePieceTokenizer

    out = Path(out)
    if out.exists() and not overwrite:
        raise SlimswarmError(f"{out}: output exists (pass --overwrite to replace it)")
    proto = build_graph(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        onnx.save_model(proto, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=MODEL_FILE + ".data", size_threshold=1024)
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.hf.save_pretrained(str(tmp))
        elif isinstance(tokenizer, SentencePieceTokenizer):
            shutil.copy(tokenizer.path, tmp / "tokenizer.model")
        cfg = model.config
        io = {"num_hidden_layers": cfg.num_hidden_layers, "head_dim": cfg.head_dim,
              "kv_heads": [cfg.kv_heads(i) for i in range(cfg.num_hidden_layers)],
              "bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.eos_ids)}
        (tmp / "slimswarm-onnx.json").write_text(json.dumps(io, indent=2))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    nbytes = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith(MODEL_FILE))
    return {"path": str(out), "bytes": nbytes,
            "matmulnbits": sum(1 for n in proto.graph.node if n.op_type == "MatMulNBits"),
            "summary": f"{out}: {MODEL_FILE} + weights {nbytes:,} bytes, "
                       f"{sum(1 for n in proto.graph.node if n.op_type == 'MatMulNBits')} MatMulNBits linears"}
