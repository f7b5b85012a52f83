"""The generic tool-call format: the incremental parser's deltas add up to the whole reply's calls whatever the
chunking, text that only looks like a call's start stays text, and tool specs are checked field by field."""

import json
import random

import pytest

from slimswarm.engine.grammar import closed_objects
from slimswarm.engine.tools import ToolCallParser, ToolSet, ToolSpecError, render_call

REPLY = ('<tool_call>\n{"name": "lookup", "arguments": {"key": "a } b \\" {", "n": [1, {"x": 2}]}}\n</tool_call>\n'
         '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>')


@pytest.mark.parametrize("seed", range(5))
def test_deltas_in_any_chunking_reassemble_to_the_calls(seed):
    rng = random.Random(seed)
    p, text, events = ToolCallParser(), "", []
    i = 0
    while i < len(REPLY):
        j = min(len(REPLY), i + rng.randint(1, 9))
        text = REPLY[:j]
        events += p.feed(text, final=j == len(REPLY))
        i = j
    heads = [e for e in events if e[0] == "call"]
    args: dict[int, str] = {}
    for e in events:
        if e[0] == "args":
            args[e[1]] = args.get(e[1], "") + e[2]
    assert [h[3] for h in heads] == ["lookup", "add"] and len({h[2] for h in heads}) == 2
    assert json.loads(args[0]) == {"key": 'a } b " {', "n": [1, {"x": 2}]} and json.loads(args[1]) == {"a": 2, "b": 3}
    content, calls = ToolCallParser().finish(REPLY)
    assert content is None and [c.arguments for c in calls] == [args[0], args[1]] and all(c.closed for c in calls)


def test_text_that_starts_like_a_call_but_is_not_one_stays_text():
    p = ToolCallParser()
    assert p.feed("<") == [] and p.feed("<tool") == []  # undecided: could still become a call
    assert p.feed("<tools are fun") == [("content", "<tools are fun")]
    assert ToolCallParser().finish("<to") == ("<to", [])  # the reply ended undecided: it was text
    assert ToolCallParser().finish("Hello") == ("Hello", [])


def test_a_reply_cut_inside_a_call_keeps_the_calls_begun():
    cut = REPLY[: REPLY.index('"a": 2') + 4]
    content, calls = ToolCallParser().finish(cut)
    assert content is None and [c.closed for c in calls] == [True, False] and calls[1].arguments == '{"a":'


def test_history_rendering_normalizes_arguments_and_keeps_bad_ones_visible():
    assert render_call("add", '{"a":2,"b":3}') == '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    assert '"arguments": "{oops"' in render_call("add", "{oops")


@pytest.mark.parametrize("tools, where", [
    ([], "tools must be a non-empty list"),
    ([{"type": "retrieval"}], "tools[0]: expected"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name: 'has space'"),
    ([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}],
     "tools[1].function.name: 'f' appears twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
     'tools[0].function.parameters: must be a JSON schema of type "object"'),
])
def test_malformed_tools_are_refused_naming_the_field(tools, where):
    with pytest.raises(ToolSpecError, match="^" + __import__("re").escape(where)):
        ToolSet.parse(tools)


def test_closed_objects_closes_only_objects_that_say_nothing_about_extra_keys():
    s = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
                                          "c": {"type": "object", "properties": {}, "additionalProperties": True}}}
    out = closed_objects(s)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["additionalProperties"] is True and "additionalProperties" not in s
