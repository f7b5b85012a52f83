"""Engine layer: an OpenAI chat request's structured-output fields (tools, tool_choice, parallel_tool_calls,
response_format) → the messages to template and the grammar to decode under; bad values raise ToolSpecError
naming the field, for the server's 400."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .grammar import Grammar, GrammarError, closed_objects
from .tools import ToolSet, ToolSpecError, render_history


@dataclass
class ChatPlan:
    messages: list[dict]  # plain system/user/assistant turns for the chat template
    grammar: Grammar | None
    tools: ToolSet | None  # set when the reply may hold tool calls (parse it)


def response_grammar(fmt: Any, compile_check: Callable[[Grammar], Any]) -> Grammar | None:
    """``response_format`` → a grammar (None for text); a schema that does not compile is refused."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise ToolSpecError("response_format must be an object with a type", "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind != "json_schema":
        raise ToolSpecError(f"response_format.type {kind!r} is not supported (text, json_object, json_schema)",
                            "response_format.type")
    js = fmt.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
        raise ToolSpecError("response_format.json_schema.schema: a JSON schema object is required",
                            "response_format.json_schema.schema")
    g = Grammar.json_schema(closed_objects(js["schema"]))
    try:
        compile_check(g)
    except GrammarError as e:
        raise ToolSpecError(f"response_format.json_schema.schema: {e}", "response_format.json_schema.schema") \
            from None
    return g


def plan_chat(messages: list[dict], tools: Any = None, tool_choice: Any = None, parallel_tool_calls: bool = True,
              response_format: Any = None, compile_check: Callable[[Grammar], Any] = lambda g: None) -> ChatPlan:
    """Messages are OpenAI dicts (role, content as text, tool_calls, tool_call_id). ``compile_check`` compiles a
    grammar (raising GrammarError) so each schema's failure is reported against its own field."""
    reply = response_grammar(response_format, compile_check)
    toolset = ToolSet.parse(tools) if tools is not None else None
    if tool_choice is None:
        tool_choice = "auto" if toolset is not None else "none"
    names: list[str] | None = None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ToolSpecError('tool_choice: expected "none", "auto", "required" or '
                                '{"type": "function", "function": {"name": ...}}', "tool_choice")
        if toolset is None or name not in toolset.params:
            have = ", ".join(toolset.params) if toolset is not None else "no tools were sent"
            raise ToolSpecError(f"tool_choice: function {name!r} is not among tools ({have})", "tool_choice")
        names, mode = [name], "named"
    elif tool_choice in ("none", "auto", "required"):
        mode = tool_choice
        if toolset is None and mode != "none":
            raise ToolSpecError(f"tool_choice {mode!r} needs tools", "tool_choice")
    else:
        raise ToolSpecError(f"tool_choice: {tool_choice!r} is not one of none, auto, required, or a named function",
                            "tool_choice")
    if mode == "none":
        return ChatPlan(render_history(messages, None), reply, None)
    text: Grammar | bool = reply if reply is not None else True
    grammar = toolset.grammar(names, parallel=bool(parallel_tool_calls), text=text if mode == "auto" else None,
                              compile_check=compile_check)
    try:
        compile_check(grammar)
    except GrammarError as e:
        raise ToolSpecError(f"tools: {e}", "tools") from None
    return ChatPlan(render_history(messages, toolset), grammar, toolset)
