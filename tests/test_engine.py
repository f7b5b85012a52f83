"""The engine: batched equals unbatched, joins mid-batch, prefix cache, cancel/timeout/queue limits, stops, seeds,
failures, quantized bases and mixed LoRA adapters in one batch."""

import copy
import time

import pytest
import torch

from slimswarm.engine.engine import Engine, EngineClosed, QueueFull
from slimswarm.errors import SlimswarmError
from slimswarm.models.generate import generate_ids
from slimswarm.models.sampling import SamplingParams

PROMPTS = [
    "Once upon a time",
    "The little dog ran to the park and saw a big",
    "Lily",
    "One day, a boy named Tim went to the store with his mom. They wanted to buy some",
    "Tom and Sue went to the park to play with",
    "The sun was hot. A bird",
]
SYSTEM = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun with her "
          "friends and her dog. One day, ")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(tok, prompts):
    return [tok.encode(p) for p in prompts]


def _alone(loaded, ids, params):
    """Each prompt on its own through the static generate_ids path: the reference."""
    tok = loaded.tokenizer
    plist = params if isinstance(params, list) else [params] * len(ids)
    return [generate_ids(loaded.model, [i], p, tok.eos_ids, tok.pad_id, tok)[0] for i, p in zip(ids, plist)]


def _text_after(tok, prompt, tokens):
    """The completion as it reads after the prompt (what the engine reports)."""
    head, full = tok.decode(prompt), tok.decode(prompt + tokens)
    assert full.startswith(head)
    return full[len(head):]


def _drain(engine, reqs, limit=10_000):
    for _ in range(limit):
        if all(r.done for r in reqs):
            return
        engine.step()
    raise AssertionError("engine did not finish")


def test_batched_greedy_equals_each_prompt_alone_across_lengths(stories):
    ids = _ids(stories.tokenizer, PROMPTS)
    p = SamplingParams(max_tokens=40)
    ref = _alone(stories, ids, p)
    eng = Engine(stories.model, stories.tokenizer, max_batch=4, max_len=256)
    out = eng.generate(ids, p)  # 6 prompts through 4 rows: rows leave and others join
    assert [r.tokens for r in out] == [c.tokens for c in ref]
    assert [r.text for r in out] == [_text_after(stories.tokenizer, i, c.tokens) for i, c in zip(ids, ref)]
    assert out[2].text.startswith(" and") and ref[2].text.startswith("and")  # "Lily" + " and Tom", not "Lilyand"
    s = eng.stats()
    assert s["active"] == 0 and s["queue_depth"] == 0 and s["finished"] == len(PROMPTS)
    assert s["generated_tokens"] == sum(len(c.tokens) for c in ref)


def test_sequence_joining_mid_batch_leaves_the_others_unchanged(stories):
    tok = stories.tokenizer
    ids = _ids(tok, PROMPTS)
    p = SamplingParams(max_tokens=30)
    ref = _alone(stories, ids, p)
    eng = Engine(stories.model, tok, max_batch=6, max_len=256)
    first = [eng.submit(i, p) for i in ids[:2]]
    for _ in range(7):
        eng.step()
    assert all(len(r.tokens) == 8 for r in first)  # the first step prefills (one token) and decodes (one)
    # the reference path on the same model between steps must not disturb the engine's own cache
    assert generate_ids(stories.model, [ids[5]], p, tok.eos_ids, tok.pad_id, tok)[0].tokens == ref[5].tokens
    later = [eng.submit(i, p) for i in ids[2:4]]
    for _ in range(5):
        eng.step()
    last = [eng.submit(i, p) for i in ids[4:]]
    reqs = first + later + last
    _drain(eng, reqs)
    assert [r.tokens for r in reqs] == [c.tokens for c in ref]


def test_prefix_cache_hit_gives_the_cold_tokens_and_is_counted(stories):
    tok = stories.tokenizer
    prompts = [SYSTEM + s for s in ("Lily saw a cat", "her dog ran away", "they found a big red ball")]
    ids = _ids(tok, prompts)
    assert min(len(i) for i in ids) > 32
    p = SamplingParams(max_tokens=24)
    cold = Engine(stories.model, tok, max_batch=4, max_len=256, prefix_cache_bytes=0).generate(ids, p)
    assert all(r.cached_tokens == 0 for r in cold)
    warm = Engine(stories.model, tok, max_batch=4, max_len=256)
    a = warm.generate(ids[:1], p)  # stores the shared blocks
    b = warm.generate(ids[1:], p)
    hot = a + b
    assert [r.tokens for r in hot] == [r.tokens for r in cold]
    assert a[0].cached_tokens == 0 and all(r.cached_tokens >= 32 for r in b)
    s = warm.stats()
    assert s["prefix_cache_hits"] == 2
    assert s["prefix_cache_hit_tokens"] == sum(r.cached_tokens for r in b) == s["cached_prompt_tokens"]
    # the same prompt again reuses every full block but the one holding its last token
    again = warm.generate(ids[:1], p)[0]
    assert again.tokens == cold[0].tokens and again.cached_tokens == (len(ids[0]) - 1) // 16 * 16


