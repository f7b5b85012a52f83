"""A live `slimswarm serve` (stories260k, loopback) under schemathesis: every operation of its OpenAPI schema, valid
and invalid bodies, no 5xx, no hang, every response in its documented shape (errors in OpenAI's); and hypothesis
properties of the sampling, stop and logprob parameters."""

import math
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from live_server import LiveServer

KEY = "sk-fuzz"
EXAMPLES = int(os.environ.get("SLIMSWARM_FUZZ_EXAMPLES", 25))


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def live():
    srv = LiveServer("stories260k", "--max-len", "64", "--max-batch", "4", "--max-waiting", "64", api_key=KEY)
    yield srv
    srv.close()


def fuzz_server(url: str, headers: dict, examples: int) -> dict:
    """Fuzz every operation in both modes; {"requests", "status" {code: n}, "failures" [...], "per_operation"}.
    Most bodies name the served model (else nearly every request would stop at the 404 for an unknown model)."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    # positive_data_acceptance is left out: the schema cannot say "n must be 1" or "prompt + max_tokens must fit
    # the context", so schema-valid bodies the server cannot serve get a 400 (in OpenAI's shape, checked below).
    excluded = [schemathesis.checks.positive_data_acceptance]
    out = {"requests": 0, "status": {}, "failures": [], "per_operation": {}, "no_negative": []}
    with httpx.Client(timeout=60) as client:
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                positive = mode == GenerationMode.POSITIVE

                @_settings(examples)
                @given(op.as_strategy(generation_mode=mode), st.integers(0, 9))
                def one(case, k):
                    if positive and k < 8 and isinstance(case.body, dict):  # negative bodies stay as generated
                        case.body["model"] = "stories260k"
                    if positive and k < 5 and case.path_parameters and "model_id" in case.path_parameters:
                        case.path_parameters["model_id"] = "stories260k"
                    r = case.call(base_url=url, headers=headers, timeout=60)  # a hang fails here
                    out["requests"] += 1
                    out["per_operation"][op.label] = out["per_operation"].get(op.label, 0) + 1
                    out["status"][r.status_code] = out["status"].get(r.status_code, 0) + 1
                    try:
                        case.validate_response(r, headers=headers, excluded_checks=excluded)
                    except Exception as e:  # noqa: BLE001 - every check failure is collected, not just the first
                        out["failures"].append(f"{op.label} [{mode.value}] {r.status_code}: {str(e)[:300]}")

                try:
                    one()
                except Unsatisfiable:  # no invalid request exists (GET /health takes no input)
                    assert not positive, op.label
                    out["no_negative"].append(op.label)
    return out


def test_schemathesis_finds_no_5xx_and_every_response_matches_the_schema(live):
    res = fuzz_server(live.url, live.headers, EXAMPLES)
    assert res["failures"] == []
    assert not any(code >= 500 for code in res["status"]), res["status"]
    assert len(res["per_operation"]) == 6 and min(res["per_operation"].values()) >= 2
    assert res["requests"] >= 6 * EXAMPLES  # at least one mode of every operation ran its full count
    assert res["status"].get(200, 0) > 0 and res["status"].get(400, 0) > 0 and res["status"].get(404, 0) > 0
    m = live.metrics()  # the server still serves, and its books balance
    assert m["slimswarm_active_sequences"] == 0 and m["slimswarm_queue_depth"] == 0
    assert httpx.get(live.url + "/health", timeout=5).status_code == 200


# ------------------------------------------------------------------------------------------------ properties
def _complete(live, **body):
    r = httpx.post(live.url + "/v1/completions", json={"model": "stories260k", "prompt": "Once upon a time", **body},
                   headers=live.headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@given(temperature=st.floats(0, 2), top_p=st.floats(0.05, 1), seed=st.integers(0, 2**63 - 1),
       max_tokens=st.integers(1, 24))
@_settings(max(10, EXAMPLES // 2))
def test_sampling_is_bounded_and_a_seed_repeats_exactly(live, temperature, top_p, seed, max_tokens):
    body = {"temperature": temperature, "top_p": top_p, "seed": seed, "max_tokens": max_tokens, "logprobs": 0}
    a, b = _complete(live, **body), _complete(live, **body)
    assert a["text"] == b["text"] and a["logprobs"]["token_logprobs"] == b["logprobs"]["token_logprobs"]
    n = len(a["logprobs"]["tokens"])
    assert 1 <= n <= max_tokens and a["finish_reason"] in ("stop", "length")
    assert (n == max_tokens) == (a["finish_reason"] == "length") or a["finish_reason"] == "stop"
    assert all(lp <= 1e-6 and math.isfinite(lp) for lp in a["logprobs"]["token_logprobs"])


@given(stop=st.lists(st.sampled_from([" ", "e", "the", ".", "Lily", "\n", "zz", "a d"]), min_size=1, max_size=4,
                     unique=True), max_tokens=st.integers(1, 40))
@_settings(max(10, EXAMPLES // 2))
def test_stop_strings_never_appear_in_the_answer(live, stop, max_tokens):
    full = _complete(live, temperature=0, max_tokens=max_tokens)["text"]
    c = _complete(live, temperature=0, max_tokens=max_tokens, stop=stop)
    assert not any(s in c["text"] for s in stop)
    assert full.startswith(c["text"])  # greedy: the stopped answer is a prefix of the unstopped one
    hit = [full.find(s) for s in stop if s in full]
    if hit and min(hit) < len(full):
        assert c["finish_reason"] == "stop" and c["text"] == full[: min(hit)]


@given(k=st.integers(0, 5), max_tokens=st.integers(1, 12))
@_settings(max(10, EXAMPLES // 2))
def test_top_logprobs_are_sorted_and_greedy_picks_the_top_one(live, k, max_tokens):
    c = _complete(live, temperature=0, max_tokens=max_tokens, logprobs=k)
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) >= 1
    if k == 0:
        assert lp["top_logprobs"] is None
        return
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        vals = list(top.values())
        assert len(vals) <= k and vals == sorted(vals, reverse=True)  # distinct pieces may decode alike
        assert sum(math.exp(v) for v in vals) <= 1 + 1e-4
        assert abs(chosen - vals[0]) < 1e-4  # temperature 0 takes the most likely token


def test_extreme_top_p_and_temperature_sample_the_top_token():
    """Found by the fuzzer above: top_p=5e-324 (0 in float32) dropped every token, and a temperature of 1e-300
    turned logits into inf; both made NaN probabilities and a 500. They now mean what they say: the top token."""
    import torch

    from slimswarm.models.sampling import SamplingParams, sample_next

    logits = torch.randn(512, generator=torch.Generator().manual_seed(0)) * 5
    g = torch.Generator().manual_seed(1)
    for p in (SamplingParams(temperature=1.0, top_p=5e-324), SamplingParams(temperature=1e-300),
              SamplingParams(temperature=1e-30, top_p=1e-30)):
        assert sample_next(logits, p, g) == int(logits.argmax())
