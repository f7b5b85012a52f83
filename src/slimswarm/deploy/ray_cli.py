"""deploy/ray_cli.py: the command-line side of Ray — the backend `team run --ray` gets injected, and
`slimswarm cluster status`; cli.py only wires these in."""

from __future__ import annotations

import json
import sys

from ..errors import SlimswarmError


def team_ray_backend(cfg, address: str, timeout_s: float, agents):
    """Join (or start, for ``auto``) the cluster, check every agent's model has replicas and every replica can be
    placed, start the team's replicas; a replica that fails to load is reported on stderr, the others serve."""
    from .ray_backend import RayBackend
    from .ray_runtime import ReplicaPool, connect, plans_from_config

    plans = plans_from_config(cfg)
    served = {p.model_key for p in plans}
    for a in agents:  # before Ray is even joined: a team whose agents name a model no replica serves
        key = a.model.base or next(iter(cfg.models), None)
        if not a.model.endpoint and key not in served:
            raise SlimswarmError(f"agent {a.name}: no Ray replica serves model {key!r} "
                                 f"(deploy.models.{key}.replicas is 0)")
    connect(address)
    pool = ReplicaPool.launch(plans)
    for f in pool.failed:
        print(f"slimswarm: replica {f['name']} failed to load: {f['error']} (the others serve)", file=sys.stderr)
    backend = RayBackend(pool, timeout_s, default=next(iter(cfg.models)))
    try:
        backend.check(agents)
    except SlimswarmError:
        backend.close()
        raise
    if not cfg.endpoints:
        return backend
    from ..agents.backends import HTTPBackend, RoutedBackend  # agents on declared endpoints still go there

    return RoutedBackend(backend, {k: HTTPBackend(e.url, e.model, e.timeout_s) for k, e in cfg.endpoints.items()})


def cmd_cluster_status(args) -> int:
    from .cluster_status import cluster_status, prometheus_cluster_text, status_text
    from .ray_runtime import connect

    if args.ray in ("auto", None):
        import ray

        if not ray.is_initialized():
            try:
                connect_existing()
            except ConnectionError:
                raise SlimswarmError("cluster status: no Ray cluster runs on this machine (start one with "
                                     "`ray start --head`, or pass --ray HOST:PORT)") from None
    else:
        connect(args.ray)
    st = cluster_status()
    if args.prometheus:
        sys.stdout.write(prometheus_cluster_text(st))
    elif args.json:
        print(json.dumps(st, default=str))
    else:
        print(status_text(st))
    return 0


def connect_existing() -> None:
    """Join the cluster `ray start` runs on this machine; ConnectionError when there is none (never starts one)."""
    import os

    import ray

    from .ray_runtime import NAMESPACE

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False, configure_logging=False)


def add_cluster_parser(sub) -> None:
    """Registers ``slimswarm cluster status`` on the main parser's subcommands."""
    c = sub.add_parser("cluster", help="the Ray cluster running slimswarm replicas")
    csub = c.add_subparsers(dest="cluster_cmd", required=True)
    s = csub.add_parser("status", help="nodes, replicas, queue depth, active rows, tokens, KV use, memory per node")
    s.add_argument("--ray", default="auto", help="auto (the cluster on this machine) or HOST:PORT of a Ray head")
    s.add_argument("--json", action="store_true")
    s.add_argument("--prometheus", action="store_true", help="Prometheus text, summed over replicas and per replica")
    s.set_defaults(fn=cmd_cluster_status)
