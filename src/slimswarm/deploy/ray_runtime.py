"""deploy/ray_runtime.py: engine replicas as Ray actors — joining (or starting) a cluster, placing replicas by
resources, load balancing with back-pressure, replica health (dead nodes, restarts), and the cluster's status view.

An ``EngineReplica`` owns one Engine (a team file's model spec: any MODEL form or slimswarm checkpoint, its LoRA
adapter bank, max_batch/max_len, its bounded queue). It is an async actor: every call awaits its own engine request,
so one replica has many calls in flight and its engine batches them. ``ReplicaPool`` is the caller's view: which
replicas serve which model, how many calls each has outstanding, which are up. A replica whose node died is marked
down; a health thread pings it and brings it back once Ray has restarted it somewhere (``max_restarts``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..errors import SlimswarmError

NAMESPACE = "slimswarm"  # replicas are named actors here, so `slimswarm cluster status` finds them
_PREFIX = "replica:"


# ---------------------------------------------------------------------------------------------- the cluster
def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A one-line error for a Ray address nothing answers on, before Ray spends a minute retrying."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise SlimswarmError(f"--ray {address!r}: expected auto or HOST:PORT of a Ray head (e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise SlimswarmError(f"--ray {address}: cannot reach a Ray head there ({e.strerror or e})") from None


def connect(address: str | None = "auto") -> None:
    """Join the Ray cluster at ``address`` (HOST:PORT or ray://HOST:PORT), or for ``auto``/None the one started on
    this machine by ``ray start``, else a new local one (no dashboard, no usage stats). Already connected: no-op."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    explicit = address not in (None, "", "auto", "local")
    if explicit:
        _check_reachable(address)
    import ray

    if ray.is_initialized():
        return
    kw = dict(namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    if explicit:
        ray.init(address=address, **kw)
        return
    try:
        ray.init(address="auto", **kw)
    except ConnectionError:  # none running: start one in this process's session
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **kw)


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_placeable(resources: dict[str, float], num_cpus: float, where: str) -> None:
    """Raise (one line) when no live node offers ``resources`` and ``num_cpus`` at once."""
    nodes = alive_nodes()
    need = {"CPU": num_cpus, **resources} if num_cpus else dict(resources)
    for n in nodes:
        have = n.get("Resources", {})
        if all(have.get(k, 0) >= v for k, v in need.items()):
            return
    offered = sorted({k for n in nodes for k in n.get("Resources", {}) if not k.startswith("node:")})
    want = ", ".join(f"{k}={v:g}" for k, v in need.items())
    raise SlimswarmError(f"{where}: no node of the Ray cluster has {want} (nodes offer: {', '.join(offered)})")


# ---------------------------------------------------------------------------------------------- the actor
class EngineReplica:
    """One Engine on one Ray node (wrapped by ``ray.remote`` in ``replica_actor``)."""

    def __init__(self, name: str, model_key: str, spec: dict, max_waiting: int = 64, threads: int = 1,
                 ignore_eos: bool = False):
        import ray
        import torch

        ctx = ray.get_runtime_context()
        self.name, self.model_key, self.base = name, model_key, spec.get("base")
        self.node_id, self.pid = ctx.get_node_id(), os.getpid()
        self.restarted = bool(ctx.was_current_actor_reconstructed)
        self.engine, self.error, self.label = None, None, str(self.base)
        self.started = time.time()
        torch.set_num_threads(max(1, threads))
        try:  # a model that fails to load is reported (path, error) by ready(); the replica serves nothing
            from pathlib import Path

            from ..agents.config import ModelSpec
            from ..agents.runner import load_engine

            eng = load_engine(ModelSpec(**spec))
            eng.max_waiting = max_waiting
            if ignore_eos:  # fixed-length answers, for benchmarks that must compare equal work
                eng.eos = set()
            self.engine = eng.start()
            self.label = Path(str(eng.source)).name + (f"@{eng.recipe}" if eng.recipe else "")
        except Exception as e:
            self.error = f"model {self.base}: {type(e).__name__}: {e}"

    def _info(self) -> dict:
        adapters = list(self.engine.adapters.names) if self.engine is not None and self.engine.adapters else []
        eng = self.engine
        return {"name": self.name, "model": self.model_key, "ok": self.error is None, "error": self.error,
                "node": self.node_id, "pid": self.pid, "restarted": self.restarted, "label": self.label,
                "adapters": adapters, "max_len": eng.max_len if eng else None,
                "vocab_size": eng.vocab_size if eng else None}

    async def ready(self) -> dict:
        return self._info()

    async def generate(self, chat: list[dict], params: dict, adapter: str | None, logprobs: bool,
                       timeout_s: float | None) -> dict:
        """One chat call on this replica's engine; errors come back as {"error", "kind"} (kind: queue_full,
        closed, bad_request, timeout, failed) so the caller decides whether another replica may retry it."""
        eng = self.engine
        if eng is None:
            return {"error": self.error, "kind": "closed"}
        ids = eng.tokenizer.encode(eng.tokenizer.chat(chat))
        room = eng.max_len - len(ids)
        if room < 1:
            return {"error": f"prompt of {len(ids)} tokens does not fit the engine context of {eng.max_len}",
                    "kind": "bad_request"}
        params = {**params, "max_tokens": min(params["max_tokens"], room)}
        return await self.generate_ids(ids, params, adapter, logprobs, 0, timeout_s)

    async def generate_ids(self, ids: list[int], params: dict, adapter: str | None, logprobs: bool,
                           top_logprobs: int, timeout_s: float | None) -> dict:
        """The same on token ids (the HTTP front tokenizes itself), with the engine's per-token detail."""
        from ..engine.engine import EngineClosed, QueueFull
        from ..models.sampling import SamplingParams

        eng = self.engine
        if eng is None:
            return {"error": self.error, "kind": "closed"}
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_event(kind, value):  # engine thread -> this actor's event loop
            if kind == "done":
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(value))

        try:
            req = eng.submit(ids, SamplingParams(**params), adapter=adapter, timeout_s=timeout_s, logprobs=logprobs,
                             top_logprobs=top_logprobs, on_event=on_event)
        except QueueFull as e:
            return {"error": f"replica {self.name}: {e}", "kind": "queue_full"}
        except EngineClosed as e:
            return {"error": f"replica {self.name}: {e}", "kind": "closed"}
        except SlimswarmError as e:
            return {"error": str(e), "kind": "bad_request"}
        try:
            await done
        except asyncio.CancelledError:  # the caller gave up (ray.cancel): free the row
            req.cancel()
            raise
        if req.finish_reason in ("timeout", "cancelled", "error"):
            kind = "timeout" if req.finish_reason == "timeout" else "failed"
            return {"error": f"replica {self.name}: request {req.finish_reason}"
                             + (f": {req.error}" if req.error else f" after {req.latency_s:.1f}s"), "kind": kind}
        return {"text": req.text, "prompt_tokens": len(ids), "completion_tokens": len(req.tokens),
                "cached_tokens": req.cached_tokens, "latency_s": req.latency_s or 0.0, "ttft_s": req.ttft_s,
                "logprobs": list(req.token_logprobs) if logprobs else None, "finish_reason": req.finish_reason,
                "tokens": list(req.tokens), "top": [list(t) for t in req.top],
                "replica": self.name, "node": self.node_id}

    async def tokenizer(self):
        """This replica's tokenizer, for an HTTP front that must tokenize as the engine does."""
        return self.engine.tokenizer if self.engine is not None else None

    async def stats(self) -> dict:
        """Engine counters plus where this replica runs and the memory of its process and node."""
        import psutil

        vm = psutil.virtual_memory()
        out = {**self._info(), "rss_bytes": psutil.Process().memory_info().rss, "node_memory_total_bytes": vm.total,
               "node_memory_used_bytes": vm.total - vm.available, "uptime_s": time.time() - self.started}
        if self.engine is not None:
            out.update(self.engine.stats())
        return out

    async def ping(self) -> dict:
        return {"node": self.node_id, "pid": self.pid}

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()


