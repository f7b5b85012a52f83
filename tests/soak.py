"""A bounded loopback load test: N chat requests at once (streamed and not, over several adapters); some clients
hang up mid-stream, some cancel before the answer; every other request must complete or be refused with 429/503.
Used by tests/test_soak.py and benchmarks/hardening.py; it stops by itself (every request has a deadline)."""

from __future__ import annotations

import asyncio
import random
import time

import httpx

SYSTEM = ("You are a storyteller for small children. Tell short, happy stories with simple words, a friendly animal "
          "and a little girl named Lily.")  # shared by every request: the prefix cache serves its blocks
TOPICS = ["a dog", "the sea", "a red ball", "a big tree", "the moon", "a cat and a bird", "rain", "a birthday"]


async def _one(client: httpx.AsyncClient, url: str, headers: dict, i: int, rng: random.Random, models: list[str],
               max_tokens: int, deadline_s: float) -> dict:
    r = rng.random()
    plan = "disconnect" if r < 0.10 else "cancel" if r < 0.15 else "normal"
    stream = plan == "disconnect" or rng.random() < 0.5
    body = {"model": models[i % len(models)], "max_tokens": rng.randint(max_tokens // 2, max_tokens),
            "temperature": rng.choice([0.0, 0.8]), "seed": i, "stream": stream,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Tell me a story about {rng.choice(TOPICS)}."}]}
    t0 = time.perf_counter()
    rec = {"plan": plan, "stream": stream, "model": body["model"], "status": None, "outcome": None, "latency_s": None}

    async def call():
        if stream:
            async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as resp:
                rec["status"] = resp.status_code
                if resp.status_code != 200:
                    await resp.aread()
                    return "refused" if resp.status_code in (429, 503) else "error"
                done = False
                async for line in resp.aiter_lines():
                    if plan == "disconnect" and line.startswith("data: {"):
                        return "disconnected"  # leaving the block closes the connection mid-stream
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: ") and '"error"' in line:
                        return "error"
                return "completed" if done else "error"
        resp = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
        rec["status"] = resp.status_code
        if resp.status_code == 200:
            ok = resp.json()["choices"][0]["finish_reason"] in ("stop", "length")
            return "completed" if ok else "error"
        return "refused" if resp.status_code in (429, 503) else "error"

    task = asyncio.ensure_future(call())
    try:
        if plan == "cancel":  # the client gives up before the answer: its connection closes with the task
            await asyncio.sleep(rng.uniform(0.01, 0.5))
            if not task.done():
                task.cancel()
                rec["outcome"] = "cancelled"
                try:
                    await task
                except (asyncio.CancelledError, httpx.HTTPError):
                    pass
                return rec
        rec["outcome"] = await asyncio.wait_for(task, deadline_s)
    except asyncio.TimeoutError:
        rec["outcome"] = "timeout"
    except httpx.HTTPError as e:
        rec["outcome"] = f"transport error: {type(e).__name__}"
    rec["latency_s"] = time.perf_counter() - t0
    return rec


async def _run(url, headers, n, models, max_tokens, seed, deadline_s):
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(deadline_s, connect=60)) as client:
        return await asyncio.gather(*(_one(client, url, headers, i, random.Random(rng.random()), models, max_tokens,
                                           deadline_s) for i in range(n)))


def soak(url: str, headers: dict, n: int = 500, models: list[str] | None = None, max_tokens: int = 24, seed: int = 0,
         deadline_s: float = 240.0) -> dict:
    """Fire ``n`` requests at once; a summary with every record (outcome, status, latency)."""
    t0 = time.perf_counter()
    recs = asyncio.run(_run(url, headers, n, models or ["stories260k"], max_tokens, seed, deadline_s))
    wall = time.perf_counter() - t0
    outcomes: dict[str, int] = {}
    for r in recs:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    lat = sorted(r["latency_s"] for r in recs if r["outcome"] == "completed")
    p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None)
    return {"requests": n, "concurrency": n, "wall_s": round(wall, 2), "outcomes": outcomes,
            "planned": {k: sum(r["plan"] == k for r in recs) for k in ("normal", "disconnect", "cancel")},
            "streamed": sum(r["stream"] for r in recs), "models": sorted({r["model"] for r in recs}),
            "latency_p50_s": p(0.5), "latency_p95_s": p(0.95), "records": recs}
