"""deploy/: one of our LoRA adapters → a llama.cpp LoRA adapter GGUF for the base exported by ``export_gguf``.

llama.cpp's adapter loader (src/llama-adapter.cpp) wants ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, the base's ``general.architecture``, and per target weight ``<name>.lora_a`` (numpy
[r, in], our A) and ``<name>.lora_b`` (numpy [out, r], our B); it scales by alpha / r as we do. On the llama
arch the base's q/k rows were permuted for llama.cpp's RoPE, so B's rows (the output side) get the same
permutation; A is on the input side and stays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SlimswarmError
from .export_gguf import _LINEARS, check_out_path, gguf_arch, permute_rope, write_gguf


def check_parent(adapter_doc: dict, adapter_dir: Path, base_sha256: str, base: str) -> None:
    """Refuse an adapter trained on another base (its adapter.json names the base's sha256)."""
    want = (adapter_doc.get("base") or {}).get("sha256")
    if want is None:
        raise SlimswarmError(f"adapter {adapter_dir}: adapter.json has no base.sha256, cannot check it fits {base}")
    if want != base_sha256:
        raise SlimswarmError(f"adapter {adapter_dir}: trained on a base with sha256 {want[:12]}…, "
                             f"but {base} has {base_sha256[:12]}… (export the adapter with its own base)")


def export_lora_gguf(cfg, adapter_dir: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write the adapter in ``adapter_dir`` for a base with ModelConfig ``cfg``; returns {path, bytes, tensors}."""
    from ..compress.lora import load_adapter

    out = Path(out)
    check_out_path(out, overwrite)
    lcfg, sd, _ = load_adapter(adapter_dir)
    arch = gguf_arch(cfg)
    tensors = []
    for key in sorted(k for k in sd if k.endswith(".lora_A")):
        name = key[: -len(".lora_A")]
        parts = name.split(".")
        hf = ".".join(parts[3:])
        if parts[:2] != ["model", "layers"] or hf not in _LINEARS:
            raise SlimswarmError(f"adapter {adapter_dir}: module {name!r} has no llama.cpp LoRA target "
                                 "(decoder projections only)")
        i, short = int(parts[2]), _LINEARS[hf]
        a, b = sd[key].float(), sd[name + ".lora_B"].float()
        if arch in ("llama", "deci") and short in ("attn_q", "attn_k"):
            b = permute_rope(b, cfg.heads(i) if short == "attn_q" else cfg.kv_heads(i))
        tensors.append((f"blk.{i}.{short}.weight.lora_a", np.ascontiguousarray(a.numpy()), "F32"))
        tensors.append((f"blk.{i}.{short}.weight.lora_b", np.ascontiguousarray(b.numpy()), "F32"))

    def meta(w):
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(lcfg.alpha))
        w.add_name(f"slimswarm LoRA r={lcfg.r}")

    write_gguf(out, arch, meta, {}, tensors)
    return {"path": str(out), "bytes": out.stat().st_size, "tensors": len(tensors), "r": lcfg.r, "alpha": lcfg.alpha}
