"""deploy/loopback.py: run a command (a test module, a benchmark) in a fresh network namespace holding only
loopback, so a local Ray cluster started there can never bind or advertise a real network address."""

from __future__ import annotations

import os
import socket

_FLAG = "SLIMSWARM_LOOPBACK_NETNS"


def in_loopback_namespace() -> bool:
    """True inside a namespace made by ``loopback_argv`` whose only interface is ``lo``."""
    return os.environ.get(_FLAG) == "1" and [n for _, n in socket.if_nameindex()] == ["lo"]


def loopback_argv(argv: list[str]) -> list[str]:
    """``argv`` wrapped in ``unshare -n`` (a new network namespace; needs root, as CI has) with ``lo`` brought up."""
    return ["unshare", "-n", "sh", "-c", f'ip link set lo up && exec env {_FLAG}=1 "$0" "$@"', *argv]


def require_loopback_namespace(what: str) -> None:
    if not in_loopback_namespace():
        raise RuntimeError(f"{what} starts a local Ray cluster: run it under deploy.loopback.loopback_argv "
                           f"(a network namespace with only loopback), never on the host network")


# node-death detection in about a second instead of Ray's ~15 s default, for tests and benchmarks that kill nodes
FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                          "health_check_initial_delay_ms": 0, "timeout_ms_task_wait_for_death_info": 500}


def start_loopback_cluster(workers: list[dict], head_cpus: float = 1, system_config: dict | None = None):
    """A ``ray.cluster_utils.Cluster`` (head + one node per entry of ``workers``: ``{"num_cpus": .., "resources":
    {..}}``) bound to 127.0.0.1, with this process connected as its driver; only inside a loopback namespace."""
    require_loopback_namespace("start_loopback_cluster")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from .ray_runtime import NAMESPACE

    cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(
        num_cpus=head_cpus, node_ip_address="127.0.0.1", include_dashboard=False,
        _system_config=system_config if system_config is not None else FAST_FAILURE_DETECTION))
    cluster.workers = [cluster.add_node(node_ip_address="127.0.0.1", **w) for w in workers]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False, _node_ip_address="127.0.0.1")
    return cluster
