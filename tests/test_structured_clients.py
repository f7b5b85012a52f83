"""Tool calls and structured outputs through the real client packages against a live `slimswarm serve` on loopback
(stories260k; SmolLM2 for the two agent loops, whose history outgrows stories260k's context): openai (tools with tool_choice required/named/auto/none, chat.completions.parse with a Pydantic model,
streamed tool-call deltas), langchain-openai (bind_tools, with_structured_output), a LangGraph ReAct loop, the
OpenAI Agents SDK and an autogen-agentchat AssistantAgent; plus the 400s for bad tools, schemas, tool_choice and tool messages."""

import copy
import json
import os
import socket
import threading
import time

import httpx
import jsonschema
import pytest
from typing import Annotated

from pydantic import BaseModel, Field

from slimswarm.engine.engine import Engine
from slimswarm.engine.server import create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# stories260k's 512-token context holds the tool list, a question and a reply only when the schemas are short
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"]}}}
CITY = {"type": "function", "function": {"name": "city", "parameters": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 9}}, "required": ["name"]}}}
ASK = [{"role": "user", "content": "Add 2 and 3."}]
Small = Annotated[int, Field(ge=0, le=99)]  # a bounded integer: an unbounded one lets stories260k write digits forever


class Pet(BaseModel):
    name: str = Field(max_length=10)
    legs: int = Field(ge=0, le=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(loaded, name, max_len):
    import uvicorn

    eng = Engine(copy.deepcopy(loaded.model), loaded.tokenizer, max_batch=4, max_len=max_len).start()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(eng, name), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.time()
    while not server.started:
        assert time.time() - t0 < 30, "server did not start"
        time.sleep(0.05)

    def close():
        server.should_exit = True
        thread.join(10)
        eng.stop()

    return f"http://127.0.0.1:{port}/v1", close


@pytest.fixture(scope="module")
def live(stories):
    url, close = _serve(stories, "stories260k", 512)
    yield url
    close()


@pytest.fixture(scope="module")
def live_smollm2(smollm2):
    """SmolLM2 where a conversation outgrows stories260k's 512-token context (a tool loop's history)."""
    url, close = _serve(smollm2, "smollm2-135m", 2048)
    yield url
    close()


@pytest.fixture(scope="module")
def client(live):
    from openai import OpenAI

    return OpenAI(base_url=live, api_key="none", max_retries=0, timeout=120)


def _valid_call(call, tools):
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert call.id.startswith("call_") and call.type == "function"


def test_openai_tool_choice_required_named_auto_and_none(client):
    tools = [ADD, CITY]
    req = client.chat.completions.create(model="stories260k", messages=ASK, tools=tools, tool_choice="required",
                                         temperature=0, max_tokens=100, parallel_tool_calls=False)
    assert req.choices[0].finish_reason == "tool_calls" and req.choices[0].message.content is None
    [call] = req.choices[0].message.tool_calls
    _valid_call(call, tools)
    named = client.chat.completions.create(model="stories260k", messages=ASK, tools=tools, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           max_tokens=100, parallel_tool_calls=False)
    assert named.choices[0].finish_reason == "tool_calls"
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "add"
    _valid_call(call, tools)
    # auto: stories260k never saw a tool call, so its first token is prose and the grammar lets it write prose
    auto = client.chat.completions.create(model="stories260k", messages=ASK, tools=tools, temperature=0,
                                          max_tokens=40)
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].message.content
    assert not auto.choices[0].message.content.startswith("<")
    none = client.chat.completions.create(model="stories260k", messages=ASK, tools=tools, tool_choice="none",
                                          temperature=0, max_tokens=40)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


def test_openai_streamed_tool_call_deltas_reassemble_to_the_unstreamed_calls(client):
    # parallel calls on: stories260k writes the most the grammar allows (4)
    inc = {"type": "function", "function": {"name": "inc", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}}}
    kw = dict(model="stories260k", messages=ASK, tools=[inc], tool_choice="required", temperature=0, max_tokens=260)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    calls: dict[int, dict] = {}
    for ch in chunks:
        for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert c["id"] is None and d.function.name  # the first delta of a call has its id and name
                c["id"], c["name"] = d.id, d.function.name
            c["arguments"] += d.function.arguments or ""
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert len(calls) == 4 and whole.finish_reason == "tool_calls"
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls) > len(calls)  # fragments
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_openai_parse_with_a_pydantic_model_and_json_object(client):
    for temp in (0.0, 1.0):
        r = client.chat.completions.parse(model="stories260k", messages=[{"role": "user", "content": "A pet"}],
                                          response_format=Pet, max_tokens=100, temperature=temp, seed=3)
        assert isinstance(r.choices[0].message.parsed, Pet) and r.choices[0].finish_reason == "stop"
    obj = client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": "JSON"}],
                                         response_format={"type": "json_object"}, max_tokens=150, temperature=0)
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # an open object may run past max_tokens; it then says so
        assert obj.choices[0].finish_reason == "length" and obj.choices[0].message.content.startswith("{")