_ACTOR = None


def replica_actor():
    """The Ray actor class of EngineReplica (made on first use, so importing this module does not import Ray)."""
    global _ACTOR
    if _ACTOR is None:
        import ray

        _ACTOR = ray.remote(EngineReplica)
    return _ACTOR


# ---------------------------------------------------------------------------------------------- the pool
@dataclass
class ReplicaPlan:
    """One replica to start: which team model it serves, the model spec it loads, and how Ray places it."""
    model_key: str
    spec: dict  # agents.config.ModelSpec fields
    resources: dict[str, float] = field(default_factory=dict)
    num_cpus: float = 1.0
    threads: int | None = None
    max_waiting: int = 64
    max_restarts: int = 3
    ignore_eos: bool = False  # benchmarks: every answer runs to max_tokens


@dataclass(eq=False)
class Replica:
    name: str
    model_key: str
    handle: object
    capacity: int  # max_batch + max_waiting: more outstanding calls than this would only be refused
    node: str = ""
    label: str = ""
    up: bool = True
    outstanding: int = 0
    served: int = 0
    failures: int = 0
    restarts: int = 0
    last_error: str | None = None
    info: dict = field(default_factory=dict)  # what ready() said: adapters, max_len, vocab_size, ...
    _ping: object = None


def plans_from_config(cfg) -> list[ReplicaPlan]:
    """A team config's ``deploy:`` section as replica plans (a model without an entry gets one replica)."""
    from ..agents.config import ReplicaSetSpec

    from pathlib import Path

    def absolute(p: str) -> str:  # a replica's working folder is not the caller's: local paths go absolute
        return str(Path(p).resolve()) if Path(p).exists() else p

    plans = []
    for key, spec in cfg.models.items():
        rs = cfg.deploy.models.get(key, ReplicaSetSpec())
        d = spec.model_dump()
        d["base"] = absolute(d["base"])
        d["adapters"] = {k: absolute(v) for k, v in d["adapters"].items()}
        if d.get("compress"):
            d["compress"] = absolute(d["compress"])
        plans += [ReplicaPlan(key, d, dict(rs.resources), rs.num_cpus, rs.threads, rs.max_waiting,
                              cfg.deploy.max_restarts) for _ in range(rs.replicas)]
    return plans


