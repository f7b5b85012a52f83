"""The engine: one queue for every agent's requests, one forward per step over all active sequences on one shared
base, whatever their adapter (continuous batching), a prefix cache for shared prompts, streaming and cancellation.

A step admits waiting requests into free cache rows (after copying any cached prefix into each row, the new rows
are prefilled together in one forward), then runs one decode forward over every active row: rows sit at different
positions (per-row ``start``) and may carry different LoRA adapters (per-row adapter ids). Finished, cancelled or timed-out sequences leave between
steps and the last row moves into the freed one, so active rows stay packed at 0..n-1.

Threading: ``submit``/``cancel``/``stats`` may be called from any thread; steps run either in the background
thread (``start``) or in the caller's (``step``/``generate``), never both. The engine owns its KV cache and
installs it in the model only around its own forwards, but two forwards on one model must not overlap.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import SlimswarmError
from ..kernels import native
from ..models.sampling import SamplingParams, sample_next
from .grammar import Grammar, GrammarCompiler, RowGrammar
from .kv import PrefixCache, installed, kv_bytes_per_token, make_caches, move_row


class _OnePerForward(Exception):
    """Internal: this group cannot share one prefill forward."""


class QueueFull(SlimswarmError):
    """The bounded waiting queue is full (the server answers 429)."""


PREFIX_CACHE_BYTES = 256 << 20  # the shared-prefix KV cache's default byte budget (one per engine)


class EngineClosed(SlimswarmError):
    """The engine is stopping or stopped (the server answers 503)."""


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    adapter: str | None = None
    timeout_s: float | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    id: str = ""
    grammar: Grammar | None = None  # constrained decoding: every token is one the grammar allows
    # called from the engine thread with each event ("text", piece) / ("done", reason); must not block
    on_event: Callable[[str, Any], None] | None = field(default=None, repr=False)
    # filled by the engine
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per token: top_logprobs (id, logprob)
    text: str = ""
    finish_reason: str | None = None  # stop | length | cancelled | timeout | error
    grammar_complete: bool = False  # the grammar accepted the whole text (False: cut by max_tokens, a stop string)
    error: str | None = None
    cached_tokens: int = 0
    t_submit: float = 0.0
    t_admit: float | None = None  # its prefill forward began (the queue wait ends)
    t_first: float | None = None
    t_done: float | None = None
    events: "queue.Queue[tuple[str, Any]]" = field(default_factory=queue.Queue, repr=False)
    _cancel: bool = field(default=False, repr=False)
    _sent: int = field(default=0, repr=False)
    _gen: torch.Generator | None = field(default=None, repr=False)
    _row: int = field(default=-1, repr=False)
    _ctx: tuple[list[int], str] | None = field(default=None, repr=False)
    _g: RowGrammar | None = field(default=None, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop this request at the next step; its row is freed."""
        self._cancel = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> "Request":
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout}s")
        if self.finish_reason == "error":
            raise SlimswarmError(f"request {self.id} failed: {self.error}")
        return self

    def stream(self, timeout: float | None = None):
        """Text pieces as they are produced (blocking iterator), ending when the request finishes."""
        while True:
            kind, value = self.events.get(timeout=timeout)
            if kind == "text":
                yield value
            elif kind == "done":
                return

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_submit

    @property
    def latency_s(self) -> float | None:
        return None if self.t_done is None else self.t_done - self.t_submit


