"""Agents layer: topologies, voting, budgets, traces and replay, YAML validation, tools, failures, router —
all on the deterministic ScriptedBackend; one slow test batches a real team on the Engine (stories260K)."""

import json
import threading
import time

import numpy as np
import pytest

from slimswarm.agents import Agent, BackendError, ScriptedBackend, Team
from slimswarm.agents.answers import Extractor, final_number, find_label
from slimswarm.agents.backends import Completion, HTTPBackend, ReplayBackend, ReplayDivergence
from slimswarm.agents.config import build_team, parse_config
from slimswarm.agents.router import (EpsilonGreedyRouter, HashedWordFeatures, KeywordFeatures, LinUCBRouter,
                                     RuleRouter, reward)
from slimswarm.agents.runner import replay, run_tasks
from slimswarm.agents.runtime import TaskContext
from slimswarm.agents.topologies import parse_subtasks
from slimswarm.agents.trace import Tracer, agent_summary, timeline_png
from slimswarm.agents.voting import debate, majority_vote, normalize, weighted_vote
from slimswarm.errors import SlimswarmError


def ctx_for(backend, **kw):
    return TaskContext("t1", backend, Tracer(), **kw)


def last(messages):
    return messages[-1].content


# ------------------------------------------------------------------------------------------ topologies
def test_pipeline_feeds_each_agent_the_previous_output():
    be = ScriptedBackend(lambda agent, msgs: f"{agent}({last(msgs)})")
    team = Team("p", "pipeline", [Agent("a"), Agent("b"), Agent("c")])
    assert team.run("x", ctx_for(be)) == "c(b(a(x)))"


def test_orchestrator_assigns_by_capability_runs_concurrently_and_aggregates():
    inflight, peak, lock = [0], [0], threading.Lock()

    def reply(agent, msgs):
        if agent == "planner":
            return "Plan:\n1. [math] add 2 and 3\n2. [sentiment] judge 'great film'\n3. summarise the math"
        if agent == "agg":
            return "combined: " + " | ".join(line.strip() for line in last(msgs).splitlines() if "result:" in line)
        with lock:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
        time.sleep(0.05)
        with lock:
            inflight[0] -= 1
        return f"{agent} did {last(msgs)}"

    team = Team("o", "orchestrator", [Agent("mathy", capabilities=["math"]), Agent("feel", capabilities=["sentiment"])],
                planner=Agent("planner"), aggregator=Agent("agg"))
    ctx = ctx_for(ScriptedBackend(reply))
    out = team.run("a task", ctx)
    assert "mathy did add 2 and 3" in out and "feel did judge 'great film'" in out
    assert "mathy did summarise the math" in out  # no tag: the capability word "math" in the text picks mathy
    assert peak[0] >= 2  # subtasks ran at the same time (an engine backend would batch them)


def test_parse_subtasks_json_and_numbered():
    assert parse_subtasks('Here: ["a", {"task": "b", "capability": "math"}]') == [
        {"task": "a", "capability": None}, {"task": "b", "capability": "math"}]
    assert [s["task"] for s in parse_subtasks("1. first\n2) second\n- third\nnoise")] == ["first", "second", "third"]
    assert parse_subtasks("nothing to see") == []


def test_orchestrator_unparseable_plan_runs_the_task_itself():
    be = ScriptedBackend({"planner": "I will just do it", "w": "done"})
    team = Team("o", "orchestrator", [Agent("w")], planner=Agent("planner"))
    assert team.run("task", ctx_for(be)) == "done"