def test_history_with_tool_calls_tool_results_developer_role_and_names(client):
    history = [{"role": "developer", "content": "Use tools."},
               {"role": "user", "content": "Add 2 and 3.", "name": "sam"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_a", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
               {"role": "tool", "tool_call_id": "call_a", "content": "5"}]
    r = client.chat.completions.create(model="stories260k", messages=history, tools=[ADD], tool_choice="none",
                                       max_completion_tokens=10, temperature=0, user="ignored-extra-field")
    assert r.choices[0].message.content is not None and r.usage.completion_tokens <= 10


def test_the_rendered_history_holds_the_calls_and_results_in_the_generic_format():
    from slimswarm.engine.chat_plan import plan_chat

    history = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "5"}]
    plan = plan_chat(history, [ADD], "auto")
    assert [m["role"] for m in plan.messages] == ["system", "user", "assistant", "user"]
    assert plan.messages[0]["content"].startswith("Be brief.\n\nYou may call these functions:\n<tools>\n")
    assert plan.messages[2]["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    assert plan.messages[3]["content"] == '<tool_response>\n{"name": "add", "content": "5"}\n</tool_response>'


@pytest.mark.parametrize("extra, param, message", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "foo"}}}}}]},
     "tools[0].function.parameters", "Invalid type: foo"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "oops"}}]},
     "tools[0].function.parameters", 'must be a JSON schema of type "object"'),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "mul"}}},
     "tool_choice", "function 'mul' is not among tools (add)"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice 'required' needs tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}},
     "response_format.json_schema.schema", 'Unimplemented keys: ["uniqueItems"]'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "a JSON schema object is required"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "'yaml' is not supported"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "5"}]},
     "messages[1].tool_call_id", "'call_x' matches no earlier assistant tool call"),
])
def test_bad_tools_schemas_and_tool_messages_are_400s_naming_the_field(live, extra, param, message):
    body = {"model": "stories260k", "messages": ASK, "max_tokens": 8, **extra}
    r = httpx.post(live + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"] and err["type"] == "invalid_request_error"


def test_langchain_bind_tools_and_with_structured_output(live):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: Small, b: Small) -> int:
        """Add two integers."""
        return a + b

    llm = ChatOpenAI(model="stories260k", base_url=live, api_key="none", temperature=0, max_tokens=100,
                     max_retries=0)
    # one call a reply: stories260k would otherwise write the most calls the grammar allows
    msg = llm.bind_tools([add], tool_choice="add", parallel_tool_calls=False).invoke("Use the add tool to add 2 and 3.")
    assert [c["name"] for c in msg.tool_calls][:1] == ["add"]
    assert all(isinstance(c["args"]["a"], int) and isinstance(c["args"]["b"], int) for c in msg.tool_calls)
    anyone = llm.bind_tools([add], tool_choice="any", parallel_tool_calls=False).invoke("Add 2 and 3.")  # langchain's "any" = required
    assert anyone.tool_calls and anyone.tool_calls[0]["name"] == "add"
    pet = llm.with_structured_output(Pet).invoke("Describe a pet.")  # default method: json_schema
    assert isinstance(pet, Pet)