class Engine:
    """Continuous batching over one model (float or quantized), optionally with a bank of LoRA adapters."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_len: int = 2048, kv_budget_bytes: int | None = None,
                 prefix_cache_bytes: int = PREFIX_CACHE_BYTES, max_waiting: int = 256, adapters=None):
        if max_batch < 1 or max_waiting < 0:
            raise SlimswarmError(f"max_batch must be >= 1 and max_waiting >= 0, got {max_batch}, {max_waiting}")
        per_token = kv_bytes_per_token(model)
        # RoPE positions past what the model was trained on give garbage, so the context stops there.
        max_len = min(max_len, model.config.max_position_embeddings)
        if kv_budget_bytes is not None:
            fit = kv_budget_bytes // (max_batch * max(per_token, 1))
            if fit < 64:
                raise SlimswarmError(f"kv budget {kv_budget_bytes:,} bytes holds only {fit} tokens a row for "
                                     f"{max_batch} rows ({per_token:,} bytes a token): raise it or lower max_batch")
            max_len = min(max_len, int(fit))
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_len, self.max_waiting = max_batch, max_len, max_waiting
        self.kv_bytes = max_batch * max_len * per_token
        self.vocab_size = model.config.vocab_size
        self.adapters = adapters  # an AdapterBank (compress/lora.py) or None
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.eos = set(tokenizer.eos_ids)
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # active[i] sits in cache row i
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()  # one step at a time; adapter changes wait for the step to end
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._running = False
        self._closed = False
        self.counters = {"submitted": 0, "requests": 0, "finished": 0, "rejected": 0, "cancelled": 0, "timeouts": 0, "errors": 0,
                         "prompt_tokens": 0, "cached_prompt_tokens": 0, "generated_tokens": 0, "steps": 0,
                         "decode_rows": 0, "prefill_s": 0.0, "decode_s": 0.0, "grammar_s": 0.0}
        self.last_batch = 0
        model.eval()
        self.caches = make_caches(model, max_batch, max_len)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size)

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ submitting
    def submit(self, prompt: list[int] | str, params: SamplingParams | None = None, adapter: str | None = None,
               timeout_s: float | None = None, logprobs: bool = False, top_logprobs: int = 0,
               on_event: Callable[[str, Any], None] | None = None, grammar: Grammar | None = None) -> Request:
        """Queue a request; raises QueueFull, EngineClosed, or SlimswarmError for bad input (nothing is queued then;
        a grammar that does not compile raises GrammarError, a SlimswarmError)."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise SlimswarmError("empty prompt")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise SlimswarmError(f"prompt token ids must be in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}")
        if adapter is not None and (self.adapters is None or adapter not in self.adapters):
            known = [] if self.adapters is None else list(self.adapters.names)
            raise SlimswarmError(f"unknown adapter {adapter!r} (loaded: {', '.join(known) or 'none'})")
        if len(ids) + params.max_tokens > self.max_len:
            raise SlimswarmError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} exceeds the "
                                 f"context length of {self.max_len} tokens")
        if not 0 <= top_logprobs <= 20:
            raise SlimswarmError(f"top_logprobs must be in [0, 20], got {top_logprobs}")
        req = Request(ids, params, adapter, timeout_s, logprobs or top_logprobs > 0, top_logprobs,
                      id=f"req-{next(self._ids)}", grammar=grammar, on_event=on_event)
        if grammar is not None:
            req._g = self.grammars.row(grammar)  # compiled (or copied from the cache) here, before queueing
        if params.seed is not None or params.temperature > 0:
            req._gen = torch.Generator(device=self.model.device)
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31, ()).item())
            try:
                req._gen.manual_seed(seed)
            except (ValueError, RuntimeError, OverflowError):
                raise SlimswarmError(f"seed {params.seed} is out of range (-2**63 .. 2**64-1)") from None
        with self._lock:
            if self._closed:
                raise EngineClosed("engine is shut down")
            self.counters["submitted"] += 1  # = requests (accepted) + rejected; = finished + cancelled + timeouts
            if len(self.waiting) >= self.max_waiting:  # + errors + rejected + in flight
                self.counters["rejected"] += 1
                raise QueueFull(f"queue full ({self.max_waiting} waiting)")
            req.t_submit = time.perf_counter()
            self.waiting.append(req)
            self.counters["requests"] += 1
            self._wake.notify()
        return req

    def generate(self, prompts: list[list[int] | str], params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: list[str | None] | None = None,
                 grammars: list[Grammar | None] | None = None) -> list[Request]:
        """Submit all and wait (drives the steps itself when no background thread runs)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        alist = adapters or [None] * len(prompts)
        glist = grammars or [None] * len(prompts)
        reqs = []
        for p, sp, a, g in zip(prompts, plist, alist, glist):
            while True:
                try:
                    reqs.append(self.submit(p, sp, a, grammar=g))
                    break
                except QueueFull:
                    if self._thread is None:
                        self.step()
                    else:
                        time.sleep(0.01)
        if self._thread is None:
            while not all(r.done for r in reqs):
                self.step()
        return [r.wait() for r in reqs]

    def add_adapter(self, name: str, path_or_state) -> None:
        """Load (or replace) an adapter between steps; cached prefixes computed under an old one are dropped."""
        if self.adapters is None:
            raise SlimswarmError("this engine has no adapter bank (pass adapters=AdapterBank(model) at construction)")
        with self._step_lock:
            replaced = name in self.adapters
            self.adapters.add(name, path_or_state)
            if replaced:
                self.prefix.clear()

    # ------------------------------------------------------------------ background loop
    def start(self) -> "Engine":
        if self._closed:
            raise EngineClosed("engine is shut down")
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="slimswarm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Refuse new requests, end the background thread, and cancel whatever is queued or running."""
        with self._lock:
            self._running = False
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            left = list(self.waiting) + list(self.active)
            self.waiting.clear()
        self.active.clear()
        for r in left:
            self._finish(r, "cancelled")

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while self._running and not self.waiting and not self.active:
                    self._wake.wait()
                if not self._running:
                    return
            try:
                self.step()
            except Exception as e:  # step handles request failures itself; this is the last line of defence
                self._fail_active(e)

    def _fail_active(self, e: Exception) -> None:
        for r in self.active:
            if r.finish_reason is None:
                r.error = f"{type(e).__name__}: {e}"
                self._finish(r, "error")
        self.active.clear()

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> bool:
        """Admit what fits, then one decode forward over all active rows. Returns whether work remains."""
        with self._step_lock, installed(self.model, self.caches):
            self._reap()
            with self._lock:
                new = []
                while self.waiting and len(self.active) + len(new) < self.max_batch:
                    new.append(self.waiting.popleft())
            self._admit(new)
            self._reap()
            if self.active:
                self._decode()
                self._reap()
        return bool(self.active or self.waiting)

    def _set_adapters(self, reqs: list[Request]) -> None:
        if self.adapters is not None:
            self.adapters.set_rows([r.adapter for r in reqs])

    def _prefill(self, req: Request) -> None:
        """Prefill ``req`` into the next free row; a failure fails this request only."""
        row = len(self.active)
        req._row = row
        self.active.append(req)
        t0 = req.t_admit = time.perf_counter()
        try:
            hit = self.prefix.load(self.caches, row, req.prompt, req.adapter)
            req.cached_tokens = hit
            self._set_adapters([req])
            x = torch.tensor([req.prompt[hit:]], device=self.model.device)
            logits = self.model(x, hit, None, last_only=True, row0=row)[0, -1]
            self.prefix.store(self.caches, row, req.prompt, req.adapter)
            self.counters["prefill_s"] += time.perf_counter() - t0
            self.counters["prompt_tokens"] += len(req.prompt)
            self.counters["cached_prompt_tokens"] += hit
            self._emit(req, logits)
        except Exception as e:
            req.error = f"{type(e).__name__}: {e}"
            self._finish(req, "error")

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill new requests, batched; a request whose first prompt block is not cached yet but is shared with
        an earlier one waits for that one's forward, so it reuses the blocks instead of computing them again."""
        while reqs:
            now, later, seen = [], [], set()
            for r in reqs:
                k = self.prefix.first_key(r.prompt, r.adapter)
                if k is not None and k not in self.prefix and k in seen:
                    later.append(r)
                else:
                    now.append(r)
                    seen.add(k)
            if len(now) > 1:
                self._prefill_many(now)
            else:
                self._prefill(now[0])
            reqs = later

    def _prefill_many(self, reqs: list[Request]) -> None:
        """Prefill several new requests in one forward (rows right-padded to the longest uncached part).

        One forward instead of one each reads the weights once (a quantized base dequantizes them once). Padded
        positions write KV past their row's end, where the row's own decode overwrites it before it is attended.
        Any failure falls back to one forward per request, so a bad request fails alone."""
        row0 = len(self.active)
        t0 = time.perf_counter()
        for r in reqs:
            r.t_admit = t0
        try:
            hits = [self.prefix.load(self.caches, row0 + i, r.prompt, r.adapter) for i, r in enumerate(reqs)]
            rest = [r.prompt[h:] for r, h in zip(reqs, hits)]
            t = max(len(x) for x in rest)
            if max(hits) + t > self.max_len:
                raise _OnePerForward
            dev = self.model.device
            step = native.prefill_step(self.model) if dev.type == "cpu" else None
            if step is not None:
                # the native step packs every row's uncached positions into shared calls of 32 (a short suffix
                # after a cached system prompt does not stream the weights alone)
                self._set_adapters(reqs)
                logits = step.prefill_rows(self.model, rest, hits, None, [row0 + i for i in range(len(reqs))],
                                           step.lora_slots(len(reqs)))
            else:
                x = torch.zeros(len(reqs), t, dtype=torch.long, device=dev)
                for i, ids in enumerate(rest):
                    x[i, : len(ids)] = torch.tensor(ids, device=dev)
                self._set_adapters(reqs)
                h = self.model(x, torch.tensor(hits, device=dev), None, hidden_only=True, row0=row0)
                last = torch.tensor([len(ids) - 1 for ids in rest], device=dev)
                logits = self.model.lm_head(h[torch.arange(len(reqs), device=dev), last])
        except Exception:
            for r in reqs:
                self._prefill(r)
            return
        self.counters["prefill_s"] += time.perf_counter() - t0
        for i, (req, hit) in enumerate(zip(reqs, hits)):
            req._row = row0 + i
            req.cached_tokens = hit
            self.active.append(req)
            try:
                self.prefix.store(self.caches, row0 + i, req.prompt, req.adapter)
                self.counters["prompt_tokens"] += len(req.prompt)
                self.counters["cached_prompt_tokens"] += hit
                self._emit(req, logits[i])
            except Exception as e:
                req.error = f"{type(e).__name__}: {e}"
                self._finish(req, "error")

    def _decode(self) -> None:
        reqs = self.active
        dev = self.model.device
        t0 = time.perf_counter()
        try:
            toks = torch.tensor([[r.tokens[-1]] for r in reqs], device=dev)
            # the last sampled token is not in the cache yet: it goes to slot prompt + tokens - 1
            start = torch.tensor([len(r.prompt) + len(r.tokens) - 1 for r in reqs], device=dev)
            self._set_adapters(reqs)
            logits = self.model(toks, start, None, last_only=True, row0=0)[:, -1]
            greedy = native.argmax_rows(logits)
        except Exception as e:  # the forward cannot say which row broke it: every row in it fails
            self._fail_active(e)
            return
        self.counters["decode_s"] += time.perf_counter() - t0
        self.counters["steps"] += 1
        self.counters["decode_rows"] += len(reqs)
        self.last_batch = len(reqs)
        for i, r in enumerate(reqs):
            if r.finish_reason is None:
                try:
                    self._emit(r, logits[i], greedy[i])
                except Exception as e:
                    r.error = f"{type(e).__name__}: {e}"
                    self._finish(r, "error")

    def _emit(self, req: Request, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Sample one token for ``req`` and check its stop conditions."""
        p = req.params
        if req._g is not None:  # the grammar's mask goes on this row's logits (in place) before the pick
            t0 = time.perf_counter()
            sample = None if p.temperature == 0 else (lambda x: sample_next(x, p, req._gen))
            tok = req._g.choose(logits, sample, greedy)
            self.counters["grammar_s"] += time.perf_counter() - t0
        elif p.temperature == 0:
            tok = greedy if greedy is not None else int(torch.argmax(logits))
        else:
            tok = sample_next(logits, p, req._gen)
        if req.t_first is None:
            req.t_first = time.perf_counter()
        if tok in self.eos:
            req.grammar_complete = req._g is not None  # a grammar allows end-of-sequence only where it is complete
            self._finish(req, "stop")
            return
        req.tokens.append(tok)
        if req._g is not None:
            t0 = time.perf_counter()
            done = req._g.accept(tok)
            self.counters["grammar_s"] += time.perf_counter() - t0
        else:
            done = False
        if req.logprobs:
            lp = torch.log_softmax(logits.float(), -1)
            req.token_logprobs.append(float(lp[tok]))
            if req.top_logprobs:
                v, i = torch.topk(lp, req.top_logprobs)
                # under a grammar fewer tokens than asked for may be allowed: -inf is no alternative (nor JSON)
                req.top.append([(a, b) for a, b in zip(i.tolist(), v.tolist()) if b != float("-inf")])
        self.counters["generated_tokens"] += 1
        text = self._detokenize(req)
        if p.stop:
            cuts = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if cuts:
                req.text = text[: min(cuts)]
                self._finish(req, "stop")
                return
        req.text = text
        if done:  # the grammar is complete: end here rather than spend a forward on the forced end-of-sequence
            req.grammar_complete = True
            self._finish(req, "stop")
            return
        if len(req.tokens) >= p.max_tokens:
            self._finish(req, "length")
            return
        # stream what can no longer change: hold back a possible stop-string prefix and a partial character
        hold = max((len(s) - 1 for s in p.stop), default=0)
        safe = len(text) - hold
        while safe > req._sent and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > req._sent:
            self._put(req, "text", text[req._sent : safe])
            req._sent = safe

    def _detokenize(self, req: Request) -> str:
        """The generated text as it reads after the prompt: decoded behind a few prompt tokens, because
        SentencePiece tokenizers drop the leading space of a sequence's first word ("Lily" + "was")."""
        if req._ctx is None:
            ctx = req.prompt[-4:]
            req._ctx = (ctx, self.tokenizer.decode(ctx))
        ctx, head = req._ctx
        full = self.tokenizer.decode(ctx + req.tokens)
        return full[len(head):] if full.startswith(head) else self.tokenizer.decode(req.tokens)

    def _put(self, req: Request, kind: str, value: Any) -> None:
        req.events.put((kind, value))
        if req.on_event is not None:
            try:
                req.on_event(kind, value)
            except Exception:  # a listener that went away (closed event loop) must not break the engine
                req.on_event = None

    def _finish(self, req: Request, reason: str) -> None:
        if req.done:
            return
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        if len(req.text) > req._sent and reason not in ("cancelled", "error"):
            self._put(req, "text", req.text[req._sent :])
            req._sent = len(req.text)
        key = {"cancelled": "cancelled", "timeout": "timeouts", "error": "errors"}.get(reason, "finished")
        self.counters[key] += 1
        req._done.set()
        self._put(req, "done", reason)

    def _reap(self) -> None:
        """Drop finished/cancelled/timed-out rows (moving the last row into each hole) and expired waiting ones."""
        now = time.perf_counter()
        with self._lock:
            expired = [r for r in self.waiting
                       if r._cancel or (r.timeout_s is not None and now - r.t_submit > r.timeout_s)]
            for r in expired:
                self.waiting.remove(r)
        for r in expired:
            self._finish(r, "cancelled" if r._cancel else "timeout")
        i = 0
        while i < len(self.active):
            r = self.active[i]
            if r.finish_reason is None:
                if r._cancel:
                    self._finish(r, "cancelled")
                elif r.timeout_s is not None and now - r.t_submit > r.timeout_s:
                    self._finish(r, "timeout")
            if r.finish_reason is None:
                i += 1
                continue
            last = self.active.pop()
            if last is not r and last.finish_reason is not None:
                self.active[i] = last  # finished too: no copy, the loop drops it next
            elif last is not r:
                # slots 0 .. prompt + tokens - 2 hold KV; the last token is written by the next decode
                move_row(self.caches, len(self.active), i, len(last.prompt) + len(last.tokens) - 1)
                last._row = i
                self.active[i] = last

    # ------------------------------------------------------------------ metrics
    def stats(self) -> dict:
        c = dict(self.counters)
        c.update(self.prefix.stats())
        c.update(queue_depth=len(self.waiting), active=len(self.active), batch_size=self.last_batch,
                 max_batch=self.max_batch, max_len=self.max_len, max_waiting=self.max_waiting,
                 kv_cache_bytes=self.kv_bytes, running=self._thread is not None and self._thread.is_alive(),
                 decode_tokens_per_s=c["decode_rows"] / c["decode_s"] if c["decode_s"] else 0.0)
        return c