def test_peer_stops_early_once_agents_agree():
    def reply(agent, msgs):
        if "other agents answered" in last(msgs):
            return "positive"
        return {"a": "positive", "b": "negative", "c": "positive"}[agent]

    be = ScriptedBackend(reply)
    team = Team("peer", "peer", [Agent("a"), Agent("b"), Agent("c")], rounds=5,
                extract=Extractor(["positive", "negative"]))
    ctx = ctx_for(be)
    assert team.run("review?", ctx) == "positive"
    assert len(be.calls) == 6  # round 1 disagrees, round 2 agrees, rounds 3-5 never run
    assert ctx.notes["votes"][0]["rounds"] == 2
    # each agent in round 2 saw the others' answers, not its own
    b_round2 = [t for a, t in be.calls if a == "b" and "other agents" in t][0]
    assert "- a: positive" in b_round2 and "- b:" not in b_round2


def test_hierarchy_runs_sub_teams_and_lead_combines():
    be = ScriptedBackend(lambda agent, msgs: "lead saw " + last(msgs).split("teams:\n")[1].split("\n\n")[0].replace("\n", ";")
                         if agent == "lead" else f"{agent}:ok")
    sub1 = Team("sub1", "pipeline", [Agent("x"), Agent("y")])
    sub2 = Team("sub2", "vote", [Agent("v1"), Agent("v2"), Agent("v3")])
    top = Team("top", "hierarchy", [sub1, sub2], aggregator=Agent("lead"))
    assert top.run("go", ctx_for(be)) == "lead saw - sub1: y:ok;- sub2: v1:ok"


def test_cycle_in_nested_teams_is_named():
    a = Team("a", "pipeline", [Agent("x")])
    b = Team("b", "pipeline", [a])
    a.members.append(b)
    with pytest.raises(SlimswarmError, match=r"team cycle: a -> b -> a"):
        a.validate()


# ------------------------------------------------------------------------------------------ voting
def test_majority_vote_normalizes_and_breaks_ties_by_voter_order():
    assert normalize("  Positive. ") == "positive" and normalize("1,234") == "1234"
    r = majority_vote(["Positive", "negative.", "POSITIVE!", None])
    assert r.answer == "positive" and r.scores == {"positive": 2.0, "negative": 1.0}
    assert majority_vote(["b", "a", "a", "b"]).answer == "b"  # tie: first given wins
    assert majority_vote(["a", "b", "b", "a"]).answer == "a"
    assert majority_vote([None, ""]).answer is None


def test_confidence_weighted_vote_can_overturn_the_majority():
    answers = ["yes", "yes", "no"]
    lps = [[-3.0, -3.0], [-2.5], [-0.01, -0.02]]  # two unsure voters against one sure voter
    assert majority_vote(answers).answer == "yes"
    r = weighted_vote(answers, lps)
    assert r.answer == "no"
    assert r.scores["no"] == pytest.approx(np.exp(-0.015))


def test_weighted_vote_team_asks_backend_for_logprobs():
    def reply(agent, msgs):
        lp = {"a": [-2.0], "b": [-2.0], "c": [-0.1]}[agent]
        return Completion({"a": "cat", "b": "cat", "c": "dog"}[agent], 1, 1, logprobs=lp)

    team = Team("v", "vote", [Agent("a"), Agent("b"), Agent("c")], vote="weighted")
    report = run_tasks(team, [{"id": "1", "input": "animal?", "expected": "dog"}], ScriptedBackend(reply), Tracer())
    assert report.tasks[0].output == "dog" and report.tasks[0].correct


def test_debate_runs_all_rounds_when_agents_never_agree():
    be = ScriptedBackend(lambda agent, msgs: agent)
    ctx = ctx_for(be)
    result, history = debate([Agent("a"), Agent("b")], "q", ctx, rounds=3)
    assert len(history) == 3 and result.rounds == 3 and result.answer == "a" and not result.agreed


