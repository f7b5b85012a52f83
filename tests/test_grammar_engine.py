"""Constrained decoding in the engine (stories260k): every constrained reply validates against its schema over
hundreds of sampled requests; grammar rows share a batch with free rows, other grammars and other adapters without
changing anyone's output; the compile cache; max_tokens → "length"; bad grammars refused before queueing; stop
strings, streaming, cancellation and the prefix cache under a grammar."""

import copy
import json
import re

import jsonschema
import pytest
import torch

from slimswarm.engine.engine import Engine
from slimswarm.engine.grammar import Grammar, GrammarError, apply_bitmask
from slimswarm.engine.tools import ToolCallParser, ToolSet
from slimswarm.models.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "mood": {"enum": ["happy", "sad", "sleepy"]},
    "pets": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 6}}},
    "required": ["name", "age", "mood", "pets"], "additionalProperties": False}
VOTE = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                         "sure": {"type": "boolean"}},
        "required": ["answer", "sure"], "additionalProperties": False}
TOOLS = ToolSet.parse([
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {
        "key": {"type": "string", "maxLength": 8}}, "required": ["key"]}}}])


@pytest.fixture(scope="module")
def engine(stories):
    return Engine(copy.deepcopy(stories.model), stories.tokenizer, max_batch=16, max_len=512, max_waiting=512)


