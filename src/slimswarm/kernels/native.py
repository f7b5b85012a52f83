"""The native decode step (kernels/decode.c): one C call per decode step for the whole decoder, built per ISA at first use.

``step_for(model)`` returns a ``NativeStep`` for a Llama-family ``CausalLM`` (read structurally: this layer sits
below models/ and compress/) or None, after printing one warning line that names why (no compiler, no AVX2, a
format or shape it cannot run). ``SLIMSWARM_NATIVE=0`` turns it off silently; ``SLIMSWARM_ISA`` forces a build
(avx2, avxvnni, avx512vnni); ``SLIMSWARM_NATIVE_ACT=int8`` (or ``set_act_int8``) quantizes matmul inputs to int8
per row for the quantized layers (a different model: see benchmarks/results/native_decode.md for its cost).

What it reads, without copies: float weights (fp32/bf16) where the model keeps them, the quantized layers' codes and
fp32 scale/zero caches (``QuantLinear.native_weight``), the adapter bank's stacked A/B and per-row slots
(``MultiLoRALinear``), and the KV cache tensors the model has installed (fp32, bf16, fp16, or int8 codes with a scale per head and slot; [rows, kv, slots, hd]).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn

MAX_M = 8  # rows of x a call context holds until a call needs more (NativeStep._context)
MAX_M_FAST = 32  # decode rows one call takes at most (8 at a time through each matmul: KM); prefill positions
_SRC = Path(__file__).with_name("decode.c")
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avxvnni": ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"],
    "avx512vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
}
_FMT = {torch.float32: 0, torch.bfloat16: 1, "q8": 2, "q4": 3}
_CACHE_DT = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3}

_libs: dict[str, ctypes.CDLL | str] = {}
_warned: set[str] = set()
_steps: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()  # model -> (step or reason, sig)


class Unsupported(Exception):
    """This model (or this machine) cannot run the native step; the message says which part and why."""


# ---------------------------------------------------------------------------------------------------- build
def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pick_isa() -> str:
    """The build this CPU runs best (``SLIMSWARM_ISA`` overrides); raises Unsupported without AVX2+FMA."""
    flags = _cpu_flags()
    forced = os.environ.get("SLIMSWARM_ISA")
    if forced:
        if forced not in ISA_FLAGS:
            raise Unsupported(f"SLIMSWARM_ISA={forced!r} is not one of {', '.join(ISA_FLAGS)}")
        need = {"avx2": {"avx2", "fma"}, "avxvnni": {"avx2", "fma", "avx_vnni"},
                "avx512vnni": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}}[forced]
        if not need <= flags:
            raise Unsupported(f"SLIMSWARM_ISA={forced} but this CPU lacks {', '.join(sorted(need - flags))}")
        return forced
    if sys.platform != "linux" or not {"avx2", "fma"} <= flags:
        raise Unsupported("needs Linux on an x86-64 CPU with AVX2 and FMA")
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        return "avx512vnni"
    if "avx_vnni" in flags:
        return "avxvnni"
    return "avx2"


def _compile(isa: str) -> ctypes.CDLL:
    src = _SRC.read_bytes()
    flags = ISA_FLAGS[isa]
    key = hashlib.sha1(src + " ".join([*flags, "-Wl,-Bsymbolic"]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("SLIMSWARM_CACHE", Path.home() / ".cache" / "slimswarm")) / "kernels"
    so = cache / f"decode-{isa}-{key}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        # -Bsymbolic: the library calls its own ss_* functions even when another ISA build is loaded in the process
        cmd = [os.environ.get("CC", "cc"), "-O3", *flags, "-pthread", "-shared", "-fPIC", "-Wl,-Bsymbolic", str(_SRC), "-o",
               tmp, "-lm"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as e:
            os.unlink(tmp)
            raise Unsupported(f"C compiler failed: {e}") from None
        if r.returncode != 0:
            os.unlink(tmp)
            raise Unsupported("C compiler failed: " + (r.stderr.strip().splitlines() or ["?"])[-1])
        os.replace(tmp, so)  # atomic: a concurrent build never sees half a library
    return bind(ctypes.CDLL(str(so)))


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the argument and result types of decode.c's entry points on a loaded build (also for the profiled
    builds of benchmarks/native_profile.py)."""
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.ss_ctx_new.argtypes, lib.ss_ctx_new.restype = [P, ctypes.c_int, ctypes.c_int], P
    lib.ss_ctx_free.argtypes, lib.ss_ctx_free.restype = [P], None
    lib.ss_decode.argtypes = [P, P, I, P, P, P, I, P, P, ctypes.c_int]
    lib.ss_decode.restype = ctypes.c_int
    lib.ss_decode_greedy.argtypes = [P, P, I, P, P, P, I, P, P, ctypes.c_int, I, P, I, I, P, P, P]
    lib.ss_decode_greedy.restype = I
    lib.ss_prefill_rows.argtypes = [P, P, I, P, P, P, P, P, P, P, ctypes.c_int]
    lib.ss_prefill_rows.restype = ctypes.c_int
    lib.ss_repack_q4.argtypes, lib.ss_repack_q4.restype = [P, I, I, P], None
    lib.ss_repack_q8.argtypes, lib.ss_repack_q8.restype = [P, I, I, P], None
    lib.ss_has_vnni.argtypes, lib.ss_has_vnni.restype = [], ctypes.c_int
    lib.ss_argmax_rows.argtypes, lib.ss_argmax_rows.restype = [P, I, I, P], None
    lib.ss_pool_init.argtypes, lib.ss_pool_init.restype = [ctypes.c_int], ctypes.c_int
    lib.ss_pool_threads.argtypes, lib.ss_pool_threads.restype = [], ctypes.c_int
    return lib


