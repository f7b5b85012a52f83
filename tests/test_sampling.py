"""Sampling settings: seeds, top-k/top-p limits, stop strings, max tokens, validation."""

import pytest

from slimswarm.errors import SlimswarmError
from slimswarm.models.generate import generate
from slimswarm.models.sampling import SamplingParams


def _gen(stories, prompts, **kw):
    return generate(stories.model, stories.tokenizer, prompts, SamplingParams(**kw))


def test_same_seed_same_text_other_seed_other_text(stories):
    a = _gen(stories, ["Once upon a time"], max_tokens=40, temperature=1.0, seed=7)[0].text
    b = _gen(stories, ["Once upon a time"], max_tokens=40, temperature=1.0, seed=7)[0].text
    c = _gen(stories, ["Once upon a time"], max_tokens=40, temperature=1.0, seed=8)[0].text
    assert a == b and a != c


def test_per_request_seed_is_independent_of_batch_mates(stories):
    solo = _gen(stories, ["The cat"], max_tokens=30, temperature=1.0, seed=3)[0].tokens
    from slimswarm.models.generate import generate as g

    batch = g(stories.model, stories.tokenizer, ["Once upon a time there was", "The cat"],
              [SamplingParams(max_tokens=30, temperature=1.0, seed=11), SamplingParams(max_tokens=30, temperature=1.0, seed=3)])
    assert batch[1].tokens == solo


def test_top_k_one_and_tiny_top_p_are_greedy(stories):
    greedy = _gen(stories, ["Once upon a time"], max_tokens=20)[0].tokens
    assert _gen(stories, ["Once upon a time"], max_tokens=20, temperature=1.5, top_k=1, seed=1)[0].tokens == greedy
    assert _gen(stories, ["Once upon a time"], max_tokens=20, temperature=1.5, top_p=1e-6, seed=1)[0].tokens == greedy


def test_stop_string_cuts_the_text_and_ends_the_row(stories):
    c = _gen(stories, ["Once upon a time"], max_tokens=60, stop=["Lily"])[0]
    assert c.text == ", there was a little girl named " and c.finish_reason == "stop"
    assert len(c.tokens) < 60


def test_max_tokens_is_exact(stories):
    c = _gen(stories, ["Once upon a time"], max_tokens=7)[0]
    assert len(c.tokens) == 7 and c.finish_reason == "length"


@pytest.mark.parametrize("kw,msg", [({"temperature": -1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                    ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens")])
def test_invalid_sampling_values_are_rejected(kw, msg):
    with pytest.raises(SlimswarmError, match=msg):
        SamplingParams(**kw)


def test_chat_template_from_the_gguf_tokenizer(smollm2):
    text = smollm2.tokenizer.chat([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert 2 in smollm2.tokenizer.eos_ids  # <|im_end|> ends a turn
