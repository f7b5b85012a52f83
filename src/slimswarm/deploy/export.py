"""deploy/: ``slimswarm export`` as one call: load a checkpoint, check the request, write GGUF / LoRA GGUF / ONNX."""

from __future__ import annotations

from pathlib import Path

from ..errors import SlimswarmError

TARGETS = ("gguf", "onnx")


def export(checkpoint: str, to: str, out: str | Path, gguf_type: str | None = None, adapter: str | None = None,
           overwrite: bool = False) -> dict:
    """Export ``checkpoint`` (anything ``slimswarm.load`` reads) to ``to``; returns a JSON-able summary."""
    from ..data import default_eval_text
    from ..models.checkpoint import file_sha256
    from ..models.load import load, resolve

    if to not in TARGETS:
        raise SlimswarmError(f"--to {to!r}: not one of {', '.join(TARGETS)}")
    out = Path(out)
    if out.exists() and not overwrite:  # before the (slow) load
        raise SlimswarmError(f"{out}: output exists (pass --overwrite to replace it)")
    if gguf_type is not None and to != "gguf":
        raise SlimswarmError("--gguf-type applies to --to gguf only")
    if adapter is not None:
        from ..compress.lora import load_adapter
        from .export_gguf_lora import check_parent, export_lora_gguf

        if to != "gguf":
            raise SlimswarmError("--adapter: only llama.cpp LoRA GGUFs are written (--to gguf)")
        _, _, doc = load_adapter(adapter)
        check_parent(doc, Path(adapter), file_sha256(resolve(checkpoint)), checkpoint)
        loaded = load(checkpoint)
        return export_lora_gguf(loaded.model.config, adapter, out, overwrite)
    loaded = load(checkpoint)
    if to == "onnx":
        from .export_onnx import export_onnx

        return export_onnx(loaded.model, loaded.tokenizer, out, overwrite=overwrite)
    from .export_gguf import export_gguf

    text, _ = default_eval_text()
    rep = export_gguf(loaded.model, loaded.tokenizer, out, gguf_type, overwrite, name=Path(loaded.source).name,
                      kl_text=text[:40000])
    return {"path": rep.path, "bytes": rep.bytes, "arch": rep.arch, "tensors": rep.tensors,
            "same_codes": len(rep.same_codes), "changed": len(rep.changed),
            "weight_max_abs_diff": rep.weight_max_abs_diff, "q4_1_offset_max_abs": rep.q4_1_offset_max_abs,
            "kl": rep.kl, "summary": rep.summary()}
