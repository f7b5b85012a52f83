"""deploy/: the pipeline split: when a variant fits on no single device, cut its decoder layers into contiguous
stages over several devices, choosing the cuts and the device order by dynamic programming over layer and link costs
(EdgeShard's latency formulation: min Σ stage compute + Σ hop transfer, each stage within its device's memory)."""

from __future__ import annotations

import math

from .devices import DeviceSet

MAX_DP_DEVICES = 8  # the DP keeps the set of used devices: 2^n states


def unit_bytes(v) -> list[int]:
    """Bytes of the pipeline's units in order: embedding, each decoder layer, final norm + head."""
    if not v.layer_bytes:
        # A table written before layouts were recorded: spread the non-embedding bytes evenly (approximate).
        head = v.head_bytes or 0
        per = (v.weight_bytes - 2 * head) // v.layers if head else v.weight_bytes // (v.layers + 2)
        return [head or per] + [per] * v.layers + [head or per]
    return [v.embed_bytes or 0] + list(v.layer_bytes) + [v.head_bytes or 0]


def hop_seconds(link, hidden: int, a) -> float:
    """One request's traffic over one hop: fp32 hidden states for the prompt once and each new token, plus the link
    latency per message (the prefill message and one per decoded token)."""
    if link is None:
        return math.inf
    msg_bytes = hidden * 4
    return ((a.prompt_tokens + a.max_tokens) * msg_bytes / (link.bandwidth_gb_s * 1e9)
            + (1 + a.max_tokens) * link.latency_ms / 1e3)


def split_layers(a, v, table, devices: DeviceSet):
    """The fastest contiguous split of ``v`` for agent ``a`` over distinct devices (each used at most once, any
    order), every stage fitting its device alone; a planner Candidate, or None when no split fits."""
    from .planner import Candidate, kv_bytes, prefill_s, runtime_bytes, service_s

    devs = devices.devices[:MAX_DP_DEVICES]
    units = unit_bytes(v)
    n = len(units)
    total = sum(units)
    prefix = [0]
    for b in units:
        prefix.append(prefix[-1] + b)
    kv_layer = kv_bytes(a, v) / v.layers
    full = [service_s(a, v, d, table) for d in devs]
    hidden = v.hidden_size or 1024

    def stage(i: int, j: int, k: int):
        """(seconds, bytes) of units i..j-1 on device k, or None when they do not fit."""
        wb = prefix[j] - prefix[i]
        layers_in = max(0, min(j, n - 1) - max(i, 1))
        need = wb + kv_layer * layers_in + a.adapter_bytes * layers_in / v.layers + runtime_bytes(devs[k], table)
        if need > devs[k].usable_bytes:
            return None
        return full[k] * wb / total, wb, int(kv_layer * layers_in + a.adapter_bytes * layers_in / v.layers)

    # best[(i, used, last)] = (seconds, back-pointer): units 0..i-1 placed, devices `used`, the last on `last`.
    best: dict = {}
    for k in range(len(devs)):
        for j in range(1, n + 1):
            s = stage(0, j, k)
            if s is not None:
                key = (j, 1 << k, k)
                if key not in best or s[0] < best[key][0]:
                    best[key] = (s[0], None, (0, j, k, s))
    for i in range(1, n):
        for (ii, used, last), (t0, _, _) in sorted(best.items()):
            if ii != i:
                continue
            for k in range(len(devs)):
                if used >> k & 1:
                    continue
                hop = hop_seconds(devices.link(devs[last].name, devs[k].name), hidden, a)
                if math.isinf(hop):
                    continue
                for j in range(i + 1, n + 1):
                    s = stage(i, j, k)
                    if s is None:
                        continue
                    key = (j, used | 1 << k, k)
                    t = t0 + hop + s[0]
                    if key not in best or t < best[key][0]:
                        best[key] = (t, (ii, used, last), (i, j, k, s))
    ends = [(t, key) for key, (t, _, _) in best.items() if key[0] == n and bin(key[1]).count("1") > 1]
    if not ends:
        return None
    # close the loop: the sampled token goes back from the last stage to the first, once per decoded token
    scored = []
    for t, key in ends:
        chain = _chain(best, key)
        first, last = chain[0][2], chain[-1][2]
        back = devices.link(devs[last].name, devs[first].name)
        if back is None:
            continue
        scored.append((t + a.max_tokens * back.latency_ms / 1e3, chain))
    if not scored:
        return None
    t, chain = min(scored, key=lambda z: z[0])
    stages = [(devs[k].name, s[1]) for _, _, k, s in chain]
    layers = [(max(i, 1) - 1, min(j, n - 1) - 1) for i, j, k, s in chain]  # decoder layer ranges [lo, hi)
    hop_total = t - sum(s[0] for _, _, _, s in chain)
    stage_s = {devs[k].name: s[0] + hop_total / len(chain) for _, _, k, s in chain}
    pre = {devs[k].name: prefill_s(v, devs[k], table, a.prompt_tokens) * s[1] / total for _, _, k, s in chain}
    return Candidate(a.name, v.name, f"{a.base}:{v.name}", stages, {devs[k].name: s[2] for _, _, k, s in chain},
                     t, stage_s, layers, stage_pre=pre)


def _chain(best, key):
    out = []
    while key is not None:
        _, prev, step = best[key]
        out.append(step)
        key = prev
    return out[::-1]