def test_every_constrained_reply_parses_and_validates_over_320_sampled_requests(engine):
    # 4 grammars x 80 requests: greedy, temperature 0.7 and 1.0 (top_p 0.9 on some), all seeded, one queue
    kinds = [("person", Grammar.json_schema(PERSON)), ("vote", Grammar.json_schema(VOTE)),
             ("tool", TOOLS.grammar(parallel=False)), ("label", Grammar.choice(["positive", "negative", "neutral"]))]
    prompts, params, grammars, labels = [], [], [], []
    for i in range(320):
        label, g = kinds[i % 4]
        temp = (0.0, 0.7, 1.0, 1.0)[(i // 4) % 4]
        prompts.append(["Once upon a time", "Lily and Ben", "The cat", "One day"][i % 3])
        params.append(SamplingParams(max_tokens=120, temperature=temp, top_p=0.9 if i % 7 == 0 else 1.0, seed=i))
        grammars.append(g)
        labels.append(label)
    reqs = engine.generate(prompts, params, grammars=grammars)
    counts = {}
    for r, label in zip(reqs, labels):
        assert r.finish_reason == "stop" and r.grammar_complete, (label, r.text)
        if label == "person":
            jsonschema.validate(json.loads(r.text), PERSON)
        elif label == "vote":
            jsonschema.validate(json.loads(r.text), VOTE)
        elif label == "tool":
            content, calls = ToolCallParser().finish(r.text)
            assert content is None and len(calls) == 1, r.text
            jsonschema.validate(json.loads(calls[0].arguments), TOOLS.params[calls[0].name])
        else:
            assert r.text in ("positive", "negative", "neutral")
        counts[label] = counts.get(label, 0) + 1
    assert counts == {"person": 80, "vote": 80, "tool": 80, "label": 80}
    # sampling really varied the replies (the grammar did not collapse them to one)
    assert len({r.text for r, label in zip(reqs, labels) if label == "person"}) > 40


def test_grammar_rows_share_a_step_with_free_rows_other_grammars_and_adapters(stories):
    from slimswarm.compress.lora import AdapterBank, LoRAConfig, target_modules

    model = copy.deepcopy(stories.model)
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, lin in target_modules(model, ["*_proj"]).items():
        sd[f"{name}.lora_A"] = torch.randn(4, lin.in_features, generator=g) * 0.2
        sd[f"{name}.lora_B"] = torch.randn(lin.out_features, 4, generator=g) * 0.2
    bank = AdapterBank(model, {"poet": (LoRAConfig(r=4, alpha=8), sd)})
    eng = Engine(model, stories.tokenizer, max_batch=6, max_len=512, adapters=bank)
    rows = [("Once upon a time", None, None), ("Once upon a time", Grammar.json_schema(VOTE), None),
            ("The dog", Grammar.json_schema(PERSON), "poet"), ("The dog", None, "poet"),
            ("Lily", Grammar.regex(r"[a-z]{2,8}( [a-z]{2,8}){2}"), None), ("Lily", Grammar.json_schema(VOTE), "poet")]
    p = SamplingParams(max_tokens=120)
    together = eng.generate([r[0] for r in rows], p, adapters=[r[2] for r in rows], grammars=[r[1] for r in rows])
    assert eng.counters["decode_rows"] / eng.counters["steps"] > 2  # they really shared steps
    for (prompt, grammar, adapter), r in zip(rows, together):
        alone = eng.generate([prompt], p, adapters=[adapter], grammars=[grammar])[0]
        assert alone.tokens == r.tokens and alone.text == r.text
    free = together[0].text
    assert not free.startswith("{")  # the free row is the model's own text, not JSON
    assert all(r.finish_reason == "stop" for r in together[1:3] + together[4:])
    jsonschema.validate(json.loads(together[1].text), VOTE)
    jsonschema.validate(json.loads(together[2].text), PERSON)
    jsonschema.validate(json.loads(together[5].text), VOTE)
    assert re.fullmatch(r"[a-z]{2,8}( [a-z]{2,8}){2}", together[4].text)


def test_compiled_grammars_are_cached_by_source(engine):
    c0, h0 = engine.grammars.compiles, engine.grammars.hits
    schema = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"]}
    for _ in range(3):
        engine.generate(["The cat"], SamplingParams(max_tokens=20), grammars=[Grammar.json_schema(dict(schema))])
    assert engine.grammars.compiles == c0 + 1 and engine.grammars.hits == h0 + 2


def test_a_grammar_that_cannot_complete_in_max_tokens_ends_with_length_and_others_finish(engine):
    open_ended = Grammar.json_schema({"type": "object", "properties": {"story": {"type": "string"}},
                                      "required": ["story"]})
    cut, fine = engine.generate(["Once upon a time", "The cat"], SamplingParams(max_tokens=12),
                                grammars=[open_ended, Grammar.choice(["yes", "no"])])
    assert cut.finish_reason == "length" and not cut.grammar_complete and len(cut.tokens) == 12
    assert cut.text.startswith('{"story": "')
    assert fine.finish_reason == "stop" and fine.grammar_complete and fine.text in ("yes", "no")


@pytest.mark.parametrize("grammar, message", [
    (lambda: Grammar.json_schema({"type": "foo"}), "Invalid type: foo"),
    (lambda: Grammar.json_schema({"type": "object", "not": {"required": ["a"]}}), 'Unimplemented keys: ["not"]'),
    (lambda: Grammar.json_schema('{"type": '), "JSON schema is not valid JSON"),
    (lambda: Grammar.regex("(?<=a)b"), "look-around"),
    (lambda: Grammar.choice([]), "non-empty list"),
])
def test_a_bad_grammar_is_refused_at_submit_and_nothing_is_queued(engine, grammar, message):
    before = engine.counters["requests"]
    with pytest.raises(GrammarError, match=re.escape(message)):
        engine.submit("The cat", SamplingParams(max_tokens=8), grammar=grammar())
    assert engine.counters["requests"] == before and not engine.waiting


def test_stop_strings_streaming_cancel_and_prefix_cache_under_a_grammar(stories):
    eng = Engine(copy.deepcopy(stories.model), stories.tokenizer, max_batch=4, max_len=512).start()
    try:
        g = Grammar.json_schema(PERSON)
        prompt = "Once upon a time there was a little girl who liked to write JSON. " * 2
        full = eng.submit(prompt, SamplingParams(max_tokens=120), grammar=g).wait(60)
        pieces = list(eng.submit(prompt, SamplingParams(max_tokens=120), grammar=g).stream(60))
        assert "".join(pieces) == full.text and len(pieces) > 3
        again = eng.submit(prompt, SamplingParams(max_tokens=120), grammar=g).wait(60)
        assert again.cached_tokens > 0 and again.text == full.text  # prefix KV reused, same constrained reply
        stop = eng.submit(prompt, SamplingParams(max_tokens=120, stop=['"age"']), grammar=g).wait(60)
        assert stop.finish_reason == "stop" and stop.text == full.text[: full.text.find('"age"')]
        assert not stop.grammar_complete
        slow = eng.submit(prompt, SamplingParams(max_tokens=200), grammar=Grammar.json_schema(
            {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}))
        next(slow.stream(60))
        slow.cancel()
        assert slow.wait(60).finish_reason == "cancelled"
        after = eng.submit(prompt, SamplingParams(max_tokens=120), grammar=g).wait(60)
        assert after.text == full.text
    finally:
        eng.stop()


def test_apply_bitmask_sets_exactly_the_cleared_bits_to_minus_inf():
    v = 100
    logits = torch.randn(2, v)
    allowed = [{0, 31, 32, 63, 99}, {5}]
    mask = torch.zeros(2, 4, dtype=torch.int32)
    for i, s in enumerate(allowed):
        for t in s:
            w = int(mask[i, t >> 5]) | (1 << (t & 31))
            mask[i, t >> 5] = w - (1 << 32) if w >= 1 << 31 else w
    out = logits.clone()
    apply_bitmask(out, mask)
    for i, s in enumerate(allowed):
        finite = set(torch.nonzero(torch.isfinite(out[i])).flatten().tolist())
        assert finite == s and torch.equal(out[i, sorted(s)], logits[i, sorted(s)])
