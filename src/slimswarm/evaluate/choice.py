"""Zero-shot classification by label likelihood: score every label as the continuation of the chat prompt and
pick the most likely one (the multiple-choice protocol of LM evaluation suites), so a base model that would not
name a label when asked to generate is still measured on what it knows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..progress import progress


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: list[str], labels: list[str], batch_size: int = 8) -> torch.Tensor:
    """``[len(prompts), len(labels)]``: log P(label | prompt), summed over the label's tokens."""
    pairs = []
    for p in prompts:
        pid = tokenizer.encode(p)
        for lab in labels:
            pairs.append((pid, tokenizer.encode(lab, bos=False)))
    pad = tokenizer.eos_ids[0] if tokenizer.eos_ids else 0
    out = torch.empty(len(pairs))
    model.clear_cache()
    for s in progress(range(0, len(pairs), batch_size), "label scoring", total=-(-len(pairs) // batch_size)):
        chunk = pairs[s:s + batch_size]
        t = max(len(p) + len(c) for p, c in chunk)
        x = torch.full((len(chunk), t), pad, dtype=torch.long)  # right-padded: causal attention never sees the pads
        for i, (p, c) in enumerate(chunk):
            x[i, : len(p) + len(c)] = torch.tensor(p + c)
        logp = F.log_softmax(model(x).float(), dim=-1)
        for i, (p, c) in enumerate(chunk):
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)  # the positions that predict the label's tokens
            out[s + i] = logp[i, pos, torch.tensor(c)].sum()
    return out.view(len(prompts), len(labels))


def choice_accuracy(model, tokenizer, items, batch_size: int = 8) -> dict:
    """Accuracy of picking the most likely label of ``tasks.LABELS`` for each classification item (one task)."""
    from ..tasks import LABELS, messages_for

    tasks = {it.task for it in items}
    if len(tasks) != 1 or next(iter(tasks)) not in LABELS:
        raise ValueError(f"choice_accuracy: one classification task at a time (got {sorted(tasks)})")
    labels = LABELS[next(iter(tasks))]
    prompts = [tokenizer.chat(messages_for(it)) for it in items]
    lp = label_logprobs(model, tokenizer, prompts, labels, batch_size)
    picks = [labels[int(i)] for i in lp.argmax(dim=1)]
    correct = sum(p == it.label for p, it in zip(picks, items))
    return {"items": len(items), "correct": correct, "accuracy": correct / len(items), "picks": picks}
