"""Agent: a named role with a system prompt, a model reference (base + adapter, or an endpoint), settings, tools."""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import ValidationError, validate_call

from ..errors import SlimswarmError
from ..models.sampling import SamplingParams


@dataclass(frozen=True)
class ModelRef:
    """Which weights answer for an agent: a named base model (+ an optional LoRA adapter), or a remote endpoint."""

    base: str | None = None  # a key of the team's models (e.g. "default", "int4"), or a model name for HTTP
    adapter: str | None = None
    endpoint: str | None = None  # a key of the team's endpoints: served remotely, not by the local engine

    def label(self) -> str:
        if self.endpoint:
            return f"endpoint:{self.endpoint}"
        return (self.base or "default") + (f"+{self.adapter}" if self.adapter else "")


class Tool:
    """A typed Python function an agent may call; arguments are validated by pydantic from its type hints."""

    def __init__(self, fn: Callable, name: str | None = None, description: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        self.description = description or (inspect.getdoc(fn) or "").split("\n")[0]
        self.signature = str(inspect.signature(fn))
        self._validated = validate_call(fn)

    def __call__(self, arguments: dict[str, Any]) -> Any:
        """Run with keyword ``arguments``; bad arguments raise SlimswarmError naming the tool and the field."""
        if not isinstance(arguments, dict):
            raise SlimswarmError(f"tool {self.name}: arguments must be a JSON object, got {type(arguments).__name__}")
        try:
            return self._validated(**arguments)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "arguments"
            raise SlimswarmError(f"tool {self.name}: {where}: {err['msg']}") from None

    def describe(self) -> str:
        return f"{self.name}{self.signature}: {self.description}"

    def parameters(self) -> dict:
        """The arguments' JSON schema, from the type hints (``Annotated[..., Field(...)]`` bounds included)."""
        import typing

        from pydantic import create_model

        hints = typing.get_type_hints(self.fn, include_extras=True)  # resolves string (postponed) annotations
        fields = {}
        for p in inspect.signature(self.fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise SlimswarmError(f"tool {self.name}: *args/**kwargs have no schema")
            ann = hints.get(p.name, Any)
            fields[p.name] = (ann, ... if p.default is inspect.Parameter.empty else p.default)
        schema = create_model(f"{self.name}_args", **fields).model_json_schema()
        return _untitled(schema)

    def spec(self) -> dict:
        """The OpenAI ``tools`` entry for this tool."""
        fn = {"name": self.name, "parameters": self.parameters()}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


def _untitled(schema):
    """A pydantic schema without its "title" keys: they cost prompt tokens and say nothing the names do not."""
    if isinstance(schema, dict):
        return {k: _untitled(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if isinstance(schema, list):
        return [_untitled(v) for v in schema]
    return schema


_TOOL_CALL = re.compile(r"\{.*\}", re.S)


def parse_tool_call(text: str) -> tuple[str, Any] | None:
    """A tool call in a reply: a JSON object {"tool": NAME, "arguments": {...}} anywhere in it, else None."""
    m = _TOOL_CALL.search(text)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or "tool" not in obj:
        return None
    return str(obj["tool"]), obj.get("arguments", {})


@dataclass
class Agent:
    name: str
    role: str = ""
    system_prompt: str = ""
    model: ModelRef = field(default_factory=ModelRef)
    params: SamplingParams = field(default_factory=SamplingParams)
    tools: list[Tool] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    cost: float = 1.0  # relative cost of 1k tokens on this agent's model (the router trades it against accuracy)
    max_tool_calls: int = 3
    # how tool calls are decoded where the backend constrains them: "auto" (the model chooses text or a call),
    # "required" (a call every turn until max_tool_calls, then the answer), "none"
    tool_choice: str = "auto"

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[\w.-]+", self.name):
            raise SlimswarmError(f"agent name {self.name!r}: use letters, digits, '_', '-', '.'")
        self.tools = [t if isinstance(t, Tool) else Tool(t) for t in self.tools]
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise SlimswarmError(f"agent {self.name}: duplicate tool names {names}")
        if self.tool_choice not in ("auto", "required", "none"):
            raise SlimswarmError(f"agent {self.name}: tool_choice {self.tool_choice!r} is not auto, required or none")

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    def system_text(self) -> str:
        """The system prompt, with the tool protocol appended when the agent has tools."""
        text = self.system_prompt or (f"You are {self.name}, {self.role}." if self.role else "")
        if self.tools:
            lines = "\n".join(f"- {t.describe()}" for t in self.tools)
            text += ("\nTools (to call one, reply with only JSON {\"tool\": NAME, \"arguments\": {...}}):\n" + lines)
        return text.strip()
