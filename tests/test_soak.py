"""Soak: 500 concurrent chat requests against a live `slimswarm serve` with two LoRA adapters, 10% of clients hanging
up mid-stream and 5% cancelling; every request completes or is refused (429/503); afterwards nothing is left
running, the prefix cache is within its budget, RSS is back within 10%, and /metrics adds up."""

import os
import time

import httpx
import pytest
import torch

from live_server import LiveServer
from soak import soak

KEY = "sk-soak"
N = int(os.environ.get("SLIMSWARM_SOAK_REQUESTS", 500))
PREFIX_BUDGET_MB = 0.2  # 10 blocks of 16 tokens of stories260k's KV (20 KiB each): the cache must evict


def _adapters(stories, root):
    from slimswarm.compress.lora import LoRAConfig, add_lora, save_adapter
    from slimswarm import load

    out = []
    for seed in (1, 2):
        m = load("stories260k")
        torch.manual_seed(seed)
        add_lora(m.model, LoRAConfig(r=4))
        for name, p in m.model.named_parameters():
            if ".lora_B" in name:
                p.data.normal_(0, 0.05)
        out.append(save_adapter(m.model, root / f"a{seed}", LoRAConfig(r=4)))
    return out


def _drained(srv, timeout_s=60.0) -> dict:
    t0 = time.time()
    while True:
        m = srv.metrics()
        if m["slimswarm_active_sequences"] == 0 and m["slimswarm_queue_depth"] == 0:
            return m
        assert time.time() - t0 < timeout_s, m
        time.sleep(0.2)


@pytest.mark.slow
def test_500_concurrent_requests_with_disconnects_and_cancels(stories, tmp_path):
    a1, a2 = _adapters(stories, tmp_path)
    srv = LiveServer("stories260k", "--adapters", f"a1={a1}", f"a2={a2}", "--max-batch", "8", "--max-len", "256",
                     "--max-waiting", "256", "--prefix-cache-mb", str(PREFIX_BUDGET_MB), api_key=KEY)
    try:
        warm = soak(srv.url, srv.headers, n=24, models=["stories260k", "a1", "a2"], seed=99)  # first allocations
        assert warm["outcomes"].get("completed", 0) >= 20, warm["outcomes"]
        _drained(srv)
        rss_before = srv.rss_bytes()
        res = soak(srv.url, srv.headers, n=N, models=["stories260k", "a1", "a2"], seed=0)
        m = _drained(srv)
        rss_after = srv.rss_bytes()
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
    finally:
        srv.close()
    out = res["outcomes"]
    assert set(out) <= {"completed", "refused", "disconnected", "cancelled"}, out  # no error, timeout or 5xx
    assert sum(out.values()) == N and out.get("completed", 0) >= N // 4, out
    planned_hangups = [r for r in res["records"] if r["plan"] == "disconnect"]  # ~10%: each hung up or was refused
    assert all(r["outcome"] in ("disconnected", "refused") for r in planned_hangups)
    assert out.get("disconnected", 0) >= N // 20
    assert res["planned"]["cancel"] >= N // 50 and res["streamed"] > N // 3 and res["models"] == ["a1", "a2", "stories260k"]
    refused_seen = sum(r["status"] in (429, 503) for r in res["records"])
    # the books balance: everything that reached the queue finished, was refused, cancelled, timed out or failed
    assert m["slimswarm_requests_submitted_total"] == (m["slimswarm_requests_finished_total"]
                                                      + m["slimswarm_requests_rejected_total"]
                                                      + m["slimswarm_requests_cancelled_total"]
                                                      + m["slimswarm_requests_timeout_total"]
                                                      + m["slimswarm_requests_error_total"])
    assert m["slimswarm_requests_error_total"] == 0 and m["slimswarm_requests_timeout_total"] == 0
    # cancelled clients may leave before their request reaches the queue; every other one reached it
    w = warm["outcomes"]
    early_cancels = out.get("cancelled", 0) + w.get("cancelled", 0)
    assert N + 24 - early_cancels <= m["slimswarm_requests_submitted_total"] <= N + 24
    assert m["slimswarm_requests_rejected_total"] >= refused_seen
    assert m["slimswarm_requests_finished_total"] >= out.get("completed", 0) + w.get("completed", 0)
    # a hang-up frees its row unless the answer was already complete (then it counts as finished)
    assert m["slimswarm_requests_cancelled_total"] > 0
    assert 0 < m["slimswarm_prefix_cache_bytes"] <= m["slimswarm_prefix_cache_budget_bytes"]
    assert m["slimswarm_prefix_cache_hits_total"] > 0
    assert rss_after <= 1.10 * rss_before, (rss_before, rss_after)
