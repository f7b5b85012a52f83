"""Ray scale-out on a real local cluster (head + 2 worker nodes, stories260K replicas). Run only by test_ray.py,
inside a fresh network namespace holding only loopback: Ray must never bind or advertise a real address.

The cluster starts once for the module; the tests run in file order and the last two kill its nodes.
"""

import json
import threading
import time
from collections import Counter

import pytest
import yaml

from slimswarm.agents.config import build_team, parse_config
from slimswarm.agents.runner import run_tasks
from slimswarm.agents.trace import Tracer
from slimswarm.cli import main
from slimswarm.deploy.loopback import require_loopback_namespace, start_loopback_cluster

require_loopback_namespace(__file__)  # at import: nothing below runs on the host network

TEAM = {"name": "storytellers",
        "model": {"base": "stories260k", "max_len": 256, "max_batch": 8},
        "deploy": {"models": {"default": {"replicas": 2, "resources": {"slot": 1}, "num_cpus": 1}}},
        "agents": [{"name": "teller", "system": "Once upon a time", "params": {"max_tokens": 12}},
                   {"name": "editor", "system": "The end.", "params": {"max_tokens": 12}}],
        "teams": [{"name": "story", "topology": "pipeline", "members": ["teller", "editor"]}]}
TASKS = [{"id": str(i), "input": f"a little {w} went to the park", "expected": None}
         for i, w in enumerate(["dog", "cat", "girl", "boy", "bird", "fish", "frog", "bear"] * 5)]


@pytest.fixture(scope="module")
def cluster():
    import ray

    c = start_loopback_cluster([{"num_cpus": 1, "resources": {"slot": 1, "w1": 1}},
                                {"num_cpus": 1, "resources": {"slot": 1, "w2": 1}}])
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def backend(cluster):
    """Two replicas of the team's model, one on each worker node (each needs the one `slot` a worker has)."""
    from slimswarm.deploy.ray_backend import RayBackend
    from slimswarm.deploy.ray_runtime import ReplicaPool, plans_from_config

    be = RayBackend(ReplicaPool.launch(plans_from_config(parse_config(TEAM))), timeout_s=30)
    yield be
    be.close()


def _files(tmp_path, team=TEAM, tasks=TASKS[:4]):
    t, f = tmp_path / "team.yaml", tmp_path / "tasks.jsonl"
    t.write_text(yaml.safe_dump(team, sort_keys=False))
    f.write_text("".join(json.dumps(x) + "\n" for x in tasks))
    return str(t), str(f)


def test_unreachable_ray_address_is_a_one_line_error_before_any_task(tmp_path, capsys):
    team, tasks = _files(tmp_path)
    assert main(["team", "run", team, "--tasks", tasks, "--ray", "127.0.0.1:9"]) == 2
    out, err = capsys.readouterr()
    assert err == "slimswarm: error: --ray 127.0.0.1:9: cannot reach a Ray head there (Connection refused)\n"
    assert out == ""


def test_ray_backend_gives_the_local_engines_greedy_answers(backend, one_torch_thread):
    from slimswarm.agents.backends import EngineBackend
    from slimswarm.agents.runner import load_engine

    cfg = parse_config(TEAM)
    local = EngineBackend({"default": load_engine(cfg.models["default"])})
    try:
        want = run_tasks(build_team(cfg), TASKS[:8], local, parallel=4)
    finally:
        local.close()
    tracer = Tracer()
    got = run_tasks(build_team(cfg), TASKS[:8], backend, tracer, parallel=4)
    assert [t.output for t in got.tasks] == [t.output for t in want.tasks]
    assert all(t.status == "ok" and t.output for t in got.tasks)
    calls = tracer.calls()
    assert len(calls) == 16 and all(c["model"] == "ray:hf" and c["route"]["replica"] in ("default/0", "default/1")
                                    for c in calls)


def test_two_replicas_on_two_nodes_each_serve_at_least_30_percent(backend):
    tracer = Tracer()
    report = run_tasks(build_team(parse_config(TEAM)), TASKS, backend, tracer, parallel=8)
    assert report.completion_rate == 1.0
    served = Counter(c["route"]["replica"] for c in tracer.calls())
    nodes = {c["route"]["node"] for c in tracer.calls()}
    assert sum(served.values()) == 80 and min(served["default/0"], served["default/1"]) >= 0.3 * 80, served
    assert len(nodes) == 2  # two replicas on two different nodes


