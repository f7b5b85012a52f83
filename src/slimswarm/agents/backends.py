"""Backends: the one door agents reach models through (local Engine, OpenAI-compatible HTTP, scripted, replay)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import SlimswarmError
from ..models.sampling import SamplingParams
from .message import Message, as_chat


class BackendError(SlimswarmError):
    """A call failed (timeout, connection, dead engine, bad reply): the task fails, the run goes on."""


class ReplayDivergence(SlimswarmError):
    """A replayed run asked for a call that the recorded trace does not hold."""


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    logprobs: list[float] | None = None  # one log-probability per generated token, when asked for
    finish_reason: str | None = None
    route: dict | None = None  # where a distributed backend served it: replica, node, retries before it
    # structured tool calls, OpenAI's shape: [{"id", "type": "function", "function": {"name", "arguments"}}]
    tool_calls: list[dict] | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Backend:
    """``generate(messages, params, *, agent=None) -> Completion``; must be safe to call from many threads.

    Backends with ``structured = True`` also take ``structured={"tools", "tool_choice", "response_format"}``
    (OpenAI's fields) and decode under the grammar they imply; the others ignore it (text protocol)."""

    name = "backend"
    structured = False

    def generate(self, messages: list[Message], params: SamplingParams, *, agent=None, task_id: str | None = None,
                 logprobs: bool = False, structured: dict | None = None) -> Completion:
        raise NotImplementedError

    def model_label(self, agent) -> str:
        return agent.model.label() if agent is not None else "default"

    def close(self) -> None:
        pass


def _words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------------------------------------- local engine
class EngineBackend(Backend):
    """slimswarm Engines (one per named base model, e.g. fp32 and int4), started in the background.

    Each call blocks its own thread on ``request.wait()``; calls from concurrent threads sit in the same engine
    queue, so the engine decodes them in one batch whatever their adapter.
    """

    name = "engine"

    def __init__(self, engines, timeout_s: float | None = 120.0, default: str | None = None):
        self.engines = engines if isinstance(engines, dict) else {"default": engines}
        self.default = default or next(iter(self.engines))
        self.timeout_s = timeout_s
        for e in self.engines.values():
            e.start()

    def engine_for(self, agent):
        key = agent.model.base if agent is not None and agent.model.base else self.default
        if key not in self.engines:
            raise SlimswarmError(f"agent {agent.name}: model {key!r} is not loaded (have: {', '.join(self.engines)})")
        return self.engines[key]

    structured = True

    def generate(self, messages, params, *, agent=None, task_id=None, logprobs=False, structured=None) -> Completion:
        from ..engine.chat_plan import plan_chat
        from ..engine.grammar import GrammarError
        from ..engine.tools import ToolCallParser, openai_tool_calls

        eng = self.engine_for(agent)
        viewer = agent.name if agent is not None else None
        chat, grammar, tools = as_chat(messages, viewer), None, None
        if structured:
            try:
                plan = plan_chat(chat, structured.get("tools"), structured.get("tool_choice"),
                                 structured.get("parallel_tool_calls") is not False,
                                 structured.get("response_format"), eng.grammars.compile)
            except GrammarError as e:
                raise BackendError(f"engine: {e}") from None
            chat, grammar, tools = plan.messages, plan.grammar, plan.tools
        ids = eng.tokenizer.encode(eng.tokenizer.chat(chat))
        room = eng.max_len - len(ids)
        if room < 1:
            raise BackendError(f"prompt of {len(ids)} tokens does not fit the engine context of {eng.max_len}")
        if params.max_tokens > room:  # shorten the answer rather than fail the call on a small context
            params = SamplingParams(**{**params.__dict__, "max_tokens": room})
        adapter = agent.model.adapter if agent is not None else None
        try:
            req = eng.submit(ids, params, adapter=adapter, timeout_s=self.timeout_s, logprobs=logprobs,
                             grammar=grammar)
            # the engine enforces timeout_s itself; the extra wait bound catches an engine thread that died
            req.wait(None if self.timeout_s is None else self.timeout_s + 30)
        except (SlimswarmError, TimeoutError) as e:
            raise BackendError(f"engine: {e}") from None
        if req.finish_reason in ("timeout", "cancelled"):
            raise BackendError(f"engine: request {req.finish_reason} after {req.latency_s:.1f}s")
        calls = None
        if tools is not None:
            _, parsed = ToolCallParser().finish(req.text)
            calls = openai_tool_calls(parsed) if parsed and req.grammar_complete else None
        return Completion(req.text, len(ids), len(req.tokens), req.cached_tokens, req.latency_s or 0.0, req.ttft_s,
                          list(req.token_logprobs) if logprobs else None, req.finish_reason, calls)

    def model_label(self, agent) -> str:
        from pathlib import Path

        eng = self.engine_for(agent)
        src = getattr(eng, "source", None)  # set by runner.load_engine
        if src is None:
            return super().model_label(agent)
        recipe = getattr(eng, "recipe", None)
        return Path(str(src)).name + (f"@{recipe}" if recipe else "") + \
            (f"+{agent.model.adapter}" if agent is not None and agent.model.adapter else "")

    def kv_bytes_per_token(self, agent) -> int:
        from ..engine.kv import kv_bytes_per_token

        return kv_bytes_per_token(self.engine_for(agent).model)

    def close(self) -> None:
        for e in self.engines.values():
            e.stop()


# ---------------------------------------------------------------------------------------------- HTTP
class HTTPBackend(Backend):
    """Any OpenAI-compatible server: POST {base_url}/v1/chat/completions. The model name sent is the agent's
    adapter (servers expose each adapter as a model), else its base model's name; ``model`` overrides both."""

    name = "http"

    def __init__(self, base_url: str, model: str | None = None, timeout_s: float = 60.0, api_key: str | None = None,
                 client=None, names: dict[str, str] | None = None):
        import httpx

        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.model = model
        self.names = names or {}  # team model key -> the name the server knows it by
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout_s, headers=headers)

    def model_name(self, agent) -> str:
        if self.model:
            return self.model
        if agent is not None and (agent.model.adapter or agent.model.base):
            return agent.model.adapter or self.names.get(agent.model.base, agent.model.base)
        return "default"

    def model_label(self, agent) -> str:
        return f"{self.base_url}:{self.model_name(agent)}"

    structured = True

    def generate(self, messages, params, *, agent=None, task_id=None, logprobs=False, structured=None) -> Completion:
        import httpx

        viewer = agent.name if agent is not None else None
        body: dict[str, Any] = {"model": self.model_name(agent), "messages": as_chat(messages, viewer),
                                "max_tokens": params.max_tokens, "temperature": params.temperature,
                                "top_p": params.top_p}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = params.stop
        if logprobs:
            body["logprobs"] = True
        for k, v in (structured or {}).items():
            if v is not None:
                body[k] = v
        t0 = time.perf_counter()
        try:
            r = self.client.post(f"{self.base_url}/v1/chat/completions", json=body)
        except httpx.TimeoutException:
            raise BackendError(f"{self.base_url}: timed out after {time.perf_counter() - t0:.1f}s") from None
        except httpx.HTTPError as e:
            raise BackendError(f"{self.base_url}: {type(e).__name__}: {e}") from None
        latency = time.perf_counter() - t0
        if r.status_code != 200:
            raise BackendError(f"{self.base_url}: HTTP {r.status_code}: {r.text[:200]}")
        try:
            data = r.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            calls = choice["message"].get("tool_calls") or None
        except (ValueError, KeyError, IndexError, TypeError):
            raise BackendError(f"{self.base_url}: not an OpenAI chat completion: {r.text[:200]}") from None
        usage = data.get("usage") or {}
        lps = None
        if logprobs and choice.get("logprobs"):
            lps = [float(t["logprob"]) for t in choice["logprobs"].get("content") or []]
        cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
        return Completion(text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                          int(cached), latency, None, lps, choice.get("finish_reason"), calls)

    def close(self) -> None:
        self.client.close()