@pytest.mark.slow
def test_langgraph_react_agent_calls_a_tool_twice_then_answers(live_smollm2):
    """The script is the tool_choice schedule only (a call is required on the first two model turns, none after);
    which tool, its arguments and the final text are the model's own, decoded under the grammar."""
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    seen = []

    @tool
    def add(a: Small, b: Small) -> int:
        """Add two integers."""
        seen.append((a, b))
        return a + b

    llm = ChatOpenAI(model="smollm2-135m", base_url=live_smollm2, api_key="none", temperature=0, max_tokens=40,
                     max_retries=0)

    def model(state, runtime):
        done = sum(isinstance(m, ToolMessage) for m in state["messages"])
        return llm.bind_tools([add], tool_choice="required" if done < 2 else "none", parallel_tool_calls=False)

    agent = create_react_agent(model, [add])
    out = agent.invoke({"messages": [("user", "Add 2 and 3, then add 4 to it.")]}, {"recursion_limit": 10})
    kinds = [type(m).__name__ for m in out["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert len(seen) == 2 and all(isinstance(a, int) and isinstance(b, int) for a, b in seen)
    tool_msgs = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert [m.content for m in tool_msgs] == [str(a + b) for a, b in seen]
    final = out["messages"][-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and final.content


@pytest.mark.slow
def test_openai_agents_sdk_with_a_tool_and_an_output_type(live_smollm2):
    os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"  # nothing leaves the machine
    from dataclasses import replace

    from agents import (Agent, AgentHooks, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool,
                        set_tracing_disabled)
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    seen = []

    @function_tool
    def add(a: Small, b: Small) -> int:
        """Add two integers."""
        seen.append((a, b))
        return a + b

    class Answer(BaseModel):
        value: int = Field(ge=-999, le=999)

    model = OpenAIChatCompletionsModel(model="smollm2-135m", openai_client=AsyncOpenAI(
        base_url=live_smollm2, api_key="none", max_retries=0))
    class NoMoreCalls(AgentHooks):
        """The script: a call is required on the first turn, none after it (then only the output_type's JSON)."""

        async def on_tool_end(self, context, agent, tool, result):
            agent.model_settings = replace(agent.model_settings, tool_choice="none")

    # reset_tool_choice off: the SDK would set tool_choice back to auto after the call, over the hook's "none"
    agent = Agent(name="adder", instructions="Add.", model=model, tools=[add], output_type=Answer,
                  hooks=NoMoreCalls(), reset_tool_choice=False, model_settings=ModelSettings(tool_choice="required", temperature=0,
                                                                    max_tokens=40, parallel_tool_calls=False))
    result = Runner.run_sync(agent, "Add 2 and 3.", max_turns=4)
    assert len(seen) == 1 and all(isinstance(x, int) for x in seen[0])
    assert isinstance(result.final_output, Answer)
    assert result.final_output.value == sum(seen[0])  # greedy SmolLM2 read the tool's result (2 + 3 here)


@pytest.mark.slow
def test_autogen_assistant_agent_calls_a_python_tool_through_the_constrained_call(live_smollm2):
    """autogen-agentchat's AssistantAgent with a Python tool and OpenAIChatCompletionClient (model_info declaring
    function calling). The agent asks with tool_choice auto, under which the 135M base answers in prose; the client
    below only turns the tool step's auto into required (the script is that schedule, as in the LangGraph test).
    The tool, its arguments and the reflection's text are the model's own; autogen parses the call and runs it."""
    import asyncio

    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.messages import TextMessage, ToolCallExecutionEvent, ToolCallRequestEvent
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    seen, tool_choices = [], []

    def add(a: Annotated[int, "the first number"], b: Annotated[int, "the second number"]) -> int:
        """Add two integers."""  # autogen reads Annotated metadata as a description (a string), not a bound
        seen.append((a, b))
        return a + b

    class ToolStepRequired(OpenAIChatCompletionClient):
        async def create(self, messages, *, tools=(), tool_choice="auto", **kw):
            tool_choice = "required" if tools and tool_choice == "auto" else tool_choice
            tool_choices.append(tool_choice)
            return await super().create(messages, tools=tools, tool_choice=tool_choice, **kw)

    client = ToolStepRequired(model="smollm2-135m", base_url=live_smollm2, api_key="none", temperature=0,
                              max_tokens=40, max_retries=0, parallel_tool_calls=False,
                              model_info={"vision": False, "function_calling": True, "json_output": True,
                                          "structured_output": True, "family": "unknown"})
    agent = AssistantAgent("adder", model_client=client, tools=[add], reflect_on_tool_use=True,
                           system_message="You add numbers with the add tool.")

    async def run():
        try:
            return await agent.run(task="Add 2 and 3.")
        finally:
            await client.close()

    result = asyncio.run(run())
    kinds = [type(m).__name__ for m in result.messages]
    assert kinds == ["TextMessage", "ToolCallRequestEvent", "ToolCallExecutionEvent", "TextMessage"], kinds
    assert tool_choices == ["required", "none"]  # the tool step, then autogen's own reflection step
    [call] = result.messages[1].content
    assert isinstance(result.messages[1], ToolCallRequestEvent) and call.name == "add"
    assert call.id.startswith("call_") and json.loads(call.arguments) == {"a": seen[0][0], "b": seen[0][1]}
    [done] = result.messages[2].content
    assert isinstance(result.messages[2], ToolCallExecutionEvent) and not done.is_error
    assert len(seen) == 1 and done.content == str(sum(seen[0]))
    final = result.messages[3]
    assert isinstance(final, TextMessage) and final.source == "adder" and final.content.strip()