def library(isa: str | None = None) -> ctypes.CDLL:
    """The compiled decode step for ``isa`` (default: ``pick_isa()``); raises Unsupported with the reason."""
    isa = isa or pick_isa()
    got = _libs.get(isa)
    if got is None:
        try:
            got = _compile(isa)
        except Unsupported as e:
            got = str(e)
        _libs[isa] = got
    if isinstance(got, str):
        raise Unsupported(got)
    return got


# ---------------------------------------------------------------------------------------------------- C structs
class _Lin(ctypes.Structure):
    _fields_ = [("fmt", ctypes.c_int32), ("lora_bf16", ctypes.c_int32), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("gs", ctypes.c_int64), ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("zero", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("lora_a", ctypes.c_void_p),
                ("lora_b", ctypes.c_void_p), ("lora_ld", ctypes.c_int64), ("wr", ctypes.c_void_p),
                ("scr", ctypes.c_void_p), ("zpr", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("n_heads", ctypes.c_int32), ("n_kv", ctypes.c_int32), ("inter", ctypes.c_int64),
                ("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p), ("kc", ctypes.c_void_p), ("vc", ctypes.c_void_p),
                *[(n, _Lin) for n in ("q", "k", "v", "o", "gate", "up", "down")],
                ("ks", ctypes.c_void_p), ("vs", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("vocab", ctypes.c_int64), ("hidden", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("n_layers", ctypes.c_int64), ("max_k", ctypes.c_int64), ("max_q", ctypes.c_int64),
                ("max_kv", ctypes.c_int64), ("cache_rows", ctypes.c_int64), ("cache_len", ctypes.c_int64),
                ("cache_dtype", ctypes.c_int32), ("lora_r", ctypes.c_int32), ("act_int8", ctypes.c_int32),
                ("pad_", ctypes.c_int32), ("eps", ctypes.c_float), ("pad2_", ctypes.c_float),
                ("inv_freq", ctypes.c_void_p), ("norm", ctypes.c_void_p), ("embed", _Lin), ("head", _Lin),
                ("layers", ctypes.POINTER(_Layer))]


# ---------------------------------------------------------------------------------------------------- model walk
_LINEARS = (("q", "self_attn", "q_proj"), ("k", "self_attn", "k_proj"), ("v", "self_attn", "v_proj"),
            ("o", "self_attn", "o_proj"), ("gate", "mlp", "gate_proj"), ("up", "mlp", "up_proj"),
            ("down", "mlp", "down_proj"))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def unrepack_q4(wr: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The stored 4-bit layout [n, k/2] (low nibble: even column) of ``ss_repack_q4``'s blocks: the inverse."""
    b = wr.view(n // 8, k // 8, 8, 4)
    codes = torch.cat([b & 15, b >> 4], -1)  # [n/8, k/8, 8 rows, 8 columns]: 8c..8c+3 low, 8c+4..8c+7 high
    codes = codes.permute(0, 2, 1, 3).reshape(n, k)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def _weight_of(mod: nn.Module, name: str) -> dict:
    """Format descriptor of one linear (or embedding table); raises Unsupported naming the module."""
    if hasattr(mod, "native_weight"):  # QuantLinear (compress/quant/linear.py)
        d = mod.native_weight()
        if isinstance(d, str):
            raise Unsupported(f"{name}: {d}")
        return d
    w = getattr(mod, "weight", None)
    if type(mod).__name__ == "LoRALinear" or hasattr(mod, "lora_A"):
        raise Unsupported(f"{name}: a training LoRA wrapper (merge it or load it into an AdapterBank)")
    if not isinstance(mod, (nn.Linear, nn.Embedding)) or not isinstance(w, torch.Tensor):
        raise Unsupported(f"{name}: {type(mod).__name__} is not a format the native step reads")
    if type(w) not in (torch.Tensor, nn.Parameter):
        raise Unsupported(f"{name}: weight is a {type(w).__name__} tensor subclass")
    if w.dtype not in (torch.float32, torch.bfloat16):
        raise Unsupported(f"{name}: weight dtype {w.dtype} (fp32, bf16 or our quantized layers)")
    if not w.is_contiguous():
        raise Unsupported(f"{name}: weight is not contiguous")
    b = getattr(mod, "bias", None)
    return {"fmt": w.dtype, "codes": w, "scale": None, "zero": None, "group_size": w.shape[1],
            "bias": None if b is None else b.detach().float().contiguous()}


def _fill(lin: _Lin, d: dict, n: int, k: int, name: str, keep: list) -> None:
    gs = int(d["group_size"])
    if d["fmt"] in ("q4", "q8"):
        if k % gs:
            raise Unsupported(f"{name}: in_features {k} is not a multiple of group_size {gs}")
        if d["fmt"] == "q4" and gs % 2:
            raise Unsupported(f"{name}: 4-bit group_size {gs} is odd")
        want = (n, k // 2 if d["fmt"] == "q4" else k)
        if tuple(d["codes"].shape) != want or tuple(d["scale"].shape) != (n, k // gs):
            raise Unsupported(f"{name}: codes {tuple(d['codes'].shape)} do not match out={n}, in={k}")
    elif tuple(d["codes"].shape) != (n, k):
        raise Unsupported(f"{name}: weight {tuple(d['codes'].shape)}, expected ({n}, {k})")
    if d["bias"] is not None and d["bias"].numel() != n:
        raise Unsupported(f"{name}: bias has {d['bias'].numel()} entries for out={n}")
    lin.fmt, lin.N, lin.K, lin.gs = _FMT[d["fmt"]], n, k, gs
    lin.w, lin.scale, lin.zero, lin.bias = _ptr(d["codes"]), _ptr(d["scale"]), _ptr(d["zero"]), _ptr(d["bias"])
    keep.extend(t for t in (d["codes"], d["scale"], d["zero"], d["bias"]) if t is not None)


def _norm(mod: nn.Module, name: str, h: int) -> torch.Tensor:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.numel() != h or w.dtype not in (torch.float32, torch.bfloat16):
        raise Unsupported(f"{name}: expected an fp32/bf16 RMSNorm weight of {h}")
    return w.detach().float().contiguous()


class NativeStep:
    """The packed description of one model for decode.c, rebuilt when the model's modules change (``valid``)."""

    def __init__(self, model: nn.Module, isa: str | None = None):
        self.lib = library(isa)
        self.isa = isa or pick_isa()
        cfg = model.config
        dev = getattr(model, "device", torch.device("cpu"))
        if torch.device(dev).type != "cpu":
            raise Unsupported(f"model is on {dev} (the native step runs on the CPU)")
        h, hd, nl = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
        if hd % 2:
            raise Unsupported(f"head_dim {hd} is odd (RoPE needs pairs)")
        keep: list = []
        m = _Model()
        m.vocab, m.hidden, m.head_dim, m.n_layers, m.eps = cfg.vocab_size, h, hd, nl, float(cfg.rms_norm_eps)
        inv = model.inv_freq.detach().float().contiguous()
        if inv.numel() != hd // 2:
            raise Unsupported(f"inv_freq has {inv.numel()} entries for head_dim {hd}")
        norm = _norm(model.model.norm, "model.norm", h)
        keep += [inv, norm]
        m.inv_freq, m.norm = _ptr(inv), _ptr(norm)
        emb = model.model.embed_tokens
        _fill(m.embed, _weight_of(getattr(emb, "rows", emb), "model.embed_tokens"), cfg.vocab_size, h,
              "model.embed_tokens", keep)
        if m.embed.bias:
            raise Unsupported("model.embed_tokens: an embedding table with a bias")
        self.rows_obj = None
        # int8 activations read 4-bit codes repacked at build (SLIMSWARM_NATIVE_REPACK=0: the original layout)
        # SLIMSWARM_NATIVE_REPACK: a comma list of q4 (4-bit linears), head (an 8-bit LM head), q8 (every 8-bit
        # linear; a second copy of a w8 model's weights) — default q4,head; 8-bit codes only with VNNI (AVX2's
        # maddubs would saturate on the repacked loop's full-range products); the 8-bit loop serves several rows
        rp = os.environ.get("SLIMSWARM_NATIVE_REPACK", "q4,head")
        rp = set({"0": "", "1": "q4,head"}.get(rp, rp).split(","))
        if not self.lib.ss_has_vnni():
            rp -= {"q8", "head"}
        self._repack = rp if _act_int8(model) else set()
        self.repacked_bytes = 0
        self.released_bytes = 0  # stored codes freed while the repacked copy serves (see _fill_linear)
        self.loras: list[tuple[_Lin, nn.Module]] = []
        self._head_mod, self._layer_mods = self._fill_linear(m.head, model.lm_head, cfg.vocab_size, h, "lm_head",
                                                             keep), []
        layers = (_Layer * nl)()
        max_k, max_q, max_kv = h, 0, 0
        for i, layer in enumerate(model.model.layers):
            a, mlp = layer.self_attn, layer.mlp
            L = layers[i]
            L.n_heads, L.n_kv = int(a.n_heads), int(a.n_kv)
            if a.head_dim != hd:
                raise Unsupported(f"layer {i}: head_dim {a.head_dim} differs from the config's {hd}")
            if L.n_heads and (L.n_kv == 0 or L.n_heads % L.n_kv):
                raise Unsupported(f"layer {i}: {L.n_heads} query heads for {L.n_kv} kv heads")
            if L.n_heads and L.n_heads // L.n_kv > 64:
                raise Unsupported(f"layer {i}: {L.n_heads // L.n_kv} query heads share a kv head (the step takes 64)")
            inter = int(mlp.down_proj.in_features)
            L.inter = inter
            L.ln1 = _ptr(_keep(keep, _norm(layer.input_layernorm, f"layer {i} input_layernorm", h)))
            L.ln2 = _ptr(_keep(keep, _norm(layer.post_attention_layernorm, f"layer {i} post_attention_layernorm", h)))
            q, kv = L.n_heads * hd, L.n_kv * hd
            shapes = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (inter, h), "up": (inter, h),
                      "down": (h, inter)}
            mods = []
            for field, parent, attr in _LINEARS:
                n, k = shapes[field]
                if (field in "qkvo" and not L.n_heads) or (field in ("gate", "up", "down") and not inter):
                    mods.append(None)
                    continue
                mods.append(self._fill_linear(getattr(L, field), getattr(getattr(layer, parent), attr), n, k,
                                              f"model.layers.{i}.{parent}.{attr}", keep))
            self._layer_mods.append(mods)
            max_k, max_q, max_kv = max(max_k, q, inter), max(max_q, q), max(max_kv, kv)
        m.layers = layers
        m.max_k, m.max_q, m.max_kv = max_k, max_q, max_kv
        m.lora_r = int(self.rows_obj.r) if self.rows_obj is not None else 0
        m.act_int8 = int(_act_int8(model))
        # Prefill through the step where it beats the Python path's batched matmuls: quantized layers with int8
        # activations (SmolLM2 w4g128, 64 prompt tokens, 2 threads: 1201 vs 350 tok/s; w8 337 vs 240, 822 with its
        # layers repacked). fp32 weights (201 vs 289: MKL's sgemm) and fp32 activations (184 vs 324) stay in Python.
        lins = [getattr(layers[i], f) for i in range(nl) for f, _, _ in _LINEARS]
        quant = sum(1 for x in lins if x.fmt in (2, 3))
        self.prefill_fast = bool(m.act_int8) and quant * 2 > len(lins)
        self.model_struct, self.layers, self.keep = m, layers, keep
        self.vocab = cfg.vocab_size
        self._caches: list | None = None
        self._ctx = None
        self._ctx_key = None

    def _fill_linear(self, lin: _Lin, mod: nn.Module, n: int, k: int, name: str, keep: list) -> nn.Module:
        base = mod
        if hasattr(mod, "A_cat") and hasattr(mod, "base"):  # MultiLoRALinear of an AdapterBank
            base = mod.base
            if self.rows_obj is None:
                self.rows_obj = mod.rows
            elif mod.rows is not self.rows_obj:
                raise Unsupported(f"{name}: adapters from two different adapter banks")
            a, bt = mod.A_cat, mod.Bt_cat
            if (a.dtype != bt.dtype or a.dtype not in (torch.float32, torch.bfloat16) or a.shape[1] != k
                    or bt.shape[1] != n):
                raise Unsupported(f"{name}: adapter stack A {tuple(a.shape)} {a.dtype} / B^T {tuple(bt.shape)} "
                                  f"{bt.dtype} for out={n}, in={k} (fp32 or bf16)")
            a, bt = a.contiguous(), bt.contiguous()
            keep += [a, bt]
            lin.lora_a, lin.lora_b, lin.lora_ld = _ptr(a), _ptr(bt), bt.shape[1]
            lin.lora_bf16 = int(a.dtype == torch.bfloat16)
        d = _weight_of(base, name)
        _fill(lin, d, n, k, name, keep)
        want = d["fmt"] in self._repack or (d["fmt"] == "q8" and name == "lm_head" and "head" in self._repack)
        if want and n % 8 == 0 and k % 8 == 0 and int(d["group_size"]) % 32 == 0:
            wr = self._repack_codes(lin, d, n, k, keep)
            # A decoder layer's stored 4-bit codes are freed while the repacked copy serves (the step reads only
            # it when int8 activations are on; the Python kernels, saving and exports rebuild the stored layout on
            # first use): one copy of the codes resident, not two. Not the head (the embedding lookup reads it),
            # not 8-bit codes (the one-row loop reads the stored layout). SLIMSWARM_NATIVE_RELEASE=0 keeps both.
            if (d["fmt"] == "q4" and name.startswith("model.layers.") and hasattr(base, "release_codes")
                    and d["codes"].data_ptr() == base.packed_codes().data_ptr()
                    and os.environ.get("SLIMSWARM_NATIVE_RELEASE", "1") not in ("0", "false", "off", "no")):
                lin.w = None  # (never read with the repacked copy; a stale pointer would be worse than none)
                codes = d.pop("codes")
                keep[:] = [t for t in keep if t is not codes]
                del codes
                self.released_bytes += base.release_codes(functools.partial(unrepack_q4, wr, n, k))
        return mod

    def _repack_codes(self, lin: _Lin, d: dict, n: int, k: int, keep: list) -> None:
        """A copy of the 4-/8-bit codes in the int8-activation loops' layout (8-row blocks, see ss_lin.wr in decode.c)
        and its scales/zero points per block: N*K/2 (N*K) bytes more while int8 activations are on."""
        codes = d["codes"].contiguous()
        q4 = d["fmt"] == "q4"
        wr = torch.empty(n * k // 2 if q4 else n * k, dtype=torch.uint8)
        (self.lib.ss_repack_q4 if q4 else self.lib.ss_repack_q8)(codes.data_ptr(), n, k, wr.data_ptr())
        g = k // int(d["group_size"])
        scr = d["scale"].float().reshape(n // 8, 8, g).transpose(1, 2).contiguous()
        zpr = d["zero"].float().reshape(n // 8, 8, g).transpose(1, 2).contiguous()
        keep += [wr, scr, zpr]
        lin.wr, lin.scr, lin.zpr = wr.data_ptr(), scr.data_ptr(), zpr.data_ptr()
        self.repacked_bytes += wr.numel() + 4 * (scr.numel() + zpr.numel())
        return wr

    # ------------------------------------------------------------------ per call
    def _bind_caches(self, model) -> None:
        # the modules' own dicts, not attribute access (nn.Module.__getattr__ x 60 was ~0.1 ms a step)
        caches = [layer._modules["self_attn"]._modules.get("cache")
                  for layer in model._modules["model"]._modules["layers"]._modules.values()]
        # Weak references: holding the caches themselves kept a replaced cache alive until the next native call
        # (bench: the 8-row cache, 17 MB, beside the 512-slot one its prefill measure allocates).
        if self._caches is not None and len(caches) == len(self._caches) and all(
                r() is c for r, c in zip(self._caches, caches)):
            return
        m = self.model_struct
        dt = None
        for i, (c, L) in enumerate(zip(caches, self.layers)):
            if c is None:
                raise Unsupported(f"layer {i} has no KV cache installed")
            kind = getattr(c, "kind", None)
            if kind not in _CACHE_DT or not all(t.is_contiguous() for t in c.slot_tensors()):
                raise Unsupported(f"layer {i}: KV cache {kind or c.k.dtype} (fp32, bf16, fp16 or int8, contiguous)")
            if dt is not None and kind != dt:
                raise Unsupported("KV caches of different dtypes")
            dt = kind
            if L.n_heads and tuple(c.k.shape[1::2]) != (L.n_kv, m.head_dim):
                raise Unsupported(f"layer {i}: KV cache shape {tuple(c.k.shape)}")
            L.kc, L.vc = c.k.data_ptr(), c.v.data_ptr()
            L.ks, L.vs = (None, None) if c.ks is None else (c.ks.data_ptr(), c.vs.data_ptr())
        m.cache_rows, m.cache_len = caches[0].k.shape[0], caches[0].k.shape[2]
        m.cache_dtype = _CACHE_DT[dt]
        self._caches = [weakref.ref(c) for c in caches]

    def _context(self, nth: int, rows: int = MAX_M):
        """The C call context (buffers for ``rows`` rows of x, ``nth`` threads, the bound cache's length). Sized for
        MAX_M rows until a call needs more (then MAX_M_FAST), except for ``prefill_fast`` models, whose prefill calls
        take MAX_M_FAST positions: a batch-1 generate on fp32 weights does not hold 32 rows of logits."""
        need = MAX_M_FAST if self.prefill_fast or rows > MAX_M else MAX_M
        have = self._ctx_key if self._ctx is not None else (0, 0, 0)
        if have[0] < nth or have[1] < int(self.model_struct.cache_len) or have[2] < need:
            if self._ctx is not None:
                self.lib.ss_ctx_free(self._ctx)
                self._ctx = None
            key = (nth, int(self.model_struct.cache_len), max(need, have[2]))
            self._ctx = self.lib.ss_ctx_new(ctypes.byref(self.model_struct), nth, key[2])
            if not self._ctx:
                raise MemoryError("native decode step: cannot allocate its buffers")
            self._ctx_key = key
        return self._ctx

    def decode(self, model, tokens: torch.Tensor, slots: torch.Tensor, pad: torch.Tensor | None,
               row0: int = 0) -> torch.Tensor:
        """Logits [M, vocab] (fp32) of ``tokens`` [M] written at cache ``slots`` [M] of rows row0.. (pad: [M] or None)."""
        m, nth, ctx, tok, sl, pd, ls = self._call_args(model, tokens, slots, pad)
        out = torch.empty((m, self.vocab), dtype=torch.float32)
        rc = self.lib.ss_decode(ctx, ctypes.byref(self.model_struct), m, tok.data_ptr(), sl.data_ptr(), _ptr(pd),
                                row0, _ptr(ls), out.data_ptr(), nth)
        if rc != 0:
            raise ValueError(f"native decode step refused its arguments (rows {row0}..{row0 + m - 1}, slots "
                             f"{sl.tolist()}, cache {self.model_struct.cache_rows}x{self.model_struct.cache_len})")
        return out

    def prefill(self, model, tokens: torch.Tensor, start: int, pad: int, row: int, lslot: int = 0) -> torch.Tensor:
        """Logits [vocab] (fp32) of the last of ``tokens`` [T] (one sequence) written at cache slots start.. of row
        ``row`` (``pad``: its leading padded slots; ``lslot``: its LoRA slot, 0 none): ``prefill_rows`` of one."""
        return self.prefill_rows(model, [tokens], [start], [pad], [row], [lslot])[0]

    def prefill_rows(self, model, seqs: list, starts: list[int], pads: list[int] | None, rows: list[int],
                     lslots: list[int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Last-position logits [S, vocab] (fp32) of S sequences prefilled together (kernels/decode.c
        ss_prefill_rows): ``seqs[i]`` (token ids) at cache slots starts[i].. of row rows[i], ``pads[i]`` leading
        padded slots, ``lslots[i]`` its LoRA slot (0: none); positions of consecutive sequences share calls of as
        many positions as the call context holds rows (32 for ``prefill_fast`` models, else 8 until a decode of more
        rows grew it). ``out``: a contiguous fp32 [S, vocab] to write."""
        self._bind_caches(model)
        nth = max(1, torch.get_num_threads())
        ctx = self._context(nth)
        n = len(seqs)
        toks = [torch.as_tensor(x, dtype=torch.int64).reshape(-1) for x in seqs]
        cat = torch.cat(toks).contiguous()
        lens = torch.tensor([t.numel() for t in toks], dtype=torch.int64)
        st = torch.tensor(starts, dtype=torch.int64)
        pd = None if pads is None else torch.tensor(pads, dtype=torch.int64)
        rw = torch.tensor(rows, dtype=torch.int64)
        ls = None if lslots is None or not any(lslots) else torch.tensor(lslots, dtype=torch.int32)
        if out is None:
            out = torch.empty((n, self.vocab), dtype=torch.float32)
        elif out.dtype != torch.float32 or not out.is_contiguous() or tuple(out.shape) != (n, self.vocab):
            raise ValueError(f"prefill out: a contiguous fp32 [{n}, {self.vocab}], got {out.dtype} {tuple(out.shape)}")
        rc = self.lib.ss_prefill_rows(ctx, ctypes.byref(self.model_struct), n, lens.data_ptr(), cat.data_ptr(),
                                      st.data_ptr(), _ptr(pd), rw.data_ptr(), _ptr(ls), out.data_ptr(), nth)
        if rc != 0:
            raise ValueError(f"native prefill refused its arguments (rows {rows}, starts {starts}, lengths "
                             f"{lens.tolist()}, pads {pads}, cache {self.model_struct.cache_rows}x"
                             f"{self.model_struct.cache_len})")
        return out

    def lora_slots(self, m: int) -> list[int]:
        """Each of the batch's ``m`` rows' LoRA slot (0: none), as the adapter rows are set now."""
        ls = self._lora_slots(m)
        return [0] * m if ls is None else ls.tolist()

    def decode_greedy(self, model, tokens: torch.Tensor, slots: torch.Tensor, pad: torch.Tensor | None, steps: int,
                      eos: list[int], pad_id: int, counts: list[int], limits: list[int]) -> tuple[int, list[list[int]]]:
        """Up to ``steps`` greedy decode steps in one C call (kernels/decode.c ss_decode_greedy): rows start from
        ``tokens`` [M] at cache ``slots`` [M] (rows 0..M-1); a row stops on an ``eos`` id (not kept) or at
        ``limits[m]`` tokens counting the ``counts[m]`` it has; done rows feed ``pad_id``. Returns (steps run, each
        row's new tokens); ``counts`` is updated in place."""
        m, nth, ctx, tok, sl, pd, ls = self._call_args(model, tokens, slots, pad)
        ev = torch.tensor(list(eos) or [-1], dtype=torch.int64)
        lim = torch.tensor(limits, dtype=torch.int64)
        cnt = torch.tensor(counts, dtype=torch.int64)
        out = torch.empty((m, max(steps, 1)), dtype=torch.int64)
        logits = torch.empty((m, self.vocab), dtype=torch.float32)
        before = cnt.clone()
        n = self.lib.ss_decode_greedy(ctx, ctypes.byref(self.model_struct), m, tok.data_ptr(), sl.data_ptr(), _ptr(pd),
                                      0, _ptr(ls), logits.data_ptr(), nth, steps, ev.data_ptr(), len(eos), pad_id,
                                      lim.data_ptr(), out.data_ptr(), cnt.data_ptr())
        if n < 0:
            raise ValueError(f"native decode step refused its arguments (slots {sl.tolist()}, {steps} steps, cache "
                             f"{self.model_struct.cache_rows}x{self.model_struct.cache_len})")
        new = (cnt - before).tolist()
        counts[:] = cnt.tolist()
        return int(n), [out[i, :k].tolist() for i, k in enumerate(new)]

    def _call_args(self, model, tokens, slots, pad) -> tuple:
        """(rows, threads, context, tokens, slots, pad, LoRA slots) as the C entry points take them."""
        self._bind_caches(model)
        m = tokens.shape[0]
        nth = max(1, torch.get_num_threads())
        flat = [None if t is None else t.reshape(-1).to(torch.int64).contiguous() for t in (tokens, slots, pad)]
        return (m, nth, self._context(nth, m), *flat, self._lora_slots(m))

    def _lora_slots(self, m: int) -> torch.Tensor | None:
        if self.rows_obj is None:
            return None
        rows = self.rows_obj
        if rows.ids is None:
            return None if rows.uniform == 0 else torch.full((m,), int(rows.uniform), dtype=torch.int32)
        if rows.ids.numel() != m:
            raise ValueError(f"adapter rows set for {rows.ids.numel()} rows, batch has {m}")
        return rows.ids.to(torch.int32).contiguous()

    def __del__(self):
        if getattr(self, "_ctx", None):
            self.lib.ss_ctx_free(self._ctx)
            self._ctx = None


def _keep(keep: list, t: torch.Tensor) -> torch.Tensor:
    keep.append(t)
    return t


def _lin_token(mod) -> tuple:
    """What changes when a linear is swapped or re-packed (module identity, weight storage, adapter stacks).

    Reads the modules' own dicts (``__dict__``, ``_modules``, ``_parameters``) rather than attribute access:
    ``nn.Module.__getattr__`` on ~210 modules cost ~1 ms a token, as much as a quarter of a decode step."""
    if mod is None:
        return ()
    d = mod.__dict__
    a = d.get("A_cat")
    if a is not None and "base" in d["_modules"]:  # MultiLoRALinear of an AdapterBank
        return (id(mod), id(a), id(d.get("Bt_cat"))) + _lin_token(d["_modules"]["base"])
    c = d.get("_cache")
    if isinstance(c, dict):  # QuantLinear: its fp32 scale/zero cache is dropped whenever its state changes
        return (id(mod), id(c.get("fp32")), id(c.get("codes4")))
    w = d["_parameters"].get("weight")
    if w is None:
        w = d["_buffers"].get("weight", d.get("weight"))
    return (id(mod), w.data_ptr() if isinstance(w, torch.Tensor) else 0)


def signature(model) -> tuple:
    """Cheap identity of everything the packed step points into (checked before every call)."""
    inner = model._modules["model"]._modules
    emb = inner["embed_tokens"]
    parts = [_lin_token(getattr(emb, "rows", emb)), _lin_token(model._modules["lm_head"]),
             id(inner["norm"]._parameters.get("weight")), bool(_act_int8(model))]
    for layer in inner["layers"]._modules.values():
        lm = layer._modules
        a, mlp = lm["self_attn"]._modules, lm["mlp"]._modules
        parts += [_lin_token(a["q_proj"]), _lin_token(a["k_proj"]), _lin_token(a["v_proj"]), _lin_token(a["o_proj"]),
                  _lin_token(mlp["gate_proj"]), _lin_token(mlp["up_proj"]), _lin_token(mlp["down_proj"])]
    return tuple(parts)


# ---------------------------------------------------------------------------------------------------- entry points
def enabled() -> bool:
    return os.environ.get("SLIMSWARM_NATIVE", "1") not in ("0", "false", "off", "no")


def step_for_rows(model, m: int) -> NativeStep | None:
    """The native step for a one-token forward of ``m`` rows (up to MAX_M_FAST), or None. Past 8 rows it used to
    take only models whose quantized layers take int8 activations, the Python path's batched matmuls being faster
    than the step's float loops; with the float tiles (decode.c wf_rows) the step is faster for every format
    (benchmarks/native_rows.py: SmolLM2 fp32, 2 threads, 16 rows 254 vs 119 tok/s, 32 rows 327 vs 153)."""
    if m > MAX_M_FAST:
        return None
    return step_for(model)


def prefill_step(model) -> NativeStep | None:
    """The step a cached, last-position-only prompt forward of ``model`` goes through, or None (the Python path):
    ``SLIMSWARM_NATIVE_PREFILL`` = 1 (default: where the step is faster, ``NativeStep.prefill_fast``), ``always``
    (tests, A/B) or 0 (never)."""
    mode = os.environ.get("SLIMSWARM_NATIVE_PREFILL", "1")
    if not enabled() or mode in ("0", "false", "off", "no"):
        return None
    step = step_for(model)
    return step if step is not None and (mode == "always" or step.prefill_fast) else None


def _act_int8(model) -> bool:
    """Whether the step quantizes the quantized layers' inputs to int8 (float layers never): ``set_act_int8``, else
    ``SLIMSWARM_NATIVE_ACT`` (``int8``, the default, as llama.cpp's Q8_0/Q4_0 do; ``fp32``: exact to the Python
    path, which eval/prefill use)."""
    v = getattr(model, "_native_act_int8", None)
    return bool(v) if v is not None else os.environ.get("SLIMSWARM_NATIVE_ACT", "int8") != "fp32"


def set_act_int8(model, on: bool) -> None:
    """Quantize the quantized layers' inputs to int8 per row in the native step (``False``: fp32 inputs, exact)."""
    model._native_act_int8 = bool(on)


def warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        print(f"slimswarm: warning: native decode step off: {reason}; using the Python path", file=sys.stderr)


def why_not(model) -> str | None:
    """Why ``model`` cannot use the native step (None: it can). Builds the library if needed."""
    try:
        NativeStep(model)
    except Unsupported as e:
        return str(e)
    return None


def step_for(model) -> NativeStep | None:
    """The model's cached native step (rebuilt when its modules changed), or None after one warning line."""
    if not enabled():
        return None
    got = _steps.get(model)
    sig = signature(model)
    if got is not None and got[1] == sig:
        return got[0] if isinstance(got[0], NativeStep) else None
    try:
        st = NativeStep(model)
    except Unsupported as e:
        _steps[model] = (str(e), sig)
        warn_once(str(e))
        return None
    # the signature again: building reads the layers' lazily made fp32 scale caches, which are part of it (with the
    # one from before, the next call rebuilt the step once more: a second repacked copy of the codes for a while)
    _steps[model] = (st, signature(model))
    return st


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """Each row's argmax of fp32 CPU logits [M, V] in C, single-threaded (torch.argmax's OpenMP region leaves its
    workers spinning on the cores the native step's pool needs next: at 8 rows that cost ~9 ms a step in barrier
    waits); torch.argmax where the library is not there."""
    got = next((lib for lib in _libs.values() if isinstance(lib, ctypes.CDLL)), None) if enabled() else None
    if (got is None or logits.dtype != torch.float32 or logits.device.type != "cpu"
            or logits.dim() != 2):
        return torch.argmax(logits, -1).tolist()
    x = logits if logits.is_contiguous() else logits.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    got.ss_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out.tolist()


def copy_bytes(model) -> int:
    """Resident bytes the native step adds to ``model``'s weights: the repacked copies of its quantized codes (while
    int8 activations are on, the default) less the stored codes it frees meanwhile, 0 where the step does not apply."""
    try:
        st = NativeStep(model)
    except Unsupported:
        return 0
    return st.repacked_bytes - st.released_bytes


def reset(model) -> None:
    """Forget the packed step (after editing weights in place through ``.data``)."""
    _steps.pop(model, None)


def pool_threads(isa: str | None = None) -> int:
    return library(isa).ss_pool_threads()


def pool_init(n: int, isa: str | None = None) -> int:
    """(Re)start the thread pool with ``n`` threads; returns how many it runs."""
    return library(isa).ss_pool_init(n)