class RoutedBackend(Backend):
    """A default backend plus named remote endpoints: agents whose model names an endpoint go there."""

    def __init__(self, default: Backend, endpoints: dict[str, Backend]):
        self.default, self.endpoints = default, endpoints
        self.name = default.name

    def pick(self, agent) -> Backend:
        if agent is not None and agent.model.endpoint:
            if agent.model.endpoint not in self.endpoints:
                raise SlimswarmError(f"agent {agent.name}: unknown endpoint {agent.model.endpoint!r}")
            return self.endpoints[agent.model.endpoint]
        return self.default

    def generate(self, messages, params, **kw) -> Completion:
        b = self.pick(kw.get("agent"))
        if not b.structured:
            kw.pop("structured", None)
        return b.generate(messages, params, **kw)

    def structured_for(self, agent) -> bool:
        return self.pick(agent).structured

    def model_label(self, agent) -> str:
        return self.pick(agent).model_label(agent)

    def __getattr__(self, item):  # kv_bytes_per_token and friends come from the default backend
        return getattr(self.default, item)

    def close(self) -> None:
        for b in [self.default, *self.endpoints.values()]:
            b.close()


# ---------------------------------------------------------------------------------------------- scripted
Reply = Any  # str | Completion | Exception | Callable[[list[Message]], str | Completion]


@dataclass
class Rule:
    """Reply ``reply`` to ``agent`` ("*" for any) when the last user message contains ``contains``/matches ``regex``.
    A string reply may quote that message as ``{input}`` (a scripted critic echoing what it checks)."""

    reply: Reply
    agent: str = "*"
    contains: str | None = None
    regex: str | None = None

    def matches(self, agent: str, text: str) -> bool:
        if self.agent not in ("*", agent):
            return False
        if self.contains is not None and self.contains.lower() not in text.lower():
            return False
        if self.regex is not None and not re.search(self.regex, text):
            return False
        return True