# ------------------------------------------------------------------------------------------ budget, failures
def test_token_budget_stops_the_task_and_records_budget_exceeded():
    be = ScriptedBackend(lambda agent, msgs: "word " * 30)  # 30 completion tokens a call
    team = Team("p", "pipeline", [Agent(f"a{i}") for i in range(5)])
    tracer = Tracer()
    report = run_tasks(team, [{"id": "1", "input": "go", "expected": None}], be, tracer, budget_tokens=50)
    t = report.tasks[0]
    assert t.status == "budget_exceeded" and "budget 50" in t.error
    assert len(be.calls) == 2  # the second call crossed the budget; the third never started
    assert report.completion_rate == 0.0


def test_failing_backend_fails_only_that_task():
    def reply(agent, msgs):
        if "boom" in last(msgs):
            raise BackendError("engine: request timeout after 30.0s")
        if "crash" in last(msgs):
            raise RuntimeError("backend process died")
        return "positive"

    team = Team("p", "pipeline", [Agent("a")], extract=Extractor(["positive", "negative"]))
    tasks = [{"id": str(i), "input": x, "expected": "positive"} for i, x in enumerate(["ok", "boom", "crash", "ok"])]
    tracer = Tracer()
    report = run_tasks(team, tasks, ScriptedBackend(reply), tracer)
    assert [t.status for t in report.tasks] == ["ok", "failed", "failed", "ok"]
    assert "timeout" in report.tasks[1].error and "died" in report.tasks[2].error
    assert report.completion_rate == 0.5 and report.accuracy == 0.5
    assert sum(bool(c["error"]) for c in tracer.calls()) == 2  # the failed calls are traced too


def test_http_backend_connection_error_and_reply_parsing():
    import httpx

    with pytest.raises(BackendError, match="127.0.0.1:9"):
        HTTPBackend("http://127.0.0.1:9", timeout_s=1).generate([], Agent("a").params, agent=Agent("a"))

    def handler(request):
        body = json.loads(request.content)
        assert body["model"] == "sst2" and body["messages"][-1]["content"] == "hi"
        return httpx.Response(200, json={"choices": [{"message": {"content": "positive"}, "finish_reason": "stop",
                                                      "logprobs": {"content": [{"logprob": -0.5}]}}],
                                         "usage": {"prompt_tokens": 7, "completion_tokens": 1,
                                                   "prompt_tokens_details": {"cached_tokens": 4}}})

    from slimswarm.agents import Message, ModelRef

    be = HTTPBackend("http://x/v1", client=httpx.Client(transport=httpx.MockTransport(handler)))
    c = be.generate([Message("user", "hi")], Agent("a").params, agent=Agent("a", model=ModelRef("default", "sst2")),
                    logprobs=True)
    assert (c.text, c.prompt_tokens, c.completion_tokens, c.cached_tokens, c.logprobs) == ("positive", 7, 1, 4, [-0.5])


# ------------------------------------------------------------------------------------------ tools
def test_tool_call_with_bad_arguments_is_recorded_and_the_agent_recovers():
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    def reply(agent, msgs):
        if msgs[-1].role == "tool":
            return "The sum is 5." if "error" not in last(msgs) else '{"tool": "add", "arguments": {"a": 2, "b": 3}}'
        return '{"tool": "add", "arguments": {"a": "two", "b": 3}}'

    tracer = Tracer()
    ctx = TaskContext("t", ScriptedBackend(reply), tracer)
    agent = Agent("calc", tools=[add])
    assert "add(a: int, b: int)" in agent.system_text()
    assert ctx.ask(agent, "2+3?").content == "The sum is 5."
    tools = [r for r in tracer.records if r["type"] == "tool"]
    assert tools[0]["error"].startswith("tool add: a: Input should be a valid integer")
    assert tools[1]["result"] == 5 and tools[1]["error"] is None