def test_cancel_frees_the_row_for_the_next_request(stories):
    tok = stories.tokenizer
    ids = _ids(tok, PROMPTS[:3])
    p = SamplingParams(max_tokens=40)
    ref = _alone(stories, ids, p)
    eng = Engine(stories.model, tok, max_batch=2, max_len=256)
    a, b = eng.submit(ids[0], p), eng.submit(ids[1], p)
    for _ in range(3):
        eng.step()
    a.cancel()
    eng.step()
    assert a.done and a.finish_reason == "cancelled" and eng.stats()["active"] == 1
    c = eng.submit(ids[2], p)  # takes the freed row, while b (moved into row 0) keeps decoding
    _drain(eng, [b, c])
    assert b.tokens == ref[1].tokens and c.tokens == ref[2].tokens
    assert eng.stats()["active"] == 0 and eng.stats()["cancelled"] == 1
    w = eng.submit(ids[0], p)
    w.cancel()  # cancelled while still waiting
    eng.step()
    assert w.finish_reason == "cancelled" and w.tokens == []


def test_timeouts_end_waiting_and_running_requests(stories):
    tok = stories.tokenizer
    eng = Engine(stories.model, tok, max_batch=1, max_len=256)
    run = eng.submit(_ids(tok, PROMPTS[:1])[0], SamplingParams(max_tokens=200), timeout_s=0.2)
    wait = eng.submit(_ids(tok, PROMPTS[1:2])[0], SamplingParams(max_tokens=5), timeout_s=0.0)
    eng.step()
    assert wait.finish_reason == "timeout" and wait.tokens == []
    t0 = time.perf_counter()
    while not run.done and time.perf_counter() - t0 < 5:
        eng.step()
        time.sleep(0.01)
    assert run.finish_reason == "timeout" and 0 < len(run.tokens) < 200
    assert eng.stats()["timeouts"] == 2 and eng.stats()["active"] == 0


def test_bounded_queue_raises_queue_full_and_recovers(stories):
    tok = stories.tokenizer
    eng = Engine(stories.model, tok, max_batch=1, max_len=128, max_waiting=2)
    p = SamplingParams(max_tokens=4)
    reqs = [eng.submit("Once upon a time", p) for _ in range(2)]
    with pytest.raises(QueueFull):
        eng.submit("Once upon a time", p)
    assert eng.stats()["rejected"] == 1 and eng.stats()["queue_depth"] == 2
    _drain(eng, reqs)
    assert eng.submit("Lily", p) is not None


def test_bad_input_is_refused_at_submit_and_queues_nothing(stories):
    tok = stories.tokenizer
    eng = Engine(stories.model, tok, max_batch=2, max_len=64)
    for prompt, params, adapter, msg in [
        ([], None, None, "empty prompt"),
        ([1, 2, stories.model.config.vocab_size], None, None, "token ids"),
        ([-1], None, None, "token ids"),
        ("Once upon a time", SamplingParams(max_tokens=64), None, "context length of 64"),
        ("Once upon a time", None, "nope", "unknown adapter"),
    ]:
        with pytest.raises(SlimswarmError, match=msg):
            eng.submit(prompt, params or SamplingParams(max_tokens=8), adapter)
    assert eng.stats()["queue_depth"] == 0 and eng.stats()["requests"] == 0


def test_stop_strings_cut_the_text_and_streaming_adds_up(stories):
    tok = stories.tokenizer
    ids = _ids(tok, PROMPTS[:1])
    full = _text_after(tok, ids[0], _alone(stories, ids, SamplingParams(max_tokens=40))[0].tokens)
    stop = full[20:26]
    assert full.find(stop) == 20
    eng = Engine(stories.model, tok, max_batch=2, max_len=128)
    r = eng.submit(ids[0], SamplingParams(max_tokens=40, stop=["zzzz", stop]))
    _drain(eng, [r])
    assert r.finish_reason == "stop" and r.text == full[:20]
    assert "".join(r.stream(timeout=1)) == r.text  # streamed pieces never include (part of) the stop string