class ScriptedBackend(Backend):
    """Deterministic replies for tests and dry runs: a function ``(agent_name, messages) -> reply``, or rules.

    Rules: a dict {agent: reply} / {(agent, substring): reply}, or a list of Rule / dicts with keys
    agent, contains, regex, reply; first match wins; ``default`` answers the rest (None: an error). A reply that
    is an Exception is raised (to simulate a failing backend); a callable gets the messages. Tokens are words.
    """

    name = "scripted"

    def __init__(self, rules: Callable | dict | list | None = None, default: Reply = None, delay_s: float = 0.0):
        self.fn = rules if callable(rules) else None
        self.rules: list[Rule] = []
        if isinstance(rules, dict):
            for k, v in rules.items():
                agent, sub = k if isinstance(k, tuple) else (k, None)
                self.rules.append(Rule(v, agent, sub))
        elif isinstance(rules, list):
            self.rules = [r if isinstance(r, Rule) else Rule(**r) for r in rules]
        self.default = default
        self.delay_s = delay_s
        self.calls: list[tuple[str, str]] = []  # (agent, last user text), for tests
        self._lock = threading.Lock()

    def _reply(self, agent: str, messages: list[Message]) -> Reply:
        if self.fn is not None:
            return self.fn(agent, messages)
        text = messages[-1].content if messages else ""
        for r in self.rules:
            if r.matches(agent, text):
                return r.reply
        if self.default is None:
            raise BackendError(f"scripted: no rule for agent {agent} on {text[:60]!r}")
        return self.default

    def generate(self, messages, params, *, agent=None, task_id=None, logprobs=False, structured=None) -> Completion:
        name = agent.name if agent is not None else "*"
        t0 = time.perf_counter()
        with self._lock:
            self.calls.append((name, messages[-1].content if messages else ""))
        if self.delay_s:
            time.sleep(self.delay_s)
        reply = self._reply(name, messages)
        if callable(reply) and not isinstance(reply, type):
            reply = reply(messages)
        if isinstance(reply, str) and "{input}" in reply:
            reply = reply.replace("{input}", messages[-1].content if messages else "")
        if isinstance(reply, BaseException):
            raise reply if isinstance(reply, BackendError) else BackendError(f"scripted: {reply}")
        if isinstance(reply, Completion):
            return reply
        text = str(reply)
        n = max(1, _words(text))
        return Completion(text, sum(_words(m.content) for m in messages), n, 0, time.perf_counter() - t0, 0.0,
                          [-0.1] * n if logprobs else None, "stop")


# ---------------------------------------------------------------------------------------------- replay
class ReplayBackend(Backend):
    """Serves the replies of a recorded trace, per (task, agent) in recorded order, with no model.

    Threads may reach an agent's calls in another order than the recording did, so each call takes the first
    unused recorded call of that (task, agent) whose messages equal its own; none → ReplayDivergence.
    A recorded failure replays as the same BackendError.
    """

    name = "replay"

    def __init__(self, records: list[dict]):
        self.queues: dict[tuple[str | None, str], list[dict]] = defaultdict(list)
        self.labels: dict[str, str] = {}
        for r in records:
            if r.get("type", "call") == "call":
                self.queues[(r.get("task"), r["agent"])].append(r)
                self.labels.setdefault(r["agent"], r.get("model", "replay"))
        self.used: dict[tuple[str | None, str], set[int]] = defaultdict(set)
        self.structured_agents = {r["agent"] for r in records if r.get("type", "call") == "call" and r.get("structured")}
        self._lock = threading.Lock()

    def model_label(self, agent) -> str:
        return self.labels.get(agent.name, "replay") if agent is not None else "replay"

    def structured_for(self, agent) -> bool:
        """Whether the recorded run decoded this agent's calls under grammars: the replay takes the same path."""
        name = agent.name if agent is not None else "*"
        return name in self.structured_agents

    def generate(self, messages, params, *, agent=None, task_id=None, logprobs=False, structured=None) -> Completion:
        name = agent.name if agent is not None else "*"
        key = (task_id, name)
        want = [m.to_dict() for m in messages]
        with self._lock:
            recorded = self.queues.get(key, [])
            n = len(self.used[key])
            for i, r in enumerate(recorded):
                if i not in self.used[key] and r["messages"] == want:
                    self.used[key].add(i)
                    break
            else:
                nxt = next((r for i, r in enumerate(recorded) if i not in self.used[key]), None)
                why = "the trace has no more calls for it" if nxt is None else \
                    f"its messages differ from the recorded call (recorded last message: {nxt['messages'][-1]['content'][:80]!r})"
                raise ReplayDivergence(f"replay diverged: task {task_id}, agent {name}, call #{n}: {why}")
        if r.get("error"):
            raise BackendError(r["error"])
        return Completion(r["reply"], r.get("prompt_tokens", 0), r.get("completion_tokens", 0),
                          r.get("cached_tokens", 0), r.get("latency_s", 0.0), r.get("ttft_s"), r.get("logprobs"),
                          r.get("finish_reason"), r.get("tool_calls"))

    def unused(self) -> int:
        return sum(len(q) - len(self.used[k]) for k, q in self.queues.items())


def load_jsonl(path) -> list[dict]:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise SlimswarmError(f"{p}: no such file")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SlimswarmError(f"{p}:{i}: invalid JSON ({e.msg})") from None
    return out
