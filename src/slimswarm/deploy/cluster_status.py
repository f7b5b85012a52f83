"""deploy/cluster_status.py: the monitoring view of a Ray cluster running slimswarm replicas — nodes, replicas,
queue depth, active rows, tokens, KV use, memory per node — as a dict, a text table, or Prometheus text."""

from __future__ import annotations

from .ray_runtime import _PREFIX, NAMESPACE

# per-replica engine counters that add up to the cluster's (gauges such as max_batch add up to capacity)
_SUMMED = ("queue_depth", "active", "max_batch", "requests", "finished", "rejected", "cancelled", "timeouts", "errors",
           "prompt_tokens", "cached_prompt_tokens", "generated_tokens", "steps", "decode_rows", "decode_s",
           "prefix_cache_hits", "prefix_cache_hit_tokens", "prefix_cache_bytes", "kv_cache_bytes", "rss_bytes")


def replica_handles() -> list[tuple[str, object]]:
    """(actor name, handle) of every live slimswarm replica on the cluster, whichever driver started it."""
    import ray

    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == NAMESPACE and a["name"].startswith(_PREFIX):
            try:
                out.append((a["name"], ray.get_actor(a["name"], namespace=NAMESPACE)))
            except ValueError:  # gone between the listing and the lookup
                pass
    return sorted(out, key=lambda x: x[0])


def cluster_status(timeout_s: float = 2.0) -> dict:
    """Nodes (alive, resources, memory), every replica's stats (unreachable ones say so), and the totals."""
    import ray

    handles = replica_handles()
    refs = [h.stats.remote() for _, h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
    replicas = []
    for (name, _), ref in zip(handles, refs):
        row = {"actor": name, "name": name.split(":", 2)[-1], "run": name.split(":")[1]}
        if ref in ready:
            try:
                row.update(ray.get(ref), state="up")
            except Exception as e:
                row.update(state=f"down ({type(e).__name__})")
        else:
            ray.cancel(ref)
            row.update(state="unreachable")
        replicas.append(row)
    nodes = []
    for n in ray.nodes():
        res = n.get("Resources", {})
        mine = [r for r in replicas if r.get("node") == n["NodeID"]]
        mem = next(((r["node_memory_used_bytes"], r["node_memory_total_bytes"]) for r in mine), (None, None))
        nodes.append({"node": n["NodeID"][:12], "alive": bool(n.get("Alive")), "address": n.get("NodeManagerAddress"),
                      "cpus": res.get("CPU", 0), "resources": {k: v for k, v in res.items()
                                                               if k not in ("CPU", "memory", "object_store_memory")
                                                               and not k.startswith("node:")},
                      "replicas": [r["name"] for r in mine], "memory_used_bytes": mem[0], "memory_total_bytes": mem[1],
                      "replica_rss_bytes": sum(r.get("rss_bytes", 0) for r in mine)})
    up = [r for r in replicas if r["state"] == "up"]
    totals = {k: sum(r.get(k, 0) for r in up) for k in _SUMMED}
    totals["decode_tokens_per_s"] = sum(r.get("decode_tokens_per_s", 0.0) for r in up)
    totals.update(replicas=len(replicas), replicas_up=len(up), nodes_alive=sum(n["alive"] for n in nodes))
    return {"nodes": nodes, "replicas": replicas, "totals": totals}


def _gb(b) -> str:
    return "" if b is None else f"{b / 2**30:.2f}"


def status_text(st: dict) -> str:
    """Two tables: nodes, then replicas; then the totals line."""
    lines = ["nodes", f"{'node':<13}{'alive':<7}{'address':<16}{'cpus':>5}  {'mem used/total GiB':<20}{'replicas'}"]
    for n in st["nodes"]:
        mem = f"{_gb(n['memory_used_bytes'])}/{_gb(n['memory_total_bytes'])}" if n["memory_total_bytes"] else ""
        extra = ",".join(f"{k}={v:g}" for k, v in n["resources"].items())
        lines.append(f"{n['node']:<13}{str(n['alive']):<7}{str(n['address']):<16}{n['cpus']:>5g}  {mem:<20}"
                     f"{', '.join(n['replicas']) or '-'}" + (f"   [{extra}]" if extra else ""))
    lines += ["", "replicas", f"{'replica':<18}{'model':<24}{'state':<13}{'node':<13}{'queue':>6}{'active':>7}"
              f"{'requests':>9}{'tokens':>8}{'tok/s':>8}{'KV MiB':>8}{'RSS MiB':>8}"]
    for r in st["replicas"]:
        lines.append(f"{r['name']:<18}{str(r.get('label', r.get('model', '')))[:23]:<24}{r['state'][:12]:<13}"
                     f"{str(r.get('node', ''))[:12]:<13}{r.get('queue_depth', 0):>6}{r.get('active', 0):>7}"
                     f"{r.get('requests', 0):>9}{r.get('generated_tokens', 0):>8}"
                     f"{r.get('decode_tokens_per_s', 0.0):>8.1f}{r.get('kv_cache_bytes', 0) / 2**20:>8.1f}"
                     f"{r.get('rss_bytes', 0) / 2**20:>8.0f}")
    t = st["totals"]
    lines += ["", f"{t['replicas_up']}/{t['replicas']} replicas up on {t['nodes_alive']} live nodes; "
                  f"{t['requests']} requests, {t['generated_tokens']} tokens, {t['queue_depth']} waiting, "
                  f"{t['active']} active rows"]
    return "\n".join(lines)


def prometheus_cluster_text(st: dict) -> str:
    """The engine metrics of ``/metrics`` summed over the replicas that answered (same names as one engine's), the
    same per replica as ``slimswarm_replica_*`` series labelled ``replica``, ``model``, ``node`` (separate names, so
    summing a metric never counts a replica twice), and the replica counts."""
    from ..engine.server import _METRICS

    up = [r for r in st["replicas"] if r["state"] == "up"]
    lines = []
    for name, kind, help_, key in _METRICS:
        lines += [f"# HELP {name} {help_} (sum over replicas)", f"# TYPE {name} {kind}",
                  f"{name} {float(sum(r.get(key, 0) for r in up)):g}"]
    for name, kind, help_, key in _METRICS:
        per = name.replace("slimswarm_", "slimswarm_replica_", 1)
        lines += [f"# HELP {per} {help_} (one replica)", f"# TYPE {per} {kind}"]
        for r in up:
            lines.append(f'{per}{{replica="{r["name"]}",model="{r.get("model", "")}",node="{r.get("node", "")[:12]}"}} '
                         f"{float(r.get(key, 0)):g}")
    lines += ["# HELP slimswarm_replicas Replicas known to the cluster.", "# TYPE slimswarm_replicas gauge",
              f"slimswarm_replicas {len(st['replicas'])}",
              "# HELP slimswarm_replicas_up Replicas that answered.", "# TYPE slimswarm_replicas_up gauge",
              f"slimswarm_replicas_up {len(up)}"]
    return "\n".join(lines) + "\n"