class ReplicaPool:
    """The replicas serving each team model; picks one per call, tracks outstanding calls and health."""

    def __init__(self, replicas: list[Replica], failed: list[dict] | None = None, health_period_s: float = 0.5,
                 affinity_slack: int = 2):
        self.replicas = replicas
        self.failed = failed or []  # {"name", "model", "error"} of replicas that could not load their model
        self.affinity_slack = affinity_slack
        self._affinity: dict[tuple[str, str], str] = {}
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._period = health_period_s
        self._health = threading.Thread(target=self._watch, name="slimswarm-ray-health", daemon=True)
        self._health.start()

    # ------------------------------------------------------------------ starting
    @classmethod
    def launch(cls, plans: list[ReplicaPlan], load_timeout_s: float = 900.0, run_id: str | None = None,
               **kw) -> "ReplicaPool":
        """Start every planned replica (checking first that some node can hold each), wait until each has loaded
        its model; a replica that failed to load is reported in ``failed`` and removed, the others serve (whether
        every model an agent needs still has a replica is RayBackend.check's question)."""
        import ray

        for p in plans:
            check_placeable(p.resources, p.num_cpus, f"deploy.models.{p.model_key}.resources")
        need: dict[str, float] = {}
        for p in plans:
            for k, v in p.resources.items():
                need[k] = need.get(k, 0) + v
        total = ray.cluster_resources()
        for k, v in need.items():
            if v > total.get(k, 0):
                raise SlimswarmError(f"deploy: the replicas need {k}={v:g} in all, the Ray cluster has "
                                     f"{total.get(k, 0):g}")
        run_id = run_id or uuid.uuid4().hex[:8]
        actor = replica_actor()
        started = []
        count: dict[str, int] = {}
        for p in plans:
            i = count[p.model_key] = count.get(p.model_key, -1) + 1
            name = f"{p.model_key}/{i}"
            threads = p.threads or max(1, int(p.num_cpus))
            h = actor.options(name=f"{_PREFIX}{run_id}:{name}", namespace=NAMESPACE, num_cpus=p.num_cpus,
                              resources=p.resources or None, max_restarts=p.max_restarts, max_task_retries=0,
                              max_concurrency=1000).remote(name, p.model_key, p.spec, p.max_waiting, threads,
                                                           p.ignore_eos)
            started.append((p, name, h))
        refs = [h.ready.remote() for _, _, h in started]
        t_end = time.perf_counter() + load_timeout_s
        replicas, failed = [], []
        for (p, name, h), ref in zip(started, refs):
            try:  # an actor that cannot even be created (slimswarm missing on its node, ...) fails alone too
                info = ray.get(ref, timeout=max(0.0, t_end - time.perf_counter()))
            except Exception as e:
                if isinstance(e, ray.exceptions.GetTimeoutError):
                    why = f"did not load within {load_timeout_s:g}s"
                else:
                    why = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
                info = {"ok": False, "error": f"model {p.spec.get('base')}: {why}"}
            if info["ok"]:
                cap = int(p.spec.get("max_batch", 8)) + p.max_waiting
                replicas.append(Replica(name, p.model_key, h, cap, info["node"], info["label"], info=info))
            else:
                failed.append({"name": name, "model": p.model_key, "error": info["error"]})
                ray.kill(h, no_restart=True)
        if not replicas:
            errs = "; ".join(f"{f['name']}: {f['error']}" for f in failed)
            raise SlimswarmError(f"no replica loaded its model ({errs})")
        return cls(replicas, failed, **kw)

    # ------------------------------------------------------------------ routing
    def models(self) -> set[str]:
        return {r.model_key for r in self.replicas}

    def has_room(self, model_key: str) -> bool:
        with self._cv:
            return any(r.model_key == model_key and r.up and r.outstanding < r.capacity for r in self.replicas)

    def label(self, model_key: str) -> str:
        return next((r.label for r in self.replicas if r.model_key == model_key), model_key)

    def acquire(self, model_key: str, affinity: str, deadline: float) -> Replica | None:
        """A replica of ``model_key`` with room (least outstanding calls; the one that last served ``affinity``
        when it is within ``affinity_slack`` of the least, so its prefix cache is reused), waiting while every
        replica is full or down; None once ``deadline`` (perf_counter) passes."""
        with self._cv:
            while True:
                up = [r for r in self.replicas if r.model_key == model_key and r.up and r.outstanding < r.capacity]
                if up:
                    least = min(r.outstanding for r in up)
                    sticky = self._affinity.get((model_key, affinity))
                    pick = next((r for r in up if r.name == sticky and r.outstanding <= least + self.affinity_slack),
                                None)
                    if pick is None:
                        pick = min(up, key=lambda r: (r.outstanding, r.served))
                    self._affinity[(model_key, affinity)] = pick.name
                    pick.outstanding += 1
                    return pick
                left = deadline - time.perf_counter()
                if left <= 0:
                    return None
                self._cv.wait(min(left, self._period))

    def release(self, r: Replica, served: bool) -> None:
        with self._cv:
            r.outstanding -= 1
            r.served += served
            self._cv.notify_all()

    def mark_down(self, r: Replica, why: str) -> None:
        with self._cv:
            if r.up:
                r.up, r.failures = False, r.failures + 1
            r.last_error = why
            self._cv.notify_all()

    def state(self, model_key: str) -> str:
        with self._cv:
            rs = [r for r in self.replicas if r.model_key == model_key]
            return ", ".join(f"{r.name} {'up' if r.up else 'down'} {r.outstanding}/{r.capacity} in flight"
                             + (f" (last error: {r.last_error})" if r.last_error else "") for r in rs)

    # ------------------------------------------------------------------ health
    def _watch(self) -> None:
        """Ping each down replica (one ping in flight each); one that answers was restarted by Ray: back up."""
        import ray

        while not self._stop.wait(self._period):
            try:
                alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            except Exception:  # the cluster itself is unreachable: leave the states as they are
                continue
            for r in list(self.replicas):
                if r.up and r.node and r.node not in alive:
                    self.mark_down(r, f"its node {r.node[:12]} died")
                if r.up:
                    continue
                if r._ping is None:
                    try:
                        r._ping = r.handle.ping.remote()
                    except Exception:
                        continue
                ready, _ = ray.wait([r._ping], timeout=0)
                if not ready:
                    continue
                ref, r._ping = r._ping, None
                try:
                    where = ray.get(ref)
                except Exception:  # still unavailable (restarting) or dead for good: ping again next round
                    continue
                with self._cv:  # a new process means Ray restarted the replica (maybe on another node)
                    r.restarts += where["pid"] != r.info.get("pid") or where["node"] != r.node
                    r.up, r.node = True, where["node"]
                    r.info.update(where)
                    self._cv.notify_all()

    def stats(self) -> list[dict]:
        """Every replica's own stats (engine counters, node, memory), plus this pool's routing counters; a
        replica that does not answer within a second is listed as unreachable."""
        import ray

        refs = [r.handle.stats.remote() for r in self.replicas]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
        out = []
        for r, ref in zip(self.replicas, refs):
            row = {"name": r.name, "model": r.model_key, "up": r.up, "outstanding": r.outstanding,
                   "served": r.served, "failures": r.failures, "restarts": r.restarts}
            if ref in ready:
                try:
                    row = {**ray.get(ref), **row}
                except Exception as e:
                    row["error"] = f"{type(e).__name__}"
            else:
                ray.cancel(ref)
                row["error"] = "unreachable"
            out.append(row)
        return out

    def close(self) -> None:
        import ray

        self._stop.set()
        self._health.join(timeout=2)
        for r in self.replicas:
            try:
                ray.kill(r.handle, no_restart=True)
            except Exception:  # already gone with its node
                pass
