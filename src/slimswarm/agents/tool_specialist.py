"""Agents layer: the tool-calling specialist, a LoRA adapter trained with ``finetune_lora`` on the function-calling
set (``tool_calls_data``) over the shared int4 base, cached on disk; it serves as an adapter on that base."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .specialists import DEFAULT_ROOT, cached, finetune_config, load_base

TOOL_SPEC_VERSION = 2  # bump when the training set or the recipe changes in a way the fields do not capture


@dataclass(frozen=True)
class ToolSpecialistSpec:
    """Everything that decides the adapter's weights; a cached adapter is reused only when all of it matches.

    The defaults keep training CPU-frugal: ~280-token prompts (the three tools' schemas), LoRA on the top 6
    layers only (the backward stops there), 4 examples a step."""

    base: str = "smollm2-135m"
    quantize: str | None = "w4g128-rtn"
    examples: int = 360
    chat_examples: int = 60  # prompts no tool answers, the base's own reply as target
    steps: int = 40
    batch_size: int = 4
    r: int = 8
    lr: float = 3e-3
    upper_layers: int | None = 6
    max_len: int = 320
    seed: int = 0

    @property
    def name(self) -> str:
        return "tools" + (f"-{self.quantize}" if self.quantize else "")

    def key(self) -> dict:
        return {"version": TOOL_SPEC_VERSION, "kind": "tool-calling", **asdict(self)}


def tool_call_loss(model, tokenizer, pairs: list[tuple[str, str]], max_len: int = 320) -> float:
    """Mean cross-entropy (nats/token) of the target tokens (the call and end-of-turn) given their prompts."""
    from ..compress.lora import encode_pairs

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in encode_pairs(tokenizer, pairs, max_len):
            x = torch.tensor([ids])
            y = torch.tensor(labels[1:])
            keep = y != -100
            logits = model(x)[0, :-1][keep]
            total += F.cross_entropy(logits.float(), y[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def base_replies(loaded, examples, max_tokens: int = 32) -> list[tuple[str, str]]:
    """(prompt, the base's greedy reply, at most ``max_tokens``) for prompts no tool answers, tools in the prompt as
    the server sends them; only plain-text replies (what matters is that the reply starts as text, not a call)."""
    from ..engine.chat_plan import plan_chat
    from ..engine.engine import Engine
    from ..models.sampling import SamplingParams
    from .tool_calls_data import prompt_messages

    tok = loaded.tokenizer
    prompts = [tok.chat(plan_chat(*prompt_messages(ex), "auto").messages) for ex in examples]
    eng = Engine(loaded.model, tok, max_batch=8, max_len=1024)
    reqs = eng.generate([tok.encode(p) for p in prompts], SamplingParams(max_tokens=max_tokens))
    return [(p, r.text) for p, r in zip(prompts, reqs)
            if r.text.strip() and not r.text.startswith("<")]


def train_tool_specialist(spec: ToolSpecialistSpec, out: str | Path, log=print, loaded=None) -> dict:
    """Train ``spec``'s adapter and write it to ``out`` (atomically); returns its training summary (wall time,
    loss history, held-out loss before and after). ``loaded``: the base already loaded (quantized as the spec says)."""
    from ..compress.lora import finetune_lora, save_adapter, unwrap_lora
    from ..models.checkpoint import file_sha256
    from .tool_calls_data import chat_set, tool_call_set, training_pairs

    torch.manual_seed(spec.seed)
    loaded = loaded or load_base(spec.base, spec.quantize)
    tok = loaded.tokenizer
    pairs = training_pairs(tok, tool_call_set("train", spec.examples, spec.seed), seed=spec.seed)
    chats = base_replies(loaded, chat_set("train", spec.chat_examples, spec.seed)) if spec.chat_examples else []
    pairs += chats
    held = training_pairs(tok, tool_call_set("held_out", 12, spec.seed), vary=False)
    cfg = finetune_config(spec, loaded.model.config.num_hidden_layers)
    log(f"  training {spec.name}: {len(pairs) - len(chats)} tool-call + {len(chats)} no-tool examples, {spec.steps} steps x {spec.batch_size}, "
        f"r={spec.r}, top {spec.upper_layers or 'all'} layers{' on a ' + spec.quantize + ' base' if spec.quantize else ''}"
        f", {torch.get_num_threads()} thread(s)")
    before = tool_call_loss(loaded.model, tok, held, spec.max_len)
    cpu0 = time.process_time()  # CPU seconds too: on a shared machine the wall clock also counts the neighbours
    res = finetune_lora(loaded.model, tok, pairs, cfg,
                        on_log=lambda h: log(f"    step {h['step']}/{spec.steps}  loss {h['loss_ema']:.3f}"))
    cpu = time.process_time() - cpu0
    after = tool_call_loss(loaded.model, tok, held, spec.max_len)
    summary = {"examples": len(pairs), "no_tool_examples": len(chats), "history": res.history, "seconds": round(res.seconds, 1),
               "cpu_seconds": round(cpu, 1),
               "threads": torch.get_num_threads(), "trained_params": res.trained_params,
               "held_out_loss_before": round(before, 4), "held_out_loss_after": round(after, 4)}
    meta = {"slimswarm": spec.key(),
            "base": {"source": str(loaded.source), "sha256": file_sha256(loaded.source), "quantize": spec.quantize},
            "train": summary}
    save_adapter(loaded.model, out, cfg.lora, meta)
    unwrap_lora(loaded.model)  # the caller's base is the base again
    log(f"  {spec.name}: {res.seconds:.0f}s wall, {cpu:.0f}s CPU, held-out call loss {before:.3f} -> {after:.3f} -> {out}")
    return summary


def ensure_tool_specialist(spec: ToolSpecialistSpec | None = None, root: str | Path = DEFAULT_ROOT, log=print,
                           loaded=None) -> Path:
    """The adapter folder for ``spec`` under ``root``: reused when its metadata matches, trained now otherwise."""
    spec = spec or ToolSpecialistSpec()
    path = Path(root) / spec.name
    if cached(path, spec):
        log(f"  reusing {spec.name} ({path})")
    else:
        train_tool_specialist(spec, path, log, loaded)
    return path


def training_summary(path: str | Path) -> dict:
    return json.loads((Path(path) / "adapter.json").read_text())["train"]
