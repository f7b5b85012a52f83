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

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[\w.-]+", self.name):
            raise SlimswarmError(f"agent name {self.name!r}: use letters, digits, '_', '-', '.'")
        self.tools = [t if isinstance(t, Tool) else Tool(t) for t in self.tools]
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise SlimswarmError(f"agent {self.name}: duplicate tool names {names}")

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    def system_text(self) -> str:
        """The system prompt, with the tool protocol appended when the agent has tools."""
        text = self.system_prompt or (f"You are {self.name}, {self.role}." if self.role else "")
        if self.tools:
            lines = "\n".join(f"- {t.describe()}" for t in self.tools)
            text += ("\nTools (to call one, reply with only JSON {\"tool\": NAME, \"arguments\": {...}}):\n" + lines)
        return text.strip()
