"""The OpenAI-compatible server: the official client for chat, completions, streaming and models; httpx for refusals,
a 200-client burst, and a client that hangs up mid-stream."""

import asyncio
import copy
import json
import socket
import threading
import time

import httpx
import pytest
import torch

from slimswarm.engine.engine import Engine
from slimswarm.engine.server import create_app
from slimswarm.models.generate import generate_ids
from slimswarm.models.sampling import SamplingParams

KEY = "sk-test-key"
CHAT = [{"role": "user", "content": "Once upon a time there was a little dog"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adapter_state(model, seed):
    from slimswarm.compress.lora import LoRAConfig, target_modules

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, lin in target_modules(model, ["*_proj"]).items():
        sd[f"{name}.lora_A"] = torch.randn(4, lin.in_features, generator=g) * 0.2
        sd[f"{name}.lora_B"] = torch.randn(lin.out_features, 4, generator=g) * 0.2
    return LoRAConfig(r=4, alpha=8), sd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Running:
    def __init__(self, engine, **kw):
        import uvicorn

        self.engine = engine.start()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(engine, "stories260k", **kw)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 30, "server did not start"
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()


@pytest.fixture(scope="module")
def server(stories):
    from slimswarm.compress.lora import AdapterBank

    model = copy.deepcopy(stories.model)  # the engine thread runs forwards: keep it off the shared model
    bank = AdapterBank(model, {"poet": _adapter_state(model, 1)})
    eng = Engine(model, stories.tokenizer, max_batch=4, max_len=256, max_waiting=8, adapters=bank)
    run = _Running(eng, api_key=KEY, max_body_bytes=64 << 10, request_timeout_s=120)
    yield run
    run.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def _reference(loaded, text, max_tokens, adapter_model=None, adapter=None):
    tok = loaded.tokenizer
    model = loaded.model
    if adapter_model is not None:
        model, bank = adapter_model
        bank.set_rows([adapter])
    ids = tok.encode(text)
    c = generate_ids(model, [ids], SamplingParams(max_tokens=max_tokens), tok.eos_ids, tok.pad_id, tok)[0]
    # the server reports the text as it reads after the prompt (a leading space kept)
    c.text = tok.decode(ids + c.tokens)[len(tok.decode(ids)):]
    return c


def test_chat_completion_with_the_openai_client_equals_local_greedy(client, stories):
    ref = _reference(stories, stories.tokenizer.chat(CHAT), 20)
    r = client.chat.completions.create(model="stories260k", messages=CHAT, temperature=0, max_tokens=20)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if len(ref.tokens) == 20 else "stop")
    assert r.usage.completion_tokens == len(ref.tokens) and r.usage.prompt_tokens == ref.prompt_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    again = client.chat.completions.create(model="stories260k", messages=CHAT, temperature=0,
                                           max_completion_tokens=20)
    assert again.choices[0].message.content == ref.text
    assert again.usage.prompt_tokens_details.cached_tokens == (ref.prompt_tokens - 1) // 16 * 16


def test_text_completion_and_stop_string(client, stories):
    ref = _reference(stories, "The little dog ran to the park and saw a big", 24)
    r = client.completions.create(model="stories260k", prompt="The little dog ran to the park and saw a big",
                                  temperature=0, max_tokens=24)
    assert r.choices[0].text == ref.text and r.object == "text_completion"
    stop = ref.text[10:14]
    cut = client.completions.create(model="stories260k", prompt="The little dog ran to the park and saw a big",
                                    temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].text == ref.text[: ref.text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_streamed_chat_adds_up_to_the_whole_answer_and_reports_usage(client, stories):
    ref = _reference(stories, stories.tokenizer.chat(CHAT), 30)
    chunks = list(client.chat.completions.create(model="stories260k", messages=CHAT, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if len(ref.tokens) == 30 else "stop"]
    assert chunks[-1].usage.completion_tokens == len(ref.tokens) and not chunks[-1].choices
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done_marker(server):
    body = {"model": "stories260k", "prompt": "Lily", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=_auth(), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_lists_the_base_and_each_adapter_and_adapters_change_the_answer(client, server, stories):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["stories260k", "poet"]
    assert client.models.retrieve("poet").parent == "stories260k"
    assert httpx.get(server.url + "/v1/models/nope", headers=_auth(), timeout=30).status_code == 404
    model = copy.deepcopy(stories.model)
    from slimswarm.compress.lora import AdapterBank

    bank = AdapterBank(model, {"poet": _adapter_state(model, 1)})
    prompt = stories.tokenizer.chat(CHAT)
    ref = _reference(stories, prompt, 16, (model, bank), "poet")
    base = _reference(stories, prompt, 16)
    assert ref.tokens != base.tokens
    r = client.chat.completions.create(model="poet", messages=CHAT, temperature=0, max_tokens=16)
    assert r.choices[0].message.content == ref.text and r.model == "poet"


def test_seeded_sampling_repeats_and_logprobs_come_back(client):
    kw = dict(model="stories260k", messages=CHAT, temperature=1.0, top_p=0.9, max_tokens=20, seed=42)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    r = client.chat.completions.create(model="stories260k", messages=CHAT, temperature=0, max_tokens=6,
                                       logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp)
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in lp)


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": "stories260k"}, 400, "messages"),
    ({"model": "nope", "messages": CHAT}, 404, "not found"),
    ({"model": "stories260k", "messages": CHAT, "temperature": -1}, 400, "temperature"),
    ({"model": "stories260k", "messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ({"model": "stories260k", "messages": CHAT, "top_p": 0}, 400, "top_p"),
    ({"model": "stories260k", "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "stories260k", "messages": CHAT, "n": 2}, 400, "n=2"),
    ({"model": "stories260k", "messages": CHAT, "stream": "yes"}, 400, "stream"),
    ({"model": "stories260k", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "stories260k", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "stories260k", "messages": CHAT, "max_tokens": 250}, 400, "context length of 256"),
    ({"model": "stories260k", "messages": [{"role": "user", "content": "dog " * 400}]}, 400, "context length of 256"),
    ({"model": "stories260k", "messages": CHAT, "top_logprobs": 3}, 400, "logprobs"),
    ({"model": "stories260k", "messages": CHAT, "seed": 2**64}, 400, "seed"),
    ({"model": "stories260k", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text only"),
])
def test_bad_requests_are_refused_with_a_reason(server, body, status, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", headers=_auth(), timeout=30, **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_completion_refusals(server):
    def post(body):
        return httpx.post(server.url + "/v1/completions", json={"model": "stories260k", **body}, headers=_auth(),
                          timeout=30)

    assert post({"prompt": ["a", "b"]}).status_code == 400
    assert post({"prompt": [1, 2, 100000]}).status_code == 400
    assert post({"prompt": "Lily", "echo": True}).status_code == 400
    assert post({"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0}).status_code == 200


def test_api_key_body_limit_and_open_health(server):
    url = server.url + "/v1/chat/completions"
    body = {"model": "stories260k", "messages": CHAT, "max_tokens": 2}
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    big = {"model": "stories260k", "messages": [{"role": "user", "content": "x" * (70 << 10)}]}
    r = httpx.post(url, json=big, headers=_auth(), timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    h = httpx.get(server.url + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok"


def test_metrics_are_prometheus_text(server, client):
    client.chat.completions.create(model="stories260k", messages=CHAT, temperature=0, max_tokens=4)
    r = httpx.get(server.url + "/metrics", headers=_auth(), timeout=30)
    assert r.status_code == 200
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in r.text.splitlines() if ln and not ln.startswith("#")}
    for name in ("slimswarm_queue_depth", "slimswarm_active_sequences", "slimswarm_requests_total",
                 "slimswarm_generated_tokens_total", "slimswarm_decode_tokens_per_second",
                 "slimswarm_prefix_cache_hits_total"):
        assert name in vals
    assert vals["slimswarm_requests_total"] >= 1 and vals["slimswarm_generated_tokens_total"] >= 4


def _wait_idle(engine, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        s = engine.stats()
        if s["active"] == 0 and s["queue_depth"] == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {engine.stats()}")


def test_client_hanging_up_mid_stream_frees_its_row(server):
    before = server.engine.stats()["cancelled"]
    body = {"model": "stories260k", "messages": CHAT, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/chat/completions", json=body, headers=_auth()) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                got += bool(line)
                if got >= 3:
                    break  # leaving the block closes the connection mid-stream
    s = _wait_idle(server.engine)
    assert s["cancelled"] == before + 1


def test_200_concurrent_clients_are_each_answered_and_the_server_still_serves(server, client):
    async def burst():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            async def one(i):
                body = {"model": "poet" if i % 3 == 0 else "stories260k", "messages": CHAT, "max_tokens": 12,
                        "temperature": 0.7, "seed": i, "stream": i % 5 == 0}
                r = await c.post(server.url + "/v1/chat/completions", json=body, headers=_auth())
                return r.status_code, r.text

            return await asyncio.gather(*(one(i) for i in range(200)))

    t0 = time.time()
    results = asyncio.run(burst())
    codes = [c for c, _ in results]
    assert len(codes) == 200 and set(codes) <= {200, 429, 503}, set(codes)
    assert codes.count(200) >= 8 and time.time() - t0 < 120
    print("burst:", {k: codes.count(k) for k in set(codes)}, f"{time.time() - t0:.1f}s")
    for code, text in results:
        if code == 429:
            assert json.loads(text)["error"]["code"] == "queue_full"
        elif code == 200 and text.startswith("data:"):
            assert text.rstrip().endswith("data: [DONE]")
    s = _wait_idle(server.engine)
    assert s["rejected"] >= codes.count(429)
    r = client.chat.completions.create(model="stories260k", messages=CHAT, temperature=0, max_tokens=5)
    assert r.usage.completion_tokens >= 1


def test_stopped_engine_answers_503(stories):
    from fastapi.testclient import TestClient

    eng = Engine(copy.deepcopy(stories.model), stories.tokenizer, max_batch=1, max_len=128)
    eng.start()
    eng.stop()
    with TestClient(create_app(eng, "stories260k")) as c:
        r = c.post("/v1/chat/completions", json={"model": "stories260k", "messages": CHAT, "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_closed"
        assert c.get("/health").status_code == 503


def test_request_running_out_of_time_answers_504(stories):
    from fastapi.testclient import TestClient

    eng = Engine(copy.deepcopy(stories.model), stories.tokenizer, max_batch=1, max_len=128).start()
    try:
        with TestClient(create_app(eng, "stories260k", request_timeout_s=0.0)) as c:
            r = c.post("/v1/chat/completions", json={"model": "stories260k", "messages": CHAT, "max_tokens": 50})
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert eng.stats()["timeouts"] == 1 and eng.stats()["active"] == 0
    finally:
        eng.stop()


def test_a_team_over_http_gives_the_same_answers_as_on_the_local_engine(server):
    """Agents never call a model directly: the same team on our server (HTTP) and on the engine agrees token for token."""
    from slimswarm.agents.backends import EngineBackend, HTTPBackend
    from slimswarm.agents.config import build_team, parse_config
    from slimswarm.agents.runner import run_tasks

    cfg = parse_config({
        "name": "pair", "model": {"base": "stories260k", "adapters": {"poet": "(already in the server and engine)"}},
        "agents": [{"name": "poet", "adapter": "poet", "params": {"max_tokens": 8}},
                   {"name": "plain", "system": "Tell a story.", "params": {"max_tokens": 8}}],
        "teams": [{"name": "chain", "topology": "pipeline", "members": ["poet", "plain"]}],
        "main": "chain",
    }, "test team")
    tasks = [{"id": str(i), "input": t, "expected": None}
             for i, t in enumerate(["Once upon a time", "The cat sat", "Lily went to the park"])]
    names = {k: "stories260k" for k in cfg.models}
    over_http = run_tasks(build_team(cfg), tasks, HTTPBackend(server.url, api_key=KEY, names=names), parallel=3)
    local = run_tasks(build_team(cfg), tasks, EngineBackend(server.engine), parallel=3)
    assert [r.status for r in over_http.tasks] == ["ok"] * 3, [r.error for r in over_http.tasks]
    assert [r.output for r in over_http.tasks] == [r.output for r in local.tasks]
    assert all(r.output for r in local.tasks)