def test_per_request_seeds_are_reproducible_in_any_batch(stories):
    tok = stories.tokenizer
    ids = _ids(tok, PROMPTS)
    seeded = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, seed=1234)
    ref = _alone(stories, ids[:1], seeded)[0].tokens
    eng = Engine(stories.model, tok, max_batch=4, max_len=256)
    alone = eng.generate(ids[:1], seeded)[0].tokens
    mixed = [SamplingParams(max_tokens=30, temperature=0.9, seed=s) for s in (7, 8, 9)]
    batch = eng.generate([ids[3], ids[0], ids[1], ids[2]], [mixed[0], seeded, mixed[1], mixed[2]])
    assert alone == ref == batch[1].tokens
    other = eng.generate(ids[:1], SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, seed=99))[0].tokens
    assert other != ref


class _FlakyBank:
    """An adapter bank whose 'boom' adapter fails its forward, and that can fail one decode on demand."""

    names = ["boom"]

    def __init__(self):
        self.fail_next_batch = False

    def __contains__(self, name):
        return name in self.names

    def set_rows(self, rows):
        if "boom" in rows:
            raise RuntimeError("adapter exploded")
        if len(rows) > 1 and self.fail_next_batch:
            self.fail_next_batch = False
            raise RuntimeError("decode exploded")


def test_a_failing_request_does_not_wedge_the_engine(stories):
    tok = stories.tokenizer
    ids = _ids(tok, PROMPTS[:3])
    p = SamplingParams(max_tokens=20)
    ref = _alone(stories, ids, p)
    bank = _FlakyBank()
    eng = Engine(stories.model, tok, max_batch=3, max_len=128, adapters=bank)
    good, bad, good2 = eng.submit(ids[0], p), eng.submit(ids[1], p, adapter="boom"), eng.submit(ids[2], p)
    _drain(eng, [good, bad, good2])
    assert bad.finish_reason == "error" and "adapter exploded" in bad.error
    with pytest.raises(SlimswarmError, match="adapter exploded"):
        bad.wait(0)
    assert good.tokens == ref[0].tokens and good2.tokens == ref[2].tokens
    # a failing decode forward fails the rows in it, and the next requests are served normally
    a, b = eng.submit(ids[0], p), eng.submit(ids[1], p)
    eng.step()  # both prefilled (together) and one decode done
    bank.fail_next_batch = True
    _drain(eng, [a, b])
    assert a.finish_reason == b.finish_reason == "error"
    assert [r.tokens for r in eng.generate(ids, p)] == [c.tokens for c in ref]
    assert eng.stats()["errors"] == 3 and eng.stats()["active"] == 0


def test_logprobs_belong_to_the_chosen_tokens(stories):
    tok = stories.tokenizer
    eng = Engine(stories.model, tok, max_batch=2, max_len=128)
    r = eng.submit(_ids(tok, PROMPTS[:1])[0], SamplingParams(max_tokens=10), top_logprobs=3)
    _drain(eng, [r])
    assert len(r.token_logprobs) == len(r.tokens) == len(r.top) == 10
    for t, lp, top in zip(r.tokens, r.token_logprobs, r.top):
        assert top[0][0] == t and top[0][1] == pytest.approx(lp) and lp <= 0 and len(top) == 3


def test_background_thread_streams_and_stop_refuses_new_work(stories):
    tok = stories.tokenizer
    ids = _ids(tok, PROMPTS[:2])
    p = SamplingParams(max_tokens=24)
    ref = _alone(stories, ids, p)
    eng = Engine(stories.model, tok, max_batch=2, max_len=128).start()
    try:
        reqs = [eng.submit(i, p) for i in ids]
        pieces = list(reqs[0].stream(timeout=30))
        assert "".join(pieces) == _text_after(tok, ids[0], ref[0].tokens) and len(pieces) > 1
        assert reqs[1].wait(30).tokens == ref[1].tokens
        assert eng.stats()["running"]
    finally:
        eng.stop()
    with pytest.raises(EngineClosed):
        eng.submit(ids[0], p)


