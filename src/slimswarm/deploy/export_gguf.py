"""deploy/: a checkpoint (ours or any loadable one) → one GGUF file that llama.cpp runs alone (weights, config, tokenizer).

Tensor names and keys follow llama.cpp's loader (src/models/llama.cpp, qwen2.cpp, deci.cpp; llama-arch.cpp):

* ``llama`` (Llama, Mistral, SmolLM) rotates consecutive pairs (Meta's interleaved RoPE), so q/k rows are
  permuted from Hugging Face's half split with ``permute_rope`` (the exact inverse of ``models.gguf.unpermute_rope``);
  ``qwen2`` rotates halves (NEOX) and keeps Hugging Face's order.
* structured-pruned models (per-layer heads / MLP widths): llama.cpp reads ``head_count``, ``head_count_kv`` and
  ``feed_forward_length`` as per-layer arrays for every arch, but its ``llama`` and ``qwen2`` builders size every
  layer's tensors from layer 0. Its ``deci`` arch (Llama blocks with per-layer sizes) sizes each layer from the
  arrays, so a pruned Llama is written as ``deci``; a pruned model with q/k/v biases (Qwen2) is refused.

Weights: float as F32/F16/BF16; our int4/int8 groups of 32 with the same codes (``gguf_blocks``); everything
else de-quantized exactly and re-quantized to ``--gguf-type`` or the nearest GGML type, with the added error
reported as KL to our model on a short text (``ExportReport``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import SlimswarmError
from ..models.llama import ModelConfig, rope_inv_freq
from . import gguf_blocks as gb
from .gguf_vocab import vocab_fields

GGUF_TYPES = gb.FLOAT_TYPES + gb.REQUANT_TYPES
_LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's half-split q/k rows → the interleaved-pair order llama.cpp's ``llama`` arch rotates."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class ExportReport:
    path: str
    arch: str
    bytes: int
    tensors: dict[str, int] = field(default_factory=dict)  # GGML type → how many tensors
    same_codes: list[str] = field(default_factory=list)  # quantized tensors written with our codes and scales
    changed: list[str] = field(default_factory=list)  # tensors whose written weight is not bit-equal to ours
    q4_1_offset_max_abs: float = 0.0  # largest |fp16(-z s) - (-z s)| over Q4_1 blocks
    weight_max_abs_diff: float = 0.0  # largest |written weight - our weight| over all tensors
    kl: dict | None = None  # KL(ours || exported) on a short text, when anything is not bit-exact

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.tensors.items()))
        s = (f"{self.path}: {self.bytes:,} bytes, arch {self.arch}, tensors {kinds}; "
             f"{len(self.same_codes)} with our codes, {len(self.changed)} not bit-equal to ours; "
             f"max |dw| {self.weight_max_abs_diff:.3g}")
        if self.q4_1_offset_max_abs:
            s += f" (Q4_1 offsets to fp16: max {self.q4_1_offset_max_abs:.3g})"
        if self.kl is not None:
            s += f"; KL to ours {self.kl['kl']:.2e} nats/token, top-1 agreement {self.kl['top1_agreement']:.4f} " \
                 f"on {self.kl['tokens']} tokens"
        return s


def check_out_path(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise SlimswarmError(f"{out}: output exists (pass --overwrite to replace it)")


def gguf_arch(cfg: ModelConfig) -> str:
    """llama / qwen2, or deci for per-layer sizes; a one-line refusal naming the layer where none fits."""
    base = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}.get(cfg.model_type)
    if base is None:
        raise SlimswarmError(f"model_type {cfg.model_type!r}: no GGUF writer (llama, mistral, qwen2)")
    n = cfg.num_hidden_layers
    heads = [cfg.heads(i) for i in range(n)]
    kv = [cfg.kv_heads(i) for i in range(n)]
    ff = [cfg.intermediate(i) for i in range(n)]
    uneven = next((i for i in range(n) if (heads[i], kv[i], ff[i]) != (heads[0], kv[0], ff[0])), None)
    if uneven is None:
        return base
    if base != "llama" or cfg.qkv_bias:
        raise SlimswarmError(f"layer {uneven}: {heads[uneven]} heads / {kv[uneven]} kv heads / {ff[uneven]} MLP "
                             f"channels differ from layer 0 ({heads[0]}/{kv[0]}/{ff[0]}), and llama.cpp's {base} "
                             "arch sizes every layer like layer 0 (only its bias-free deci arch has per-layer sizes)")
    bad = next((i for i in range(n) if kv[i] == 0 or ff[i] == 0), None)
    if bad is not None:
        raise SlimswarmError(f"layer {bad}: no attention heads or MLP channels left; llama.cpp's deci arch "
                             "reads that as a different block type")
    return "deci"


def _float_kind(dtype: torch.dtype, want: str | None) -> str:
    return want or ("BF16" if dtype == torch.bfloat16 else "F16" if dtype == torch.float16 else "F32")


def _linear_parts(m: torch.nn.Module, name: str):
    """('float', weight) or ('quant', QuantLinear) for one linear; a refusal for layouts GGUF cannot hold."""
    from ..compress.quant.linear import QuantLinear

    if isinstance(m, QuantLinear):
        return "quant", m
    if isinstance(m, torch.nn.Linear):
        return "float", m.weight.detach()
    raise SlimswarmError(f"{name}: a {type(m).__name__} layer has no GGUF tensor type "
                         "(GGUF holds dense float or block-quantized weights; densify or re-compress it)")


class _Writer:
    """Collects (name, bytes, GGML type) and the float weight each one stands for (for the error report)."""

    def __init__(self, report: ExportReport, want: str | None):
        self.report, self.want = report, want
        self.tensors: list[tuple[str, np.ndarray, str]] = []
        self.written: dict[str, torch.Tensor] = {}  # HF name → the weight llama.cpp will see (our row order)

    def _add(self, gname: str, data: np.ndarray, kind: str) -> None:
        self.tensors.append((gname, data, kind))
        self.report.tensors[kind] = self.report.tensors.get(kind, 0) + 1

    def vector(self, gname: str, hf: str, v: torch.Tensor, perm=None) -> None:
        v = v.detach().float()
        self.written[hf] = v
        self._add(gname, (v if perm is None else perm(v)).contiguous().numpy(), "F32")

    def matrix(self, gname: str, hf: str, parts, perm=None) -> None:
        """One 2-D weight, rows possibly permuted (``perm`` acts on rows, so groups stay whole)."""
        p = perm or (lambda t: t)
        kind, obj = parts
        if kind == "quant":
            from ..compress.quant.rtn import dequantize

            codes, scales, zeros = obj.codes(), obj.scales, obj.zeros
            ours = dequantize(codes, scales, zeros)
            exact = gb.exact_type(obj.bits, obj.group_size, zeros)
            if exact is not None and self.want in (None, exact):
                data = gb.encode_exact(exact, p(codes), p(scales), p(zeros))
                self.report.same_codes.append(gname)
                if exact == "Q4_1":
                    m = gb.q4_1_offsets(scales, zeros).float()
                    self.report.q4_1_offset_max_abs = max(self.report.q4_1_offset_max_abs,
                                                          float((m + zeros.float() * scales.float()).abs().max()))
                self._add(gname, data, exact)
                self._record(hf, gname, data, exact, p, ours)
                return
            w, target = ours, self.want or gb.nearest_type(obj.bits)
        else:
            w, target = obj.float(), _float_kind(obj.dtype, self.want)
        if target not in gb.FLOAT_TYPES and w.shape[1] % gb.BLOCK:
            target = "F32"  # GGML blocks are 32 wide; llama.cpp's own quantizer falls back the same way
        data = gb.requantize(p(w), target)
        self._add(gname, data, target)
        self._record(hf, gname, data, target, p, w)

    def _record(self, hf: str, gname: str, data: np.ndarray, kind: str, perm, ours: torch.Tensor) -> None:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        back = torch.from_numpy(np.array(dequantize(data, GGMLQuantizationType[kind]), dtype=np.float32))
        back = back.reshape(ours.shape)
        inv = torch.argsort(perm(torch.arange(ours.shape[0]))) if perm is not None else None
        back = back[inv] if inv is not None else back
        self.written[hf] = back
        if not torch.equal(back, ours.float()):
            self.report.changed.append(gname)
        self.report.weight_max_abs_diff = max(self.report.weight_max_abs_diff,
                                              float((back - ours.float()).abs().max()))


def _collect(model, cfg: ModelConfig, arch: str, wr: _Writer) -> None:
    from ..compress.quant.linear import QuantEmbedding

    emb = model.model.embed_tokens
    head_tied = cfg.tie_word_embeddings
    if isinstance(emb, QuantEmbedding):
        wr.matrix("token_embd.weight", "model.embed_tokens.weight", ("quant", emb.rows))
        head_tied = emb.shared
    else:
        wr.matrix("token_embd.weight", "model.embed_tokens.weight", ("float", emb.weight.detach()))
    if not head_tied:
        wr.matrix("output.weight", "lm_head.weight", _linear_parts(model.lm_head, "lm_head"))
    wr.vector("output_norm.weight", "model.norm.weight", model.model.norm.weight)
    rope_perm = arch in ("llama", "deci")
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}"
        for hf, short in _NORMS.items():
            wr.vector(f"blk.{i}.{short}.weight", f"{pre}.{hf}.weight", layer.get_submodule(hf).weight)
        for hf, short in _LINEARS.items():
            m = layer.get_submodule(hf)
            perm = None
            if rope_perm and short in ("attn_q", "attn_k"):
                n = cfg.heads(i) if short == "attn_q" else cfg.kv_heads(i)
                perm = lambda t, n=n: permute_rope(t, n)  # noqa: E731
            wr.matrix(f"blk.{i}.{short}.weight", f"{pre}.{hf}.weight", _linear_parts(m, f"{pre}.{hf}"), perm)
            bias = getattr(m, "bias", None)
            if bias is not None:
                wr.vector(f"blk.{i}.{short}.bias", f"{pre}.{hf}.bias", bias, perm)


def _hparams(w, cfg: ModelConfig, arch: str, name: str) -> None:
    from gguf import RopeScalingType

    n = cfg.num_hidden_layers
    w.add_name(name)
    w.add_type("model")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n)
    if arch == "deci":
        w.add_feed_forward_length([cfg.intermediate(i) for i in range(n)])
        w.add_head_count([cfg.heads(i) for i in range(n)])
        w.add_head_count_kv([cfg.kv_heads(i) for i in range(n)])
    else:
        w.add_feed_forward_length(cfg.intermediate(0))
        w.add_head_count(cfg.heads(0))
        w.add_head_count_kv(cfg.kv_heads(0))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type") == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(sc["factor"]))


def _rope_freqs(cfg: ModelConfig) -> np.ndarray | None:
    """Llama 3 RoPE scaling: llama.cpp divides each frequency by a factor from the ``rope_freqs`` tensor."""
    if (cfg.rope_scaling or {}).get("rope_type") != "llama3":
        return None
    plain = ModelConfig(**{**cfg.as_dict(), "rope_scaling": None})
    return (rope_inv_freq(plain).double() / rope_inv_freq(cfg).double()).float().numpy()


def _add_field(w, key: str, v) -> None:
    if isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_uint32(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    elif isinstance(v, str):
        w.add_string(key, v)
    else:
        w.add_array(key, list(v))


def write_gguf(path: Path, arch: str, add_meta, fields: dict, tensors: list[tuple[str, np.ndarray, str]],
               file_type: int | None = None) -> None:
    """Write a GGUF atomically: a temporary name in the same folder, renamed at the end."""
    from gguf import GGMLQuantizationType, GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        w = GGUFWriter(str(tmp), arch)
        add_meta(w)
        if file_type is not None:
            w.add_file_type(file_type)
        w.add_quantization_version(2)
        for k, v in fields.items():
            _add_field(w, k, v)
        for name, data, kind in tensors:
            qt = GGMLQuantizationType[kind]
            if kind in ("F32", "F16"):
                w.add_tensor(name, data)
            else:
                w.add_tensor(name, data, raw_dtype=qt)  # data: the block bytes [rows, bytes a row]
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _main_type(tensors) -> str:
    """The GGML type holding most of the block weights (general.file_type)."""
    big = {}
    for name, data, kind in tensors:
        if name.startswith("blk.") and data.ndim == 2:
            big[kind] = big.get(kind, 0) + data.nbytes
    return max(big, key=big.get) if big else "F32"


def export_gguf(model, tokenizer, out: str | Path, gguf_type: str | None = None, overwrite: bool = False,
                name: str = "slimswarm export", kl_text: str | None = None) -> ExportReport:
    """Write ``model`` (our CausalLM, float or quantized) and its tokenizer as one GGUF; return what was written."""
    out = Path(out)
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise SlimswarmError(f"--gguf-type {gguf_type!r}: not one of {', '.join(GGUF_TYPES)}")
    check_out_path(out, overwrite)
    cfg: ModelConfig = model.config
    arch = gguf_arch(cfg)
    report = ExportReport(str(out), arch, 0)
    wr = _Writer(report, gguf_type)
    _collect(model, cfg, arch, wr)
    freqs = _rope_freqs(cfg)
    if freqs is not None:
        wr._add("rope_freqs.weight", freqs, "F32")
    fields = vocab_fields(tokenizer, cfg.vocab_size)
    main = _main_type(wr.tensors)
    write_gguf(out, arch, lambda w: _hparams(w, cfg, arch, name), fields, wr.tensors, _FILE_TYPE.get(main))
    report.bytes = out.stat().st_size
    if report.changed and kl_text:
        report.kl = written_kl(model, wr.written, tokenizer, kl_text)
    return report


def written_kl(model, written: dict[str, torch.Tensor], tokenizer, text: str, tokens: int = 512) -> dict:
    """KL(our model || a float model holding exactly the weights written to the GGUF) on ``tokens`` of ``text``."""
    from ..evaluate.kl import kl_divergence
    from ..models.load import build_model

    sd = dict(written)
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    cfg = ModelConfig(**{**model.config.as_dict(), "tie_word_embeddings": "lm_head.weight" not in written})
    twin = build_model(cfg, sd, "gguf export")
    return kl_divergence(model, twin, tokenizer, text, window=256, max_tokens=tokens, batch_size=4)