# ------------------------------------------------------------------------------------------ trace, replay
def _team_yaml(**over):
    cfg = {"name": "t", "answer": {"labels": ["positive", "negative"]},
           "agents": [{"name": "a"}, {"name": "b"}, {"name": "c"}, {"name": "boss"}],
           "teams": [{"name": "panel", "topology": "vote", "members": ["a", "b", "c"]},
                     {"name": "top", "topology": "pipeline", "members": ["panel", "boss"]}],
           "script": [{"agent": "a", "contains": "good", "reply": "positive"}, {"agent": "a", "reply": "negative"},
                      {"agent": "b", "reply": "positive"}, {"agent": "c", "contains": "bad", "reply": "negative"},
                      {"agent": "c", "reply": "positive"}, {"agent": "boss", "reply": "final: {input}"}]}
    cfg.update(over)
    return cfg


def test_trace_records_every_call_and_replay_reproduces_the_run(tmp_path):
    from slimswarm.agents.runner import backend_from_config

    cfg = parse_config(_team_yaml())
    tasks = [{"id": str(i), "input": x, "expected": e} for i, (x, e) in
             enumerate([("a good film", "positive"), ("a bad film", "negative"), ("meh", "positive")])]
    path = tmp_path / "trace.jsonl"
    tracer = Tracer(path)
    report = run_tasks(build_team(cfg), tasks, backend_from_config(cfg, "scripted"), tracer,
                       header={"team_config": cfg.model_dump(by_alias=True, exclude_none=True)})
    tracer.close()
    calls = tracer.calls()
    assert len(calls) == 12 and {c["agent"] for c in calls} == {"a", "b", "c", "boss"}
    for key in ("task", "model", "messages", "reply", "prompt_tokens", "completion_tokens", "cached_tokens",
                "latency_s", "ttft_s", "start", "end", "error"):
        assert key in calls[0]
    assert report.accuracy == 1.0
    summary = agent_summary(calls)
    assert summary["a"]["calls"] == 3 and summary["a"]["latency_p95_s"] is not None
    assert timeline_png(calls, tmp_path / "t.png").stat().st_size > 1000
    replayed, diffs = replay(path)
    assert diffs == [] and [t.output for t in replayed.tasks] == [t.output for t in report.tasks]


def test_replay_errors_clearly_when_the_run_diverges():
    from slimswarm.agents import Message

    rec = {"type": "call", "task": "1", "agent": "a", "messages": [{"role": "user", "content": "hello"}],
           "reply": "hi"}
    be = ReplayBackend([rec])
    a = Agent("a")
    assert be.generate([Message("user", "hello")], a.params, agent=a, task_id="1").text == "hi"
    with pytest.raises(ReplayDivergence, match=r"task 1, agent a, call #1: the trace has no more calls"):
        be.generate([Message("user", "hello")], a.params, agent=a, task_id="1")
    with pytest.raises(ReplayDivergence, match="messages differ"):
        ReplayBackend([rec]).generate([Message("user", "bye")], a.params, agent=a, task_id="1")


# ------------------------------------------------------------------------------------------ YAML validation
@pytest.mark.parametrize("change, message", [
    ({"agents": [{"name": "a", "colour": "red"}]}, r"agents\.0\.colour: Extra inputs are not permitted"),
    ({"teams": [{"name": "x", "topology": "star", "members": ["a"]}]}, r"teams\.0\.topology: Input should be"),
    ({"teams": [{"name": "x", "topology": "pipeline", "members": ["a", "ghost"]}]},
     r"teams\.0 \(x\)\.members: unknown agent or team 'ghost'"),
    ({"agents": [{"name": "a", "adapter": "sst2"}]}, r"agents\.0 \(a\)\.adapter: unknown adapter 'sst2'"),
    ({"agents": [{"name": "a", "endpoint": "far"}]}, r"unknown endpoint 'far'"),
    ({"teams": [{"name": "x", "topology": "orchestrator", "members": ["a"]}]}, r"needs a planner"),
    ({"teams": [{"name": "x", "topology": "pipeline", "members": ["y"]},
                {"name": "y", "topology": "pipeline", "members": ["z"]},
                {"name": "z", "topology": "pipeline", "members": ["a", "x"]}]}, r"team cycle: x -> y -> z -> x"),
])
def test_team_yaml_errors_name_the_field(change, message):
    with pytest.raises(SlimswarmError, match=message) as e:
        parse_config(_team_yaml(**change), "team.yaml")
    assert "\n" not in str(e.value) and str(e.value).startswith("team.yaml: ")