def test_quantized_base_batched_equals_alone(stories):
    from slimswarm.compress.quant.apply import quantize_model
    from slimswarm.compress.recipe import load_recipe

    q = copy.copy(stories)
    q.model = copy.deepcopy(stories.model)
    quantize_model(q.model, load_recipe("w4g128-rtn").quantize)
    ids = _ids(q.tokenizer, PROMPTS)
    p = SamplingParams(max_tokens=30)
    ref = _alone(q, ids, p)
    assert [c.tokens for c in ref] != [c.tokens for c in _alone(stories, ids, p)]  # it is a different model
    eng = Engine(q.model, q.tokenizer, max_batch=4, max_len=256)
    assert [r.tokens for r in eng.generate(ids, p)] == [c.tokens for c in ref]
    warm = eng.generate(_ids(q.tokenizer, [SYSTEM + "Lily", SYSTEM + "the dog"]), p)
    assert warm[1].cached_tokens > 0


def _random_state(model, names, seed, r=4, std=0.2):
    from slimswarm.compress.lora import LoRAConfig, target_modules

    cfg = LoRAConfig(r=r, alpha=2 * r)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, lin in target_modules(model, names).items():
        sd[f"{name}.lora_A"] = torch.randn(r, lin.in_features, generator=g) * std
        sd[f"{name}.lora_B"] = torch.randn(lin.out_features, r, generator=g) * std
    return cfg, sd


def test_mixed_adapters_in_one_batch_equal_each_request_alone(stories):
    from slimswarm.compress.lora import AdapterBank

    m = copy.copy(stories)
    m.model = copy.deepcopy(stories.model)
    replacement = _random_state(m.model, ["*_proj"], 4)  # before the bank wraps the linears
    bank = AdapterBank(m.model, {
        "qv": _random_state(m.model, ["*.q_proj", "*.v_proj"], 1),
        "mlp": _random_state(m.model, ["*.gate_proj", "*.down_proj"], 2),
        "all": _random_state(m.model, ["*_proj"], 3),
    })
    tok = m.tokenizer
    ids = _ids(tok, PROMPTS) + _ids(tok, [SYSTEM + "Lily", SYSTEM + "Lily"])
    names = ["qv", None, "mlp", "all", "qv", "mlp", "all", None]
    p = SamplingParams(max_tokens=24)
    ref = []
    for i, n in zip(ids, names):
        bank.set_rows([n])
        ref.append(generate_ids(m.model, [i], p, tok.eos_ids, tok.pad_id, tok)[0].tokens)
    bank.set_rows([None])
    base = [c.tokens for c in _alone(m, ids, p)]
    assert sum(a != b for a, b in zip(ref, base)) >= 4  # the adapters do change the output
    eng = Engine(m.model, tok, max_batch=5, max_len=256, adapters=bank)
    out = eng.generate(ids, p, adapters=names)
    assert [r.tokens for r in out] == ref
    # the prefix cache is per adapter: the same system prompt under another adapter is not a hit
    assert out[6].cached_tokens == 0 and out[7].cached_tokens == 0
    again = eng.generate(ids[6:8], p, adapters=["all", None])
    assert [r.tokens for r in again] == ref[6:8] and all(r.cached_tokens > 0 for r in again)
    # replacing an adapter drops the prefixes computed under the old one
    eng.add_adapter("all", replacement)
    bank.set_rows(["all"])
    want = generate_ids(m.model, [ids[6]], p, tok.eos_ids, tok.pad_id, tok)[0].tokens
    new = eng.generate(ids[6:7], p, adapters=["all"])[0]
    assert new.cached_tokens == 0 and new.tokens == want != ref[6]


@pytest.mark.slow
def test_smollm2_batched_and_prefix_cached_equal_alone(smollm2):
    tok = smollm2.tokenizer
    system = "You are a helpful assistant who answers in one short sentence about science and everyday life."
    prompts = [tok.chat([{"role": "system", "content": system}, {"role": "user", "content": q}])
               for q in ("What is the sun?", "Why is the sky blue?", "What do bees make?")]
    prompts.append("The capital of France is")
    ids = _ids(tok, prompts)
    p = SamplingParams(max_tokens=16)
    ref = _alone(smollm2, ids, p)
    eng = Engine(smollm2.model, tok, max_batch=3, max_len=512)
    first = eng.generate(ids[:1], p)
    rest = eng.generate(ids[1:], p)
    assert [r.tokens for r in first + rest] == [c.tokens for c in ref]
    assert rest[0].cached_tokens >= 16 and eng.stats()["prefix_cache_hits"] >= 2
