"""OpenAI-compatible HTTP in front of one Engine: chat and text completions (streamed or not), models, health, metrics.

The engine runs in its own background thread; request handlers only validate, tokenize, ``submit`` (which
refuses at once when the queue is full) and then await the engine's events, handed to the event loop with
``call_soon_threadsafe``, so a thousand waiting clients cost no threads. Every refusal happens before anything is
queued, and a client that goes away cancels its request, so bad or abandoned requests never hold a batch row.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from ..errors import SlimswarmError
from ..models.sampling import SamplingParams
from .chat_plan import plan_chat
from .engine import Engine, EngineClosed, QueueFull
from .grammar import GrammarError
from .tools import ToolCallParser, openai_tool_calls

DEFAULT_MAX_TOKENS = 512
MAX_BODY_BYTES = 1 << 20


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


def _error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    # clients send fields we do not use (user, metadata, ...): accepted and ignored, as OpenAI's own server does
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int = 1
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # accepted; the chat template has no place for it
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for p in self.content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ValueError(f"content part of type {p.get('type')!r} is not supported (text only)")
                parts.append(p["text"])
            return "".join(parts)
        return self.content or ""


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = True
    response_format: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = None


def _body_schema(cls) -> dict:
    """An OpenAPI requestBody for a handler that reads its JSON itself (size limit first, then validation): the
    pydantic schema with its definitions inlined, so /openapi.json documents, and fuzzers can exercise, every field."""
    schema = cls.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}},
            "responses": {"200": {"content": {"text/event-stream": {"schema": _SSE_EVENT}}},
                          **{str(code): r for code, r in _error_responses().items()}}}


def _error_responses() -> dict:
    """Every status a handler may answer with besides 200, each in OpenAI's error shape (documented in /openapi.json)."""
    error = {"description": "An OpenAI-shaped error", "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    return {code: error for code in _TYPES}


_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}  # one data: line
_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server would answer anyone who can reach ``host`` without a key; None on loopback."""
    import ipaddress

    if api_key:
        return None
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"binding {host} without --api-key: anyone who can reach this address can use the model "
            "(set --api-key or $SLIMSWARM_API_KEY, or bind 127.0.0.1)")


def _parse(cls, data: Any):
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ApiError(400, f"{loc}: {err['msg']}", "invalid_value", loc or None) from None


# ---------------------------------------------------------------------------------------------- the app
def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, request_timeout_s: float | None = 600.0) -> FastAPI:
    """The FastAPI app serving ``engine`` as model ``model_name`` (and each of its adapters under its own name)."""
    app = FastAPI(title="slimswarm", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.engine = engine
    created = int(time.time())
    tok = engine.tokenizer

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(_error_body(e.status, e.message, e.code, e.param), e.status, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return JSONResponse(_error_body(500, f"internal error: {type(e).__name__}: {e}"), 500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), api_key.encode())):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "invalid_api_key")

    async def read_json(request: Request) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise ApiError(413, f"request body of {int(size):,} bytes exceeds the limit of {max_body_bytes:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {max_body_bytes:,} bytes")
        try:
            return json.loads(body)
        except UnicodeDecodeError:
            raise ApiError(400, "request body is not UTF-8") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None

    def adapter_for(name: str) -> str | None:
        if name == model_name:
            return None
        if engine.adapters is not None and name in engine.adapters:
            return name
        raise ApiError(404, f"model {name!r} not found (serving: {', '.join(model_ids())})", "model_not_found", "model")

    def model_ids() -> list[str]:
        return [model_name] + (list(engine.adapters.names) if engine.adapters is not None else [])

    def sampling(body: _Body, prompt_len: int, max_tokens: int | None, default: int | None = None) -> SamplingParams:
        if body.n != 1:
            raise ApiError(400, f"n={body.n} is not supported (n=1 only)", "unsupported_value", "n")
        ctx = engine.max_len
        if prompt_len >= ctx:
            raise ApiError(400, f"prompt of {prompt_len} tokens does not fit the context length of {ctx} tokens",
                           "context_length_exceeded", "messages")
        if max_tokens is None:
            max_tokens = min(default or default_max_tokens, ctx - prompt_len)
        elif prompt_len + max_tokens > ctx:
            raise ApiError(400, f"prompt of {prompt_len} tokens + max_tokens {max_tokens} exceeds the context "
                                f"length of {ctx} tokens", "context_length_exceeded", "max_tokens")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  seed=body.seed, stop=list(body.stop or []))
        except SlimswarmError as e:
            raise ApiError(400, str(e), "invalid_value") from None

    def submit(ids: list[int], params: SamplingParams, adapter: str | None, top: int, logprobs: bool, grammar=None):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(kind, value):  # engine thread → event loop
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        try:
            req = engine.submit(ids, params, adapter, request_timeout_s, logprobs, top, on_event, grammar)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", "queue_full") from None
        except EngineClosed as e:
            raise ApiError(503, str(e), "engine_closed") from None
        except SlimswarmError as e:
            raise ApiError(400, str(e), "invalid_value") from None
        return req, events

    def failure(req) -> ApiError | None:
        if req.finish_reason == "timeout":
            return ApiError(504, f"request timed out after {request_timeout_s}s", "timeout")
        if req.finish_reason == "cancelled":
            return ApiError(503, "request cancelled: the engine is shutting down", "engine_closed")
        if req.finish_reason == "error":
            return ApiError(500, f"generation failed: {req.error}", "generation_error")
        return None

    async def wait_done(request: Request, req, events: asyncio.Queue) -> None:
        """Until the engine finishes ``req`` (raising its ApiError when it failed); a client that hangs up cancels it."""
        await _until_done(request, req, events)
        err = failure(req)
        if err is not None:
            raise err

    async def _until_done(request: Request, req, events: asyncio.Queue) -> None:
        try:
            while True:
                try:
                    kind, _ = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if req.done:  # belt and braces: never wait on an event that a timed-out get() swallowed
                        return
                    if await request.is_disconnected():
                        req.cancel()
                        return
                    continue
                if kind == "done":
                    return
        finally:
            if not req.done:
                req.cancel()

    def usage(req) -> dict:
        n, k = len(req.prompt), len(req.tokens)
        return {"prompt_tokens": n, "completion_tokens": k, "total_tokens": n + k,
                "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}

    def piece(i: int) -> str:
        return tok.decode([i])

    def chat_logprobs(req, lo: int, hi: int) -> dict:
        content = []
        for j in range(lo, hi):
            t = piece(req.tokens[j])
            entry = {"token": t, "logprob": req.token_logprobs[j], "bytes": list(t.encode()), "top_logprobs": []}
            if req.top_logprobs:
                entry["top_logprobs"] = [{"token": piece(a), "logprob": b, "bytes": list(piece(a).encode())}
                                         for a, b in req.top[j]]
            content.append(entry)
        return {"content": content}

    def completion_logprobs(req, lo: int, hi: int) -> dict:
        toks = [piece(t) for t in req.tokens[lo:hi]]
        out = {"tokens": toks, "token_logprobs": req.token_logprobs[lo:hi], "top_logprobs": None, "text_offset": []}
        if req.top_logprobs:
            out["top_logprobs"] = [{piece(a): b for a, b in req.top[j]} for j in range(lo, hi)]
        return out

    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def stream(request: Request, req, events, make_chunk, include_usage: bool, base: dict):
        async def gen():
            sent_tokens = 0
            try:
                first = make_chunk("", None, None, first=True)
                if first is not None:
                    yield sse({**base, **first})
                # a chunk maker may answer one engine event with several chunks (a list), or none (None/[])
                def chunks(x):
                    return [] if x is None else x if isinstance(x, list) else [x]

                while True:
                    kind, value = await events.get()
                    if kind == "done":
                        break
                    hi = len(req.tokens)
                    lp = (sent_tokens, hi) if req.logprobs else None
                    sent_tokens = hi
                    for c in chunks(make_chunk(value, None, lp)):
                        yield sse({**base, **c})
                err = failure(req)
                if err is not None:
                    yield sse(_error_body(err.status, err.message, err.code))
                else:
                    hi = len(req.tokens)
                    lp = (sent_tokens, hi) if req.logprobs and hi > sent_tokens else None
                    for c in chunks(make_chunk("", req.finish_reason, lp)):
                        yield sse({**base, **c})
                    if include_usage:
                        yield sse({**base, "choices": [], "usage": usage(req)})
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the task is cancelled) or the stream ended: free the row either way
                if not req.done:
                    req.cancel()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(gen(), media_type="text/event-stream", headers=headers)

    def tool_chunks(req, parser: ToolCallParser):
        """Chat chunks for a reply that may hold tool calls: content deltas, or per call a first delta with index,
        id and name, then argument fragments; finish_reason "tool_calls" when the calls completed."""
        state = {"text": ""}

        def one(delta, finish=None, lp=None):
            return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                 "logprobs": chat_logprobs(req, *lp) if lp else None}]}

        def chunk(text, finish, lp, first=False):
            if first:
                return one({"role": "assistant", "content": None})
            state["text"] += text
            out = []
            for ev in parser.feed(state["text"], final=finish is not None):
                if ev[0] == "content":
                    out.append(one({"content": ev[1]}))
                elif ev[0] == "call":
                    out.append(one({"tool_calls": [{"index": ev[1], "id": ev[2], "type": "function",
                                                    "function": {"name": ev[3], "arguments": ""}}]}))
                else:
                    out.append(one({"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]}))
            if finish is not None:
                if finish == "stop" and parser.mode == "calls" and req.grammar_complete:
                    finish = "tool_calls"
                out.append(one({}, finish, lp))
            elif lp and out:
                out[-1] = one(out[-1]["choices"][0]["delta"], None, lp)
            return out

        return chunk

    # ------------------------------------------------------------------------------------------ endpoints
    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatBody))
    async def chat_completions(request: Request):
        check_key(request)
        body = _parse(ChatBody, await read_json(request))
        adapter = adapter_for(body.model)
        try:
            messages = [{"role": m.role, "content": m.text(), "tool_calls": m.tool_calls,
                         "tool_call_id": m.tool_call_id} for m in body.messages]
            plan = plan_chat(messages, body.tools, body.tool_choice, body.parallel_tool_calls, body.response_format,
                             engine.grammars.compile)
        except GrammarError as e:  # ToolSpecError included: it names its field
            raise ApiError(400, str(e), "invalid_value", getattr(e, "param", None)) from None
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", "invalid_value", "messages") from None
        try:
            ids = tok.encode(tok.chat(plan.messages))
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", "invalid_value", "messages") from None
        except Exception as e:  # a chat template rejecting the conversation (roles out of order, ...)
            raise ApiError(400, f"messages: the chat template rejected them: {e}", "invalid_value",
                           "messages") from None
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens disagree: send one", "invalid_value")
        params = sampling(body, len(ids), body.max_completion_tokens or body.max_tokens)
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
        req, events = submit(ids, params, adapter, body.top_logprobs or 0, body.logprobs, plan.grammar)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": body.model}
        if body.stream:
            if plan.tools is not None:
                chunk = tool_chunks(req, ToolCallParser())
            else:
                def chunk(text, finish, lp, first=False):
                    delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                         "logprobs": chat_logprobs(req, *lp) if lp else None}]}

            opts = body.stream_options or {}
            return stream(request, req, events, chunk, bool(opts.get("include_usage")), base)
        await wait_done(request, req, events)
        message, finish = {"role": "assistant", "content": req.text}, req.finish_reason
        if plan.tools is not None:
            content, calls = ToolCallParser().finish(req.text)
            if calls:  # cut by max_tokens, the calls so far (the last one unfinished) and "length", as streamed
                message = {"role": "assistant", "content": None, "tool_calls": openai_tool_calls(calls)}
                finish = "tool_calls" if req.grammar_complete else req.finish_reason
        choice = {"index": 0, "message": message, "finish_reason": finish,
                  "logprobs": chat_logprobs(req, 0, len(req.tokens)) if req.logprobs else None}
        return {"id": rid, "object": "chat.completion", "created": now, "model": body.model,
                "choices": [choice], "usage": usage(req), "system_fingerprint": None}

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionBody))
    async def completions(request: Request):
        check_key(request)
        body = _parse(CompletionBody, await read_json(request))
        adapter = adapter_for(body.model)
        if body.echo or body.suffix or (body.best_of or 1) != 1:
            raise ApiError(400, "echo, suffix and best_of are not supported", "unsupported_value")
        p = body.prompt
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            ids = list(p)
        elif isinstance(p, list):
            if len(p) != 1:
                raise ApiError(400, f"prompt: one prompt a request, got {len(p)}", "unsupported_value", "prompt")
            ids = tok.encode(p[0])
        else:
            ids = tok.encode(p)
        if not ids:
            raise ApiError(400, "prompt: empty", "invalid_value", "prompt")
        if min(ids) < 0 or max(ids) >= engine.vocab_size:
            raise ApiError(400, f"prompt: token ids must be in [0, {engine.vocab_size})", "invalid_value", "prompt")
        params = sampling(body, len(ids), body.max_tokens, default=16)  # OpenAI's default for text completions
        top = body.logprobs or 0
        req, events = submit(ids, params, adapter, top, body.logprobs is not None)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": body.model}
        if body.stream:
            def chunk(text, finish, lp, first=False):
                if first:
                    return None
                return {"choices": [{"index": 0, "text": text, "finish_reason": finish,
                                     "logprobs": completion_logprobs(req, *lp) if lp else None}]}

            opts = body.stream_options or {}
            return stream(request, req, events, chunk, bool(opts.get("include_usage")), base)
        await wait_done(request, req, events)
        choice = {"index": 0, "text": req.text, "finish_reason": req.finish_reason,
                  "logprobs": completion_logprobs(req, 0, len(req.tokens)) if req.logprobs else None}
        return {"id": rid, "object": "text_completion", "created": now, "model": body.model,
                "choices": [choice], "usage": usage(req)}

    def model_card(m: str) -> dict:
        return {"id": m, "object": "model", "created": created, "owned_by": "slimswarm",
                **({"parent": model_name} if m != model_name else {})}

    @app.get("/v1/models", responses=_error_responses())
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card(m) for m in model_ids()]}

    @app.get("/v1/models/{model_id}", responses=_error_responses())
    async def model(request: Request, model_id: str):
        check_key(request)
        adapter_for(model_id)  # 404 when unknown
        return model_card(model_id)

    @app.get("/health", responses=_error_responses())
    async def health():
        s = engine.stats()
        ok = s["running"] and not engine.closed
        body = {"status": "ok" if ok else "unavailable", "model": model_name, "active": s["active"],
                "queue_depth": s["queue_depth"]}
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics", responses=_error_responses(), response_class=PlainTextResponse)
    async def metrics(request: Request):
        check_key(request)
        return PlainTextResponse(prometheus_text(engine.stats()), media_type="text/plain; version=0.0.4")

    return app


_METRICS = [  # (name, type, help, stats key)
    ("slimswarm_queue_depth", "gauge", "Requests waiting for a batch row.", "queue_depth"),
    ("slimswarm_active_sequences", "gauge", "Sequences in the running batch.", "active"),
    ("slimswarm_batch_size", "gauge", "Rows in the last decode step.", "batch_size"),
    ("slimswarm_max_batch", "gauge", "Batch rows the engine has.", "max_batch"),
    ("slimswarm_requests_submitted_total", "counter", "Requests that reached the queue (accepted or rejected).",
     "submitted"),
    ("slimswarm_requests_total", "counter", "Requests accepted.", "requests"),
    ("slimswarm_requests_finished_total", "counter", "Requests finished normally.", "finished"),
    ("slimswarm_requests_rejected_total", "counter", "Requests refused because the queue was full.", "rejected"),
    ("slimswarm_requests_cancelled_total", "counter", "Requests cancelled (client gone, shutdown).", "cancelled"),
    ("slimswarm_requests_timeout_total", "counter", "Requests that ran out of time.", "timeouts"),
    ("slimswarm_requests_error_total", "counter", "Requests that failed.", "errors"),
    ("slimswarm_prompt_tokens_total", "counter", "Prompt tokens prefilled or reused.", "prompt_tokens"),
    ("slimswarm_generated_tokens_total", "counter", "Tokens generated.", "generated_tokens"),
    ("slimswarm_decode_tokens_per_second", "gauge", "Decode throughput over all decode steps.", "decode_tokens_per_s"),
    ("slimswarm_prefix_cache_hits_total", "counter", "Prompts that reused cached prefix blocks.", "prefix_cache_hits"),
    ("slimswarm_prefix_cache_hit_tokens_total", "counter", "Prompt tokens reused from the prefix cache.",
     "prefix_cache_hit_tokens"),
    ("slimswarm_prefix_cache_bytes", "gauge", "Bytes held by the prefix cache.", "prefix_cache_bytes"),
    ("slimswarm_prefix_cache_budget_bytes", "gauge", "The prefix cache's byte budget.", "prefix_cache_budget_bytes"),
    ("slimswarm_kv_cache_bytes", "gauge", "Bytes of the engine's KV cache.", "kv_cache_bytes"),
]


def prometheus_text(stats: dict) -> str:
    """The engine's counters in the Prometheus text exposition format."""
    lines = []
    for name, kind, help_, key in _METRICS:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {float(stats.get(key, 0)):g}"]
    return "\n".join(lines) + "\n"


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "warning", **app_kw) -> None:
    """Start the engine's thread and serve until interrupted; the engine is stopped on the way out."""
    import uvicorn

    app = create_app(engine, model_name, api_key, **app_kw)
    engine.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.stop()