def test_adapter_declared_on_the_model_is_accepted():
    cfg = parse_config(_team_yaml(model={"base": "stories260k", "adapters": {"sst2": "out/sst2"}},
                                  agents=[{"name": n, **({"adapter": "sst2"} if n == "a" else {})}
                                          for n in "abc"] + [{"name": "boss"}]))
    team = build_team(cfg)
    assert next(a for a in team.agents() if a.name == "a").model.adapter == "sst2"


def test_cli_team_run_and_replay_on_the_examples(tmp_path, capsys):
    from slimswarm.cli import main

    trace = tmp_path / "cs.jsonl"
    assert main(["team", "run", "examples/teams/customer_service.yaml", "--tasks", "examples/tasks/mixed.jsonl",
                 "--backend", "scripted", "--trace", str(trace), "--max-tasks", "9"]) == 0
    out = capsys.readouterr().out
    assert "completion_rate" in out and "| router |" in out and trace.with_suffix(".png").exists()
    assert main(["team", "replay", str(trace)]) == 0
    assert "all 9 task outputs equal" in capsys.readouterr().out
    assert main(["team", "run", "examples/teams/nope.yaml", "--tasks", "x.jsonl"]) == 2
    assert "no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ answers, router
def test_answer_extraction():
    assert final_number("so 3 + 4 = 7 apples, total $1,250.00") == "1250"
    assert final_number("#### 72") == "72"
    assert find_label("I think it's sci/tech, not sports", ["World", "Sports", "Business", "Sci/Tech"]) == "Sci/Tech"
    ex = Extractor(["positive", "negative"])
    assert ex.correct("Negative!", "negative") and ex.correct("the answer is 18.", "18")


ARMS = ["s", "t", "m", "m4"]


def _synthetic_bandit(router, rounds, seed, lam=0.3):
    """3 task types, 4 arms: s, t, m are right for their type with p=0.9 (else 0.2); m4 is m's int4 model,
    p=0.88 on math at a quarter of the cost (λ=0.3), so with reward = correct − λ·cost the best arms are s, t and m4.
    Returns per-round rewards and whether the best arm was chosen."""
    rng = np.random.default_rng(seed)
    kinds = ["review sentiment", "news topic", "math sum"]
    best = ["s", "t", "m4"]
    costs = {"s": 1.0, "t": 1.0, "m": 1.0, "m4": 0.25}
    rewards, chose_best = [], []
    for _ in range(rounds):
        k = int(rng.integers(3))
        arm = router.choose(kinds[k]) if router is not None else ARMS[int(rng.integers(len(ARMS)))]
        p = {0: {"s": 0.9}, 1: {"t": 0.9}, 2: {"m": 0.9, "m4": 0.88}}[k].get(arm, 0.2)
        r = reward(bool(rng.random() < p), 1000, costs[arm], lam)
        if router is not None:
            router.update(kinds[k], arm, r)
        rewards.append(r)
        chose_best.append(arm == best[k])
    return np.array(rewards), np.array(chose_best)


@pytest.mark.parametrize("make", [
    lambda f: LinUCBRouter(ARMS, f, alpha=0.5),
    lambda f: EpsilonGreedyRouter(ARMS, f, epsilon=0.1, seed=0),
    lambda f: LinUCBRouter(ARMS, HashedWordFeatures(64), alpha=0.5),
], ids=["linucb", "epsilon-greedy", "linucb-hashed-words"])
def test_learned_router_improves_over_rounds_and_beats_random(make):
    feats = KeywordFeatures({"review": ["review", "sentiment"], "news": ["news", "topic"], "math": ["math", "sum"]})
    r, best = _synthetic_bandit(make(feats), 800, seed=1)
    rand, _ = _synthetic_bandit(None, 800, seed=1)
    assert r[-200:].mean() > r[:50].mean() + 0.05  # reward improves over rounds
    assert r[-200:].mean() > rand.mean() + 0.3  # and beats picking at random (~0.2 here)
    assert best[-200:].mean() > 0.9  # seed 1: both settle on s, t and the int4 arm for math


