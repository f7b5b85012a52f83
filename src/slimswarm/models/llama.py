"""Our Llama-family decoder (Llama 2/3, Qwen2, Mistral, SmolLM): batched prefill and decode on a preallocated KV cache.

Module names mirror Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj`` ...), so a
Hugging Face state dict loads as it is and our checkpoints stay readable by other tools.

Every row of a batch carries two numbers: ``start`` (the cache slot its first new token is written to)
and ``pad`` (how many leading cache slots of that row are padding). A left-padded batch has one
``start`` and per-row ``pad``; a continuous batch has per-row ``start``. RoPE positions are
``slot - pad`` and attention sees slots ``pad <= j <= slot``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import native
from ..errors import SlimswarmError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    model_type: str = "llama"
    # Per decoder layer sizes after structured pruning (None: every layer has the sizes above). Query heads of
    # layer i = layer_kv_heads[i] * (num_attention_heads // num_key_value_heads).
    layer_kv_heads: list[int] | None = None
    layer_intermediate: list[int] | None = None

    def __post_init__(self) -> None:
        self._check_types()
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise SlimswarmError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        for name in ("layer_kv_heads", "layer_intermediate"):
            v = getattr(self, name)
            if v is not None and len(v) != self.num_hidden_layers:
                raise SlimswarmError(f"{name} has {len(v)} entries for {self.num_hidden_layers} layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SlimswarmError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    def _check_types(self) -> None:
        """Every field of the type and range it needs: configs come from files, and files lie."""
        def bad(name, want):
            raise SlimswarmError(f"config field {name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if not is_int(self.head_dim) or self.head_dim < 0:
            bad("head_dim", "an integer >= 0")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                bad(name, "a positive finite number")
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        if self.bos_token_id is not None and not is_int(self.bos_token_id):
            bad("bos_token_id", "an integer or null")
        if not isinstance(self.eos_token_id, list) or not all(is_int(t) for t in self.eos_token_id):
            bad("eos_token_id", "a list of integers")
        if not isinstance(self.model_type, str):
            bad("model_type", "a string")
        for name in ("layer_kv_heads", "layer_intermediate"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, list) or not all(is_int(x) and x >= 0 for x in v)):
                bad(name, "a list of integers >= 0 or null")
        s = self.rope_scaling
        if s is not None:
            keys = {"linear": ("factor",),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
            need = keys.get(s.get("rope_type")) if isinstance(s, dict) else None
            if need is None or not all(isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool)
                                       and 0 < s[k] < math.inf for k in need):
                bad("rope_scaling", "null, {rope_type: linear, factor} or {rope_type: llama3, factor, "
                    "low_freq_factor, high_freq_factor, original_max_position_embeddings} with positive numbers")
            if s["rope_type"] == "llama3" and s["low_freq_factor"] == s["high_freq_factor"]:
                bad("rope_scaling", "llama3 scaling with low_freq_factor != high_freq_factor")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x field names)."""
        if not isinstance(cfg, dict):
            raise SlimswarmError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        for name in ("rope_parameters", "rope_scaling"):
            if cfg.get(name) is not None and not isinstance(cfg[name], dict):
                raise SlimswarmError(f"{source}: {name} must be an object, got {cfg[name]!r}")
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type", "")
        if not isinstance(archs, list) or not isinstance(model_type, str):
            raise SlimswarmError(f"{source}: architectures must be a list and model_type a string")
        known = [SUPPORTED_ARCHITECTURES[a] for a in archs if isinstance(a, str) and a in SUPPORTED_ARCHITECTURES]
        if not known and model_type not in SUPPORTED_ARCHITECTURES.values():
            name = archs[0] if archs else model_type or "unknown"
            raise SlimswarmError(
                f"{source}: unsupported architecture {name!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        model_type = known[0] if known else model_type
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or None
        if scaling:
            rope.update(scaling)
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise SlimswarmError(f"{source}: unsupported rope_type {rope_type!r} (default, llama3, linear)")
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else eos)  # anything else: refused below
        if isinstance(theta, (int, float)) and not isinstance(theta, bool):
            theta = float(theta)
        try:
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=cfg["num_attention_heads"],
                num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                head_dim=cfg.get("head_dim") or 0,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=theta,
                rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                o_bias=bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos,
                model_type=model_type,
            )
        except KeyError as e:
            raise SlimswarmError(f"{source}: missing field {e.args[0]!r}") from None
        except SlimswarmError as e:
            raise SlimswarmError(f"{source}: {e}") from None

    def kv_heads(self, i: int) -> int:
        return self.layer_kv_heads[i] if self.layer_kv_heads is not None else self.num_key_value_heads

    def heads(self, i: int) -> int:
        return self.kv_heads(i) * (self.num_attention_heads // self.num_key_value_heads)

    def intermediate(self, i: int) -> int:
        return self.layer_intermediate[i] if self.layer_intermediate is not None else self.intermediate_size

    @property
    def uniform(self) -> bool:
        """Every layer has the same sizes (what a transformers config can express)."""
        return all(self.kv_heads(i) == self.num_key_value_heads and self.intermediate(i) == self.intermediate_size
                   for i in range(self.num_hidden_layers))

    def to_hf(self) -> dict[str, Any]:
        """A transformers-compatible config dict (used for parity checks and checkpoints)."""
        if not self.uniform:
            raise SlimswarmError("layers have different sizes after structured pruning: "
                                 "transformers' Llama config cannot describe this model")
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.model_type]
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        d = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id,
            "hidden_act": "silu",
        }
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        return d

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama 3 / linear scaling applied where the config asks for it."""
    d = cfg.head_dim
    # On the CPU even inside ``with torch.device("meta")`` (the shape check's skeleton): arange on the meta
    # device runs torch's Python meta kernels, whose first use imports sympy and torch._dynamo (+70 MB RSS).
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    s = cfg.rope_scaling
    if not s:
        return inv
    factor = float(s["factor"])
    if s["rope_type"] == "linear":
        return inv / factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Linear(nn.Linear):
    """``nn.Linear`` that sends small-batch CPU inference (decode) to our row-streaming kernel.

    MKL's gemv reads weights at ~10 GB/s on our 2-core target; the kernel reaches ~30 GB/s (see
    benchmarks/results/gemv_kernels.md). Training, large batches and other devices use ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        m = x.numel() // x.shape[-1] if x.numel() else 0
        if (
            0 < m <= kernels.MAX_M
            and x.device.type == "cpu"
            and type(w) in (torch.Tensor, nn.Parameter)  # not a tensor subclass (torchao, DTensor)
            and w.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            and w.is_contiguous()
            and kernels.available()
        ):
            x2 = x.reshape(m, x.shape[-1]).float().contiguous()
            b = None if self.bias is None else self.bias.float().contiguous()
            y = kernels.linear_float(x2, w, b)
            return y.view(*x.shape[:-1], w.shape[0]).to(x.dtype)
        return F.linear(x, w, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


KV_DTYPES = ("fp32", "bf16", "fp16", "int8")
PREFILL_CHUNK = 256  # prompt tokens per forward of a cached, last-position prefill on the Python path
_KV_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def kv_kind(dtype: "torch.dtype | str") -> str:
    """The cache storage name for a torch dtype or a name (fp32, bf16, fp16, int8); ValueError naming the value."""
    if isinstance(dtype, str):
        if dtype not in KV_DTYPES:
            raise ValueError(f"KV cache dtype {dtype!r}: use one of {', '.join(KV_DTYPES)}")
        return dtype
    for k, t in _KV_TORCH.items():
        if t == dtype:
            return k
    raise ValueError(f"KV cache dtype {dtype}: use one of {', '.join(KV_DTYPES)}")


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and fp32 scales of K or V [..., head_dim]: one scale per (row, head, slot), absmax / 127
    (a zero vector gets scale 1). Round half to even, the same rule as the native step's lrintf."""
    xf = x.float()
    s = xf.abs().amax(-1) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(xf / s[..., None]).clamp_(-127, 127).to(torch.int8), s


class KVCache(nn.Module):
    """K and V of ``batch`` rows, [rows, kv_heads, slots, head_dim], stored as fp32, bf16, fp16 or int8 codes with
    an fp32 scale per (row, head, slot) in ``ks``/``vs`` [rows, kv_heads, slots]. ``read`` returns floats."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype: "torch.dtype | str", device):
        super().__init__()
        self.kind = kv_kind(dtype)
        shape = (batch, n_kv, max_len, head_dim)
        store = torch.int8 if self.kind == "int8" else _KV_TORCH[self.kind]
        self.register_buffer("k", torch.zeros(shape, dtype=store, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=store, device=device), persistent=False)
        if self.kind == "int8":
            self.register_buffer("ks", torch.ones(shape[:3], dtype=torch.float32, device=device), persistent=False)
            self.register_buffer("vs", torch.ones(shape[:3], dtype=torch.float32, device=device), persistent=False)
        else:
            self.ks = self.vs = None

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed [row, head, slot, ...]: what a row move or a prefix block copies."""
        return [self.k, self.v] if self.ks is None else [self.k, self.v, self.ks, self.vs]

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor, row0: int = 0) -> None:
        """Write k, v [B, kv, T, hd] into cache rows row0..row0+B-1 at slots start..start+T-1."""
        b, t = k.shape[0], k.shape[2]
        if self.ks is not None:
            (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
            parts = [(self.k, k), (self.v, v), (self.ks, ks), (self.vs, vs)]
        else:
            parts = [(self.k, k), (self.v, v)]
        if isinstance(start, int):
            for dst, src in parts:
                dst[row0 : row0 + b, :, start : start + t] = src
        else:  # per-row slots: rows of a continuous batch sit at different positions
            rows = row0 + torch.arange(b, device=k.device)[:, None]
            slots = start[:, None] + torch.arange(t, device=k.device)
            for dst, src in parts:
                dst[rows, :, slots] = src.transpose(1, 2).to(dst.dtype)

    def read(self, row0: int, b: int, kv_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [b, kv, kv_len, hd] of rows row0.. as ``dtype`` (a view when the storage already is ``dtype``)."""
        k, v = self.k[row0 : row0 + b, :, :kv_len], self.v[row0 : row0 + b, :, :kv_len]
        if self.ks is not None:
            k = k.to(torch.float32) * self.ks[row0 : row0 + b, :, :kv_len, None]
            v = v.to(torch.float32) * self.vs[row0 : row0 + b, :, :kv_len, None]
        return k.to(dtype), v.to(dtype)

    def bytes_per_slot(self) -> int:
        """Bytes one token occupies in this layer's cache (K and V, scales included)."""
        return sum(t[0, :, 0].numel() * t.element_size() for t in self.slot_tensors())


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int = 0):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.heads(i), cfg.kv_heads(i), cfg.head_dim
        h, q, kv = cfg.hidden_size, self.n_heads * cfg.head_dim, self.n_kv * cfg.head_dim
        self.q_proj = Linear(h, q, bias=cfg.qkv_bias)
        self.k_proj = Linear(h, kv, bias=cfg.qkv_bias)
        self.v_proj = Linear(h, kv, bias=cfg.qkv_bias)
        self.o_proj = Linear(q, h, bias=cfg.o_bias)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, start, mask, kv_len: int, row0: int = 0):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.cache is not None:
            self.cache.write(k, v, start, row0)
            k, v = self.cache.read(row0, b, kv_len, q.dtype)
        gqa = self.n_heads != self.n_kv
        if t == 1:
            # One query per row (decode): plain matmuls over [B, kv, group, S] beat the SDPA kernel's setup cost.
            g = self.n_heads // self.n_kv
            qg = q.view(b, self.n_kv, g, self.head_dim)
            att = torch.matmul(qg, k.transpose(-1, -2)) * (self.head_dim**-0.5)
            if mask is not None:
                att = att.masked_fill(~mask.view(b, 1, 1, -1), float("-inf"))
            y = torch.matmul(torch.softmax(att.float(), -1).to(v.dtype), v)
            return self.o_proj(y.reshape(b, 1, -1))
        if mask is None:
            # No padding: plain causal attention (prefill from slot 0) or a single query seeing all slots.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int = 0):
        super().__init__()
        n = cfg.intermediate(i)
        self.gate_proj = Linear(cfg.hidden_size, n, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, n, bias=cfg.mlp_bias)
        self.down_proj = Linear(n, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int = 0):
        super().__init__()
        self.self_attn = Attention(cfg, i)
        self.mlp = MLP(cfg, i)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, start, mask, kv_len, row0: int = 0):
        if self.self_attn.n_heads:  # structured pruning may remove every head (or channel) of a layer
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, mask, kv_len, row0)
        if self.mlp.down_proj.in_features:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """A Llama-family causal LM. ``forward(tokens, start, pad)`` returns logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg).float(), persistent=False)
        self.cache_batch = 0
        self.cache_len = 0
        self.kv_dtype: str | None = None  # KV cache storage for new caches (fp32, bf16, fp16, int8); None: activations'

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: that of the float weights (norms), whatever the linears are stored as."""
        return self.model.norm.weight.dtype

    # -- cache ---------------------------------------------------------------------------------
    def kv_storage(self, dtype: "torch.dtype | str | None" = None) -> str:
        """The KV cache storage a new cache gets: ``dtype``, else ``self.kv_dtype`` (set by users: fp32, bf16,
        fp16, int8), else the activation dtype."""
        return kv_kind(dtype or getattr(self, "kv_dtype", None) or self.dtype)

    def setup_cache(self, batch: int, max_len: int, dtype: "torch.dtype | str | None" = None) -> None:
        """Preallocate a KV cache for ``batch`` rows of ``max_len`` slots (reused when it already fits)."""
        dtype = self.kv_storage(dtype)
        if batch <= self.cache_batch and max_len <= self.cache_len:
            first = self.model.layers[0].self_attn.cache
            if first is not None and first.kind == dtype:
                return
        from .heap import release_freed_memory

        # The old caches go first, so the new ones can take their memory (replaced layer by layer, each old cache
        # left a hole too small for its successor: bench's three cache sizes held ~40 MB of such holes).
        self.clear_cache()
        release_freed_memory()
        # Normal (not inference-mode) tensors, so the cache works both inside and outside inference_mode.
        with torch.inference_mode(False), torch.no_grad():
            for layer in self.model.layers:
                a = layer.self_attn
                a.cache = KVCache(batch, a.n_kv, max_len, a.head_dim, dtype, self.device)
        self.cache_batch, self.cache_len = batch, max_len

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None
        self.cache_batch = self.cache_len = 0

    def rope(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B,1,T,head_dim] for positions [B,T]."""
        freqs = pos.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        start: int | torch.Tensor = 0,
        pad: torch.Tensor | None = None,
        last_only: bool = False,
        hidden_only: bool = False,
        row0: int = 0,
    ) -> torch.Tensor:
        """Logits for ``tokens`` [B, T] written at cache slots ``start..start+T-1``.

        ``pad`` [B]: leading padded slots per row (left padding). Without a cache (``setup_cache``
        not called) this is a plain full-sequence forward. ``last_only`` computes the logits of the
        last position only, which is what generation needs. ``row0``: the batch occupies cache rows
        row0..row0+B-1 (the engine prefills one new sequence into a free row this way).
        """
        b, t = tokens.shape
        dev = tokens.device
        cached = self.model.layers[0].self_attn.cache is not None
        if not cached and not (isinstance(start, int) and start == 0):
            raise ValueError("start > 0 needs a KV cache: call setup_cache first")
        per_row = not isinstance(start, int)
        slots = (start[:, None] if per_row else start) + torch.arange(t, device=dev)  # [B,T] or [T]
        kv_len = (int(start.max()) if per_row else start) + t
        if cached and kv_len > self.cache_len:
            raise ValueError(f"sequence needs {kv_len} cache slots, cache has {self.cache_len}")
        if cached and row0 + b > self.cache_batch:
            raise ValueError(f"rows {row0}..{row0 + b - 1} outside the cache's {self.cache_batch} rows")
        slots = slots.expand(b, t) if slots.dim() == 1 else slots
        if t == 1 and cached and not hidden_only and b <= native.MAX_M_FAST and not torch.is_grad_enabled():
            step = native.step_for_rows(self, b)  # one C call for the whole decoder (kernels/decode.c), or None
            if step is not None:
                return step.decode(self, tokens[:, 0], slots[:, 0], pad, row0)[:, None].to(self.dtype)
        if t > 1 and cached and last_only and not hidden_only and not torch.is_grad_enabled():
            step = native.prefill_step(self)  # the prompt through the same C step, 32 positions a call
            if step is not None:
                got = self._native_prefill(step, tokens, start, pad, row0)
                if got is not None:
                    return got
        if t > PREFILL_CHUNK and cached and last_only and not hidden_only and not torch.is_grad_enabled():
            # a long prompt in pieces: each piece's activations (and attention scores, [heads, piece, kv_len]) are
            # what a forward holds, not the whole prompt's (bench's 512 fp32 tokens: ~20 MB less at the peak)
            for c0 in range(0, t, PREFILL_CHUNK):
                out = self.forward(tokens[:, c0:c0 + PREFILL_CHUNK], start + c0, pad, last_only=True, row0=row0)
            return out
        pos = slots if pad is None else (slots - pad[:, None]).clamp_min(0)
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rope(pos, x.dtype)

        mask = None
        if pad is not None or per_row or (t > 1 and cached and kv_len != t):
            j = torch.arange(kv_len, device=dev)
            mask = j[None, None, :] <= slots[:, :, None]  # causal [B,T,S]
            if pad is not None:
                mask = mask & (j[None, None, :] >= pad[:, None, None])
                # A padded query sees only itself: keeps its (ignored) state finite, so no NaN leaks
                # into other rows' values through 0 * NaN.
                mask = mask | (j[None, None, :] == slots[:, :, None])
            mask = mask[:, None]
        for layer in self.model.layers:
            x = layer(x, cos, sin, start, mask, kv_len, row0)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        if hidden_only:
            return x
        return self.lm_head(x)

    def _native_prefill(self, step, tokens, start, pad, row0: int) -> torch.Tensor | None:
        """Last-position logits [B, 1, vocab] of a prefill through ``step.prefill_rows`` (the rows' positions packed
        into shared calls; padded slots are not written: no query attends to them); None (the Python path) when a
        row is all padding."""
        b, t = tokens.shape
        lslots = step.lora_slots(b)
        rows = []
        for i in range(b):
            s = int(start[i]) if isinstance(start, torch.Tensor) else int(start)
            p = int(pad[i]) if pad is not None else 0
            skip = max(0, p - s)
            if skip >= t:
                return None
            rows.append((s + skip, p, skip))
        out = torch.empty((b, 1, self.config.vocab_size), dtype=torch.float32)
        step.prefill_rows(self, [tokens[i, skip:] for i, (_, _, skip) in enumerate(rows)], [s for s, _, _ in rows],
                          [p for _, p, _ in rows] if pad is not None else None, [row0 + i for i in range(b)], lslots,
                          out=out.view(b, -1))
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    # -- bookkeeping ---------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
