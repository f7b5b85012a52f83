"""deploy/ray_serve.py: `slimswarm serve --ray` — the OpenAI-compatible server (engine/server.py, unchanged) in
front of engine replicas on a Ray cluster, through an object that answers the server as an Engine would."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ..engine.engine import EngineClosed, QueueFull
from ..errors import SlimswarmError
from ..models.sampling import SamplingParams


class _AdapterNames:
    """What the server asks of ``engine.adapters``: the names, and ``name in``."""

    def __init__(self, names):
        self.names = list(names)

    def __contains__(self, name) -> bool:
        return name in self.names


@dataclass
class RemoteRequest:
    """The fields of an engine Request the server reads, filled in when a replica answers (in one piece: the
    text streams as a single chunk, since the replica returns the whole answer)."""
    prompt: list[int]
    logprobs: bool = False
    top_logprobs: int = 0
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int = 0
    route: dict | None = None
    t_submit: float = 0.0
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel: bool = False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._cancel = True


class ReplicaFront:
    """Engine-shaped view of the replicas of one model: ``submit`` picks a replica (least outstanding calls,
    re-submission when its node dies), answers QueueFull when every replica is full, EngineClosed after stop()."""

    def __init__(self, backend, model_key: str):
        import ray

        self.backend, self.model_key = backend, model_key
        reps = [r for r in backend.pool.replicas if r.model_key == model_key]
        if not reps:
            raise SlimswarmError(f"serve --ray: no replica serves model {model_key!r}")
        info = reps[0].info
        self.max_len, self.vocab_size = info["max_len"], info["vocab_size"]
        self.adapters = _AdapterNames(info["adapters"]) if info["adapters"] else None
        self.tokenizer = ray.get(reps[0].handle.tokenizer.remote())
        self._closed = False
        self._n = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> "ReplicaFront":
        return self

    def stop(self) -> None:
        self._closed = True
        self.backend.close()

    def submit(self, ids, params: SamplingParams | None = None, adapter=None, timeout_s=None, logprobs=False,
               top_logprobs=0, on_event=None) -> RemoteRequest:
        params = params or SamplingParams()
        if self._closed:
            raise EngineClosed("engine is shut down")
        if adapter is not None and (self.adapters is None or adapter not in self.adapters):
            raise SlimswarmError(f"unknown adapter {adapter!r}")
        if len(ids) + params.max_tokens > self.max_len:
            raise SlimswarmError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} exceeds the "
                                 f"context length of {self.max_len} tokens")
        if not self.backend.pool.has_room(self.model_key):
            raise QueueFull("every replica's queue is full")
        req = RemoteRequest(list(ids), logprobs or top_logprobs > 0, top_logprobs, t_submit=time.perf_counter())
        self._n += 1
        args = (list(ids), dict(params.__dict__), adapter, req.logprobs, top_logprobs)
        threading.Thread(target=self._run, args=(req, args, timeout_s, on_event), daemon=True,
                         name=f"ray-front-{self._n}").start()
        return req

    def _run(self, req: RemoteRequest, args, timeout_s, on_event) -> None:
        try:
            out, req.route = self.backend.call(self.model_key, args[2] or "", "generate_ids", *args,
                                               timeout_s=timeout_s)
            req.tokens, req.text, req.cached_tokens = out["tokens"], out["text"], out["cached_tokens"]
            req.token_logprobs = out["logprobs"] or []
            req.top = [[tuple(x) for x in t] for t in out["top"]]
            req.finish_reason = "cancelled" if req._cancel else out["finish_reason"]
        except Exception as e:
            req.error = str(e)
            req.finish_reason = "timeout" if "within" in str(e) else "error"
        req._done.set()
        if on_event is not None:
            try:
                if req.text and req.finish_reason not in ("error", "cancelled"):
                    on_event("text", req.text)
                on_event("done", req.finish_reason)
            except Exception:  # a client that went away
                pass

    def stats(self) -> dict:
        """Every replica's engine counters summed (so /metrics and /health read as for one engine)."""
        rows = [r for r in self.backend.pool.stats() if r.get("error") is None and r.get("model") == self.model_key]
        keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out = {k: sum(r.get(k, 0) for r in rows) for k in keys}
        for k in ("active", "queue_depth"):
            out.setdefault(k, 0)
        out.update(running=bool(rows) and not self._closed, replicas=len(rows))
        return out


def cmd_serve_ray(args, name: str, adapters: dict, api_key: str | None) -> int:
    """`slimswarm serve MODEL --ray [auto|ADDRESS]`: replicas of MODEL (``--replicas``, ``--resources``) on the
    cluster, the same HTTP API in front of them."""
    import sys

    from ..agents.config import ModelSpec
    from ..engine.server import serve
    from .ray_backend import RayBackend
    from .ray_runtime import ReplicaPlan, ReplicaPool, connect

    resources = {}
    for item in args.resources or []:
        k, sep, v = item.partition("=")
        try:
            resources[k] = float(v) if sep else 1.0
        except ValueError:
            raise SlimswarmError(f"--resources {item!r}: expected NAME=AMOUNT") from None
    if args.replicas < 1:
        raise SlimswarmError(f"--replicas must be >= 1, got {args.replicas}")
    spec = ModelSpec(base=args.model, adapters=adapters, dtype=args.dtype, max_batch=args.max_batch,
                     max_len=args.max_len).model_dump()
    connect(args.ray)
    plans = [ReplicaPlan("default", spec, resources, args.num_cpus, None, args.max_waiting)
             for _ in range(args.replicas)]
    pool = ReplicaPool.launch(plans)
    for f in pool.failed:
        print(f"slimswarm: replica {f['name']} failed to load: {f['error']} (the others serve)", file=sys.stderr)
    front = ReplicaFront(RayBackend(pool, timeout_s=600.0), "default")
    print(f"slimswarm: serving {', '.join([name, *adapters])} on http://{args.host}:{args.port}/v1 from "
          f"{len(pool.replicas)} Ray replicas (context {front.max_len}, "
          f"{'API key required' if api_key else 'no API key'})", file=sys.stderr)
    serve(front, name, args.host, args.port, api_key)
    return 0
