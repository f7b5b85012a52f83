"""deploy/ray_backend.py: the agents' Ray backend — each call goes to a replica serving the agent's model, and is
re-submitted to another live replica when its replica's node dies; the agents layer receives it by injection."""

from __future__ import annotations

import time

from ..agents.backends import Backend, BackendError, Completion
from ..agents.message import as_chat
from ..errors import SlimswarmError
from .ray_runtime import ReplicaPool


def _ray_failure(e: Exception) -> str | None:
    """Why a call failed if it failed because its replica (or the replica's node) went away, else None."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError

    if isinstance(e, (ActorUnavailableError, ActorDiedError, RayActorError, NodeDiedError)):
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


class _ReplicaLost(Exception):
    """Internal: the replica serving a call went away; the call goes to another one."""


class RayBackend(Backend):
    """Agents' calls on a ``ReplicaPool``: least outstanding calls with adapter affinity, waiting (up to the call's
    deadline) while every replica is full; a call whose replica dies is restarted from its prompt on another
    replica, and the retry is recorded in the completion's ``route`` (so in the trace)."""

    name = "ray"

    def __init__(self, pool: ReplicaPool, timeout_s: float = 120.0, default: str | None = None):
        self.pool = pool
        self.timeout_s = timeout_s
        self.resubmitted = 0  # calls that moved to another replica after theirs went away
        self.default = default or (sorted(pool.models())[0] if pool.models() else "default")

    def _wait(self, r, ref, until: float) -> dict:
        """The replica's answer to ``ref``; _ReplicaLost when the replica (or its node) went away meanwhile: an
        error from Ray, or the pool's health check seeing its node dead (a call queued on a replica that Ray is
        restarting would otherwise wait for a restart that may never come)."""
        import ray

        while True:
            ready, _ = ray.wait([ref], timeout=0.25)
            if ready:
                try:
                    return ray.get(ref)
                except Exception as e:
                    why = _ray_failure(e)
                    if why is None:
                        raise BackendError(f"ray: replica {r.name}: {type(e).__name__}: {e}") from None
                    raise _ReplicaLost(why) from None
            if not r.up:
                ray.cancel(ref)
                raise _ReplicaLost(r.last_error or "replica went down")
            if time.perf_counter() > until:
                ray.cancel(ref)
                raise BackendError(f"ray: replica {r.name} gave no answer within {self.timeout_s:g}s")

    def model_key(self, agent) -> str:
        return agent.model.base if agent is not None and agent.model.base else self.default

    def check(self, agents) -> None:
        """Raise (one line) when an agent's model has no replica: before any task runs."""
        have = self.pool.models()
        for a in agents:
            if a.model.endpoint:
                continue
            key = self.model_key(a)
            if key not in have:
                why = "; ".join(f"{f['name']}: {f['error']}" for f in self.pool.failed if f["model"] == key)
                raise SlimswarmError(f"agent {a.name}: no Ray replica serves model {key!r} ("
                                     + (f"its replicas failed to load: {why}" if why else
                                        f"replicas serve: {', '.join(sorted(have)) or 'nothing'}") + ")")

    def model_label(self, agent) -> str:
        key = self.model_key(agent)
        adapter = agent.model.adapter if agent is not None else None
        return f"ray:{self.pool.label(key)}" + (f"+{adapter}" if adapter else "")

    def generate(self, messages, params, *, agent=None, task_id=None, logprobs=False) -> Completion:
        key = self.model_key(agent)
        adapter = agent.model.adapter if agent is not None else None
        chat = as_chat(messages, agent.name if agent is not None else None)
        affinity = adapter or (agent.name if agent is not None else "")
        out, route = self.call(key, affinity, "generate", chat, dict(params.__dict__), adapter, logprobs)
        return Completion(out["text"], out["prompt_tokens"], out["completion_tokens"], out["cached_tokens"],
                          out["latency_s"], out["ttft_s"], out["logprobs"], out["finish_reason"], route)

    def call(self, key: str, affinity: str, method: str, *args, timeout_s: float | None = None) -> tuple[dict, dict]:
        """``replica.method(*args, time_left)`` on a replica of model ``key``, re-submitted (from scratch) to
        another replica when its replica goes away, until one answers or the deadline passes (BackendError).
        Returns the replica's answer and the route: replica, node, and the retries before it."""
        t0 = time.perf_counter()
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = t0 + timeout_s
        retries: list[dict] = []
        full = 0  # answers "queue full" (back-pressure) before one replica took the call
        while True:
            r = self.pool.acquire(key, affinity, deadline)
            if r is None:
                tried = "; ".join(f"{x['replica']}: {x['error']}" for x in retries) or "none answered"
                if full:
                    tried += f"; {full} answers of queue full"
                raise BackendError(f"ray: no replica of model {key!r} could serve the call within "
                                   f"{timeout_s:g}s [{self.pool.state(key)}] (attempts: {tried})")
            served = False
            try:
                left = max(0.1, deadline - time.perf_counter())
                ref = getattr(r.handle, method).remote(*args, left)
                try:
                    out = self._wait(r, ref, deadline + 5)
                except _ReplicaLost as e:
                    self.pool.mark_down(r, str(e))
                    self.resubmitted += 1
                    retries.append({"replica": r.name, "node": r.node[:12], "error": str(e),
                                    "after_s": round(time.perf_counter() - t0, 3)})
                    continue
                kind = out.get("kind")
                if kind == "queue_full":  # back-pressure: this replica's bounded queue is full; wait, pick again
                    full += 1
                    time.sleep(0.05)
                    continue
                if kind == "closed":
                    self.pool.mark_down(r, out["error"])
                    retries.append({"replica": r.name, "node": r.node[:12], "error": out["error"],
                                    "after_s": round(time.perf_counter() - t0, 3)})
                    continue
                if kind is not None:  # bad request, timeout, a failed forward: another replica would fail too
                    raise BackendError(f"ray: {out['error']}")
                served = True
            finally:
                self.pool.release(r, served)
            route = {"replica": out["replica"], "node": out["node"][:12]}
            if retries:
                route["retries"] = retries
            if full:
                route["queue_full_waits"] = full
            return out, route

    def report_extra(self) -> dict:
        """For the run report: calls each replica served, calls re-submitted, replicas that failed to load."""
        return {"replica_calls": {r.name: r.served for r in self.pool.replicas}, "resubmitted_calls": self.resubmitted,
                "replicas_failed_to_load": len(self.pool.failed)}

    def close(self) -> None:
        self.pool.close()