def test_cluster_status_counters_move_and_prometheus_sums_the_replicas(backend, capsys):
    from slimswarm.deploy.cluster_status import cluster_status

    before = {r["name"]: r for r in cluster_status()["replicas"]}
    run_tasks(build_team(parse_config(TEAM)), TASKS[:8], backend, parallel=8)
    assert main(["cluster", "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    after = {r["name"]: r for r in st["replicas"]}
    assert set(after) == set(before) == {"default/0", "default/1"}
    assert sum(after[n]["requests"] - before[n]["requests"] for n in after) == 16
    assert all(after[n]["generated_tokens"] > before[n]["generated_tokens"] for n in after)
    assert st["totals"]["requests"] == after["default/0"]["requests"] + after["default/1"]["requests"]
    assert all(r["state"] == "up" and r["kv_cache_bytes"] > 0 and r["rss_bytes"] > 0 for r in after.values())
    # async replicas: concurrent calls share decode steps (the engine batched them)
    assert sum(r["decode_rows"] for r in after.values()) > 1.5 * sum(r["steps"] for r in after.values())
    by_node = {n["node"]: n for n in st["nodes"] if n["replicas"]}
    assert len(by_node) == 2 and all(n["memory_total_bytes"] > n["memory_used_bytes"] > 0 for n in by_node.values())
    assert main(["cluster", "status", "--prometheus"]) == 0
    prom = dict(line.rsplit(" ", 1) for line in capsys.readouterr().out.splitlines() if not line.startswith("#"))
    assert float(prom["slimswarm_requests_total"]) == st["totals"]["requests"]
    per = [float(v) for k, v in prom.items() if k.startswith("slimswarm_replica_requests_total{")]
    assert len(per) == 2 and sum(per) == st["totals"]["requests"]
    assert main(["cluster", "status"]) == 0
    text = capsys.readouterr().out
    assert "default/0" in text and "default/1" in text and "2/2 replicas up" in text


def test_the_http_server_in_front_of_the_replicas_answers_as_the_local_engine_does(backend, stories):
    from fastapi.testclient import TestClient

    from slimswarm.deploy.ray_serve import ReplicaFront
    from slimswarm.engine.engine import Engine
    from slimswarm.engine.server import create_app

    messages = [{"role": "system", "content": "Once upon a time"}, {"role": "user", "content": "a cat sat"}]
    ask = {"model": "stories", "messages": messages, "max_tokens": 12, "temperature": 0}
    local = Engine(stories.model, stories.tokenizer, max_batch=2, max_len=256).start()
    try:
        with TestClient(create_app(local, "stories")) as http:
            want_body = http.post("/v1/chat/completions", json=ask).json()
    finally:
        local.stop()
    want = want_body["choices"][0]["message"]["content"]
    front = ReplicaFront(backend, "default")
    before = front.stats()["requests"]
    with TestClient(create_app(front, "stories")) as http:
        r = http.post("/v1/chat/completions", json=ask)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == want
        for k in ("prompt_tokens", "completion_tokens"):  # (cached_tokens differ: the replicas' caches are warm)
            assert body["usage"][k] == want_body["usage"][k] > 0
        s = http.post("/v1/chat/completions", json={**ask, "stream": True})
        assert s.status_code == 200 and want.strip()[:8] in s.text and "[DONE]" in s.text
        assert http.get("/health").json()["status"] == "ok"
        metrics = http.get("/metrics").text
    total = float(next(x.split()[-1] for x in metrics.splitlines() if x.startswith("slimswarm_requests_total ")))
    assert total == before + 2  # summed over both replicas


def test_cli_team_run_ray_runs_the_team_while_a_replica_that_failed_to_load_says_why(cluster, tmp_path, capsys):
    team = {**TEAM, "model": None, "models": {"default": TEAM["model"], "big": {"base": "/nowhere/llama-7b"}},
            "deploy": {"models": {"default": {"replicas": 1, "num_cpus": 0}, "big": {"replicas": 1, "num_cpus": 0}}}}
    del team["model"]
    t, f = _files(tmp_path, team)
    trace = tmp_path / "run.jsonl"
    assert main(["team", "run", t, "--tasks", f, "--ray", "--trace", str(trace), "--json", "--parallel", "4"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("slimswarm: replica big/0 failed to load: model /nowhere/llama-7b: ")
    assert err.endswith(" (the others serve)\n") and err.count("\n") == 1
    summary = json.loads(out.splitlines()[-1])["summary"]
    assert summary["completion_rate"] == 1.0 and summary["replica_calls"] == {"default/0": 8}
    assert summary["replicas_failed_to_load"] == 1
    calls = [json.loads(x) for x in trace.read_text().splitlines() if '"type": "call"' in x]
    assert len(calls) == 8 and all(c["route"]["replica"] == "default/0" for c in calls)


@pytest.mark.parametrize("deploy, message", [
    ({"models": {"default": {"resources": {"h200": 1}}}},
     "slimswarm: error: deploy.models.default.resources: no node of the Ray cluster has CPU=1, h200=1 (nodes offer: "
     "CPU, memory, object_store_memory, slot, w1, w2)\n"),
    ({"models": {"default": {"replicas": 0}}},
     "slimswarm: error: agent teller: no Ray replica serves model 'default' (deploy.models.default.replicas is 0)\n"),
])
def test_a_deploy_no_node_or_replica_can_serve_is_a_one_line_error_before_any_task(cluster, tmp_path, capsys,
                                                                                    deploy, message):
    t, f = _files(tmp_path, {**TEAM, "deploy": deploy})
    assert main(["team", "run", t, "--tasks", f, "--ray"]) == 2
    out, err = capsys.readouterr()
    assert err == message and out == ""


def _remove_and_wait(cluster, node, timeout_s: float = 30.0) -> None:
    """Kill ``node`` and return once Ray's control store has it dead: ``remove_node`` returns before its processes
    are gone, and a call sent in that window was still answered by the dying actor (no retry to see)."""
    import ray

    cluster.remove_node(node, allow_graceful=False)
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if not any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            return
        time.sleep(0.05)
    raise AssertionError(f"node {node.node_id} still alive {timeout_s:.0f} s after remove_node")


class _KillOnNthCall:
    """Stands in for a replica's actor handle: its ``n``-th generate call first kills the replica's node (and
    waits for ``remove_node`` to return), then goes to the now dead actor. So a call is in flight on the dying
    replica whatever the machine's speed (a kill from a side thread could land after the last task)."""

    def __init__(self, handle, n, kill):
        self._handle, self._n, self._kill, self._lock, self.killed = handle, n, kill, threading.Lock(), False

    def __getattr__(self, name):
        method = getattr(self._handle, name)
        if not name.startswith("generate"):
            return method
        outer = self

        class _Method:
            def remote(self, *args):
                with outer._lock:
                    outer._n -= 1
                    if outer._n == 0:
                        outer._kill()
                        outer.killed = True
                return method.remote(*args)
        return _Method()


def test_a_node_dying_mid_run_loses_no_task_and_its_replica_restarts_where_ray_can_place_it(cluster, backend):
    dead = next(r for r in backend.pool.replicas if r.name == "default/0")
    dead_node = dead.node
    victim = next(n for n in cluster.workers if n.node_id == dead_node)
    handle = dead.handle
    dead.handle = killer = _KillOnNthCall(handle, 6, lambda: _remove_and_wait(cluster, victim))
    tracer = Tracer()
    try:
        report = run_tasks(build_team(parse_config(TEAM)), TASKS, backend, tracer, parallel=8)
    finally:
        dead.handle = handle
    killed = killer.killed
    assert killed
    assert len(report.tasks) == 40 and report.completion_rate == 1.0, [t.error for t in report.tasks if t.error]
    calls = tracer.calls()
    retried = [c for c in calls if "retries" in c.get("route", {})]
    assert retried and all(c["route"]["replica"] == "default/1" and c["route"]["retries"][0]["replica"] == "default/0"
                           for c in retried)
    assert all(c["error"] is None for c in calls) and len(calls) == 80
    assert not dead.up and backend.resubmitted == sum(len(c["route"]["retries"]) for c in retried)
    # a new node with a free `slot`: Ray restarts the lost replica there and the pool takes it back
    cluster.workers.append(cluster.add_node(num_cpus=1, resources={"slot": 1, "w3": 1}, node_ip_address="127.0.0.1"))
    t0 = time.time()
    while not dead.up and time.time() - t0 < 60:
        time.sleep(0.2)
    assert dead.up and dead.restarts == 1 and dead.node not in (dead_node, backend.pool.replicas[1].node)
    tracer = Tracer()
    report = run_tasks(build_team(parse_config(TEAM)), TASKS[:8], backend, tracer, parallel=8)
    assert report.completion_rate == 1.0 and "default/0" in {c["route"]["replica"] for c in tracer.calls()}


def test_with_every_replica_gone_tasks_fail_with_a_recorded_error_and_the_run_ends(cluster, backend):
    for n in [n for n in cluster.workers if n.node_id in {r.node for r in backend.pool.replicas}]:
        cluster.remove_node(n, allow_graceful=False)
    # "gone" means the pool has seen them go: remove_node returns before Ray's processes are dead, and on a quiet
    # machine the 4 tasks would otherwise be served by replicas that are still finishing their last seconds
    t0 = time.time()
    while any(r.up for r in backend.pool.replicas) and time.time() - t0 < 30:
        time.sleep(0.1)
    assert not any(r.up for r in backend.pool.replicas)
    backend.timeout_s = 3
    tracer = Tracer()
    t0 = time.perf_counter()
    report = run_tasks(build_team(parse_config(TEAM)), TASKS[:4], backend, tracer, parallel=4)
    assert time.perf_counter() - t0 < 30
    assert [t.status for t in report.tasks] == ["failed"] * 4
    assert all(t.error.startswith("ray: no replica of model 'default' could serve the call within 3s [default/0 down")
               for t in report.tasks), report.tasks[0].error
    calls = tracer.calls()
    assert len(calls) == 4 and all(c["error"] == t.error for c, t in zip(sorted(calls, key=lambda c: c["task"]),
                                                                         report.tasks))
