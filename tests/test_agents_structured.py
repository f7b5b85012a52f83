"""Our agents on structured backends (stories260k): typed tools become JSON schemas, tool calls are decoded under
them on the engine and over HTTP, the loop is bounded by max_tool_calls and the budget, replay reproduces the
calls, the planner's plan fans out by its schema, and voters' ballots are labels by construction."""

import copy
import json
import socket
import threading
import time
from typing import Annotated

import jsonschema
import pytest
from pydantic import Field

from slimswarm.agents.agent import Agent, Tool
from slimswarm.agents.backends import EngineBackend, HTTPBackend, ReplayBackend
from slimswarm.agents.answers import Extractor
from slimswarm.agents.runtime import BudgetExceeded, TaskContext
from slimswarm.agents.team import Team
from slimswarm.agents.tools import calculator, lookup
from slimswarm.agents.trace import Tracer
from slimswarm.engine.engine import Engine
from slimswarm.models.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def inc(n: Annotated[int, Field(ge=0, le=9)]) -> int:
    """Add one."""
    return n + 1


@pytest.fixture(scope="module")
def engine(stories):
    eng = Engine(copy.deepcopy(stories.model), stories.tokenizer, max_batch=8, max_len=512)
    yield eng
    eng.stop()


def test_typed_tools_become_json_schemas():
    assert Tool(inc).spec() == {"type": "function", "function": {"name": "inc", "description": "Add one.",
                                "parameters": {"type": "object", "required": ["n"], "properties": {
                                    "n": {"type": "integer", "minimum": 0, "maximum": 9}}}}}
    calc = Tool(calculator).parameters()["properties"]["expression"]
    assert calc["maxLength"] == 80 and calc["pattern"].startswith("^[0-9")
    assert Tool(lookup)({"key": "eggs in a dozen"}) == "12"


def test_engine_tool_loop_calls_valid_tools_until_max_tool_calls_then_answers_and_replays(engine):
    backend = EngineBackend(engine)
    agent = Agent("counter", system_prompt="Count.", tools=[inc], tool_choice="required", max_tool_calls=2,
                  params=SamplingParams(max_tokens=60))
    tracer = Tracer()
    ctx = TaskContext("t0", backend, tracer)
    reply = ctx.ask(agent, "Add one to 3.")
    tools = [r for r in tracer.records if r["type"] == "tool"]
    calls = tracer.calls()
    assert len(tools) == 2 and all(r["error"] is None and r["result"] == r["arguments"]["n"] + 1 for r in tools)
    assert [bool(c.get("tool_calls")) for c in calls] == [True, True, False]  # the third turn had tool_choice none
    assert [c["structured"]["tool_choice"] for c in calls] == ["required", "required", "none"]
    for c in calls[:2]:
        jsonschema.validate(json.loads(c["tool_calls"][0]["function"]["arguments"]), Tool(inc).parameters())
    assert reply.content == calls[-1]["reply"] and not reply.content.startswith("<tool_call>")
    # the model saw its calls and their results: the last prompt holds both, as the generic format renders them
    last = calls[-1]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert last[3]["metadata"]["tool_call_id"] == calls[0]["tool_calls"][0]["id"]
    again = TaskContext("t0", ReplayBackend(tracer.records), Tracer()).ask(agent, "Add one to 3.")
    assert again.content == reply.content


def test_the_tool_loop_stops_when_the_budget_is_spent(engine):
    agent = Agent("counter", tools=[inc], tool_choice="required", max_tool_calls=50,
                  params=SamplingParams(max_tokens=60))
    tracer = Tracer()
    with pytest.raises(BudgetExceeded):
        TaskContext("t1", EngineBackend(engine), tracer, budget_tokens=900).ask(agent, "Add one to 3.")
    assert 1 <= len([r for r in tracer.records if r["type"] == "tool"]) < 50


def test_http_backend_sends_tools_and_gets_structured_calls(stories):
    import uvicorn

    from slimswarm.engine.server import create_app

    eng = Engine(copy.deepcopy(stories.model), stories.tokenizer, max_batch=4, max_len=512).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(eng, "stories260k"), host="127.0.0.1", port=port,
                                           log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    try:
        backend = HTTPBackend(f"http://127.0.0.1:{port}", model="stories260k")
        agent = Agent("counter", tools=[inc], tool_choice="required", max_tool_calls=1,
                      params=SamplingParams(max_tokens=60))
        tracer = Tracer()
        TaskContext("t2", backend, tracer).ask(agent, "Add one to 3.")
        [tool] = [r for r in tracer.records if r["type"] == "tool"]
        assert tool["error"] is None and tool["result"] == tool["arguments"]["n"] + 1
        assert tracer.calls()[0]["tool_calls"][0]["id"].startswith("call_")
    finally:
        server.should_exit = True
        th.join(10)
        eng.stop()


def test_a_structured_planner_fans_out_to_every_capability_and_voters_answer_labels(engine):
    writers = [Agent(f"{c}_writer", capabilities=[c], params=SamplingParams(max_tokens=8))
               for c in ("intro", "body", "conclusion")]
    planner = Agent("outliner", system_prompt="Plan an article in sections.", params=SamplingParams(max_tokens=300))
    team = Team("newsroom", "orchestrator", writers, planner=planner)
    ctx = TaskContext("t3", EngineBackend(engine), Tracer())
    team.run("Write about bread.", ctx)
    [plan] = ctx.notes["plans"]
    assert len(plan["subtasks"]) >= 2 and {s["capability"] for s in plan["subtasks"]} <= {"intro", "body", "conclusion"}
    assert all(s["task"] for s in plan["subtasks"])
    panel = Team("panel", "vote", [Agent(f"critic{i}", params=SamplingParams(max_tokens=16, temperature=1.0, seed=i))
                                   for i in range(3)], extract=Extractor(["positive", "negative"]))
    vctx = TaskContext("t4", EngineBackend(engine), Tracer())
    out = panel.run("Is this review positive or negative? A charming film.", vctx)
    assert out in ("positive", "negative") and sum(vctx.notes["votes"][0]["scores"].values()) == 3