def test_linucb_keeps_the_exact_ridge_inverse_and_hashed_features_are_stable():
    f = HashedWordFeatures(32)
    x = f("Stocks fell on Monday, Reuters said")
    assert x.shape == (33,) and x[0] == 1.0 and np.linalg.norm(x[1:]) == pytest.approx(1.0)
    assert np.array_equal(x, HashedWordFeatures(32)("stocks FELL on monday reuters said"))  # case/punctuation blind
    r = LinUCBRouter(["a", "b"], f, alpha=0.7)
    texts = ["a great film", "shares rose", "the movie was dull", "oil prices climb", "a great film"]
    A = np.eye(33)
    for i, t in enumerate(texts):
        r.update(t, "a", float(i % 2))
        A += np.outer(f(t), f(t))
    np.testing.assert_allclose(r.A_inv[0], np.linalg.inv(A), atol=1e-10)  # Sherman–Morrison == the inverse
    np.testing.assert_array_equal(r.A_inv[1], np.eye(33))
    with pytest.raises(SlimswarmError, match="hashed"):
        f.key("x")


def test_rule_router_and_route_topology_feedback():
    router = RuleRouter(["s", "m"], {"m": ["sum", "add"]}, default="s")
    assert router.choose("please add 2 and 3") == "m" and router.choose("great film") == "s"
    feats = KeywordFeatures({"math": ["add"]})
    bandit = LinUCBRouter(["s", "m"], feats)
    bandit.lam = 0.0
    team = Team("r", "route", [Agent("s"), Agent("m")], router=bandit, extract=Extractor(number=True))
    be = ScriptedBackend({"s": "no idea", "m": "it is 5"})
    tasks = [{"id": str(i), "input": "add 2 and 3", "expected": "5"} for i in range(12)]
    report = run_tasks(team, tasks, be, Tracer())
    assert [t.correct for t in report.tasks][-5:] == [True] * 5  # it learned to send sums to m


# ------------------------------------------------------------------------------------------ real engine
@pytest.mark.slow
def test_team_on_the_real_engine_batches_concurrent_agent_calls(stories):
    from slimswarm.agents import EngineBackend
    from slimswarm.engine.engine import Engine
    from slimswarm.models.sampling import SamplingParams

    engine = Engine(stories.model, stories.tokenizer, max_batch=4, max_len=256)
    be = EngineBackend(engine, timeout_s=60)
    try:
        voters = [Agent(f"v{i}", system_prompt="Once upon a time", params=SamplingParams(max_tokens=24)) for i in range(3)]
        team = Team("panel", "vote", voters)
        tracer = Tracer()
        tasks = [{"id": "1", "input": "there was a little girl", "expected": None},
                 {"id": "2", "input": "a big dog ran", "expected": None}]
        report = run_tasks(team, tasks, be, tracer)
        st = engine.stats()
        assert report.completion_rate == 1.0 and all(t.output for t in report.tasks)
        assert st["decode_rows"] / st["steps"] > 1  # the three voters' calls shared decode steps
        calls = tracer.calls()
        assert len(calls) == 6 and all(c["completion_tokens"] > 0 and c["ttft_s"] is not None for c in calls)
        assert all(c["prompt_tokens"] > 0 for c in calls)
        assert sum(c["cached_tokens"] for c in calls) > 0  # a shared system-prompt prefix reused
    finally:
        be.close()
