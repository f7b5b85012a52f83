"""Zero-shot classification by label likelihood: score every label as the continuation of the chat prompt and
pick the most likely one (the multiple-choice protocol of LM evaluation suites), so a base model that would not
name a label when asked to generate is still measured on what it knows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..progress import progress


def _right_padded(seqs: list[list[int]], pad: int) -> torch.Tensor:
    x = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)  # causal attention never sees the pads
    for i, q in enumerate(seqs):
        x[i, : len(q)] = torch.tensor(q)
    return x


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: list[str], labels: list[str], batch_size: int = 8) -> torch.Tensor:
    """``[len(prompts), len(labels)]``: log P(label | prompt), summed over the label's tokens.

    When every label is one token, one forward of each prompt scores them all; otherwise each (prompt, label)
    pair is a row. Only the positions that predict label tokens are projected onto the vocabulary."""
    lab_ids = [tokenizer.encode(lab, bos=False) for lab in labels]
    one_token = all(len(c) == 1 for c in lab_ids)
    enc = [tokenizer.encode(p) for p in prompts]
    # rows: (token ids, [(output index, position, token id)]), output index = prompt * len(labels) + label
    rows = []
    for i, p in enumerate(enc):
        if one_token:
            rows.append((p, [(i * len(labels) + j, len(p) - 1, c[0]) for j, c in enumerate(lab_ids)]))
        else:
            rows += [(p + c, [(i * len(labels) + j, len(p) - 1 + k, t) for k, t in enumerate(c)])
                     for j, c in enumerate(lab_ids)]
    pad = tokenizer.eos_ids[0] if tokenizer.eos_ids else 0
    out = torch.zeros(len(prompts) * len(labels))
    model.clear_cache()
    for s in progress(range(0, len(rows), batch_size), "label scoring", total=-(-len(rows) // batch_size)):
        chunk = rows[s:s + batch_size]
        h = model(_right_padded([ids for ids, _ in chunk], pad), hidden_only=True)
        picks = [(r, pos, k, t) for r, (_, wants) in enumerate(chunk) for k, pos, t in wants]
        rows_idx = torch.tensor([r for r, _, _, _ in picks])
        pos_idx = torch.tensor([pos for _, pos, _, _ in picks])
        logp = F.log_softmax(model.lm_head(h[rows_idx, pos_idx]).float(), dim=-1)
        vals = logp[torch.arange(len(picks)), torch.tensor([t for _, _, _, t in picks])]
        out.index_add_(0, torch.tensor([k for _, _, k, _ in picks]), vals)
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
