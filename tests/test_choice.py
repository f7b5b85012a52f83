"""Zero-shot label scoring: batched, right-padded log P(label | prompt) equals scoring each pair alone, and the
accuracy counts the argmax label."""

import pytest
import torch
import torch.nn.functional as F

from slimswarm.evaluate.choice import choice_accuracy, label_logprobs
from slimswarm.tasks import LABELS, load_task, messages_for


def _alone(model, tok, prompt, label):
    p, c = tok.encode(prompt), tok.encode(label, bos=False)
    model.clear_cache()
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([p + c])).float(), dim=-1)[0]
    return sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))


def test_batched_label_scores_equal_one_pair_at_a_time(stories):
    m, tok = stories.model, stories.tokenizer
    prompts = ["Once upon a time there was a", "The little dog was very", "Lily saw a big red"]
    labels = ["happy", "ball and a sad cat", "sun"]  # labels of different token lengths pad differently
    got = label_logprobs(m, tok, prompts, labels, batch_size=4)
    assert got.shape == (3, 3)
    for i, p in enumerate(prompts):
        for j, lab in enumerate(labels):
            assert float(got[i, j]) == pytest.approx(_alone(m, tok, p, lab), abs=1e-4)


def test_one_token_labels_take_one_forward_per_prompt_and_agree(stories):
    m, tok = stories.model, stories.tokenizer
    labels = [tok.decode([i]) for i in (300, 301, 302)]
    labels = [lab for lab in labels if len(tok.encode(lab, bos=False)) == 1]
    assert len(labels) >= 2
    prompts = ["Once upon a time there was a", "The cat"]
    got = label_logprobs(m, tok, prompts, labels)
    for i, p in enumerate(prompts):
        for j, lab in enumerate(labels):
            assert float(got[i, j]) == pytest.approx(_alone(m, tok, p, lab), abs=1e-4)


def test_choice_accuracy_is_the_argmax_label_against_the_truth(stories):
    items = load_task("sst2", "test", n=6, seed=2)
    res = choice_accuracy(stories.model, stories.tokenizer, items, batch_size=3)
    lp = label_logprobs(stories.model, stories.tokenizer, [stories.tokenizer.chat(messages_for(it)) for it in items],
                        LABELS["sst2"])
    assert res["picks"] == [LABELS["sst2"][int(k)] for k in lp.argmax(1)]
    assert res["correct"] == sum(p == it.label for p, it in zip(res["picks"], items)) and res["items"] == 6
    with pytest.raises(ValueError, match="one classification task"):
        choice_accuracy(stories.model, stories.tokenizer, load_task("gsm8k", "test", n=2))
