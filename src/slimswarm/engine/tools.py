"""Engine layer: OpenAI tool calling on models whose chat template has no tool format (SmolLM2's has none): the
tools in the system prompt, the grammar a reply must follow, the reply parsed back into ``tool_calls``, and the
streamed reply cut into OpenAI's tool-call deltas.

The format is the generic one also used by Hermes/Qwen-style templates (and llama.cpp's generic handler):

    system:     ...your system prompt...
                You may call these functions:
                <tools>
                {"name": "add", "description": ..., "parameters": {...}}
                </tools>
                To call one, reply with <tool_call>
                {"name": NAME, "arguments": {...}}
                </tool_call>
    assistant:  <tool_call>
                {"name": "add", "arguments": {"a": 2, "b": 3}}
                </tool_call>
    user:       <tool_response>
                {"name": "add", "content": "5"}
                </tool_response>

The assistant's calls are rendered back into that text in the history, and tool results become user turns, so any
chat template (system/user/assistant only) renders the conversation. Arguments are written by the grammar in
json.dumps' layout (``": "``, ``", "``, no newlines), which is what makes the streamed deltas easy to cut: a call
ends at the first ``}\\n</tool_call>``, which cannot occur inside the arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .grammar import Grammar, GrammarError, closed_objects, json_schema_lark

OPEN, CLOSE = "<tool_call>\n", "}\n</tool_call>"
MAX_PARALLEL = 4  # calls in one reply when parallel_tool_calls is on: a bound keeps a small model from looping
_HEAD = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolSpecError(GrammarError):
    """Bad tools / tool_choice / tool messages; ``param`` names the field (the server answers 400)."""


@dataclass
class ToolSet:
    """The request's tools: name → parameters schema (and the tool dicts as sent, for the prompt)."""

    tools: list[dict]
    params: dict[str, dict] = field(default_factory=dict)

    @staticmethod
    def parse(tools: Any) -> "ToolSet":
        if not isinstance(tools, list) or not tools:
            raise ToolSpecError("tools must be a non-empty list", "tools")
        out, params = [], {}
        for i, t in enumerate(tools):
            where = f"tools[{i}]"
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
                raise ToolSpecError(f"{where}: expected {{\"type\": \"function\", \"function\": {{...}}}}", where)
            fn = t["function"]
            name = fn.get("name")
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ToolSpecError(f"{where}.function.name: {name!r} is not a function name "
                                    "(letters, digits, '_', '-', at most 64)", f"{where}.function.name")
            if name in params:
                raise ToolSpecError(f"{where}.function.name: {name!r} appears twice", f"{where}.function.name")
            schema = fn.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(schema, dict) or schema.get("type", "object") != "object":
                raise ToolSpecError(f"{where}.function.parameters: must be a JSON schema of type \"object\"",
                                    f"{where}.function.parameters")
            params[name] = closed_objects(schema)
            desc = fn.get("description")
            # the prompt shows the schema as sent; the grammar uses it with its objects closed
            out.append({"type": "function", "function": {"name": name, **({"description": desc} if desc else {}),
                                                         "parameters": fn.get("parameters", {})}})
        return ToolSet(out, params)

    def system_text(self) -> str:
        lines = "\n".join(json.dumps(t["function"]) for t in self.tools)
        return (f"You may call these functions:\n<tools>\n{lines}\n</tools>\nTo call one, reply with "
                f"{OPEN}{{\"name\": NAME, \"arguments\": {{...}}{CLOSE}")

    def grammar(self, names: list[str] | None = None, parallel: bool = True, text: Grammar | None | bool = None,
                compile_check=None) -> Grammar:
        """The Lark grammar of a reply: one call (or several when ``parallel``) to one of ``names`` (default: all);
        with ``text`` also a plain reply instead (``True``: any text not starting with '<'; a JSON-schema Grammar:
        a JSON reply), so the model's first token decides between text and a call.

        ``compile_check(Grammar)`` compiles each tool's arguments grammar on its own first, so a bad ``parameters``
        schema is reported against its own tool."""
        names = names or list(self.params)
        rules, alts = [], []
        for k, name in enumerate(names):
            schema = self.params[name]
            if compile_check is not None:
                try:
                    compile_check(Grammar.json_schema(schema))
                except GrammarError as e:
                    i = list(self.params).index(name)
                    raise ToolSpecError(f"tools[{i}].function.parameters: {e}", f"tools[{i}].function.parameters") \
                        from None
            head = OPEN + '{"name": ' + json.dumps(name) + ', "arguments": '
            rules.append(f"call{k}: {json.dumps(head)} args{k} {json.dumps(CLOSE)}")
            rules.append(f"args{k}: {json_schema_lark(schema)}")
            alts.append(f"call{k}")
        rules.append("call: " + " | ".join(alts))
        calls = f'call ("\\n" call){{0,{MAX_PARALLEL - 1}}}' if parallel else "call"
        if text is True:
            start = f"start: {calls} | TEXT"
            rules.append("TEXT: /[^<](.|\\n)*/")
        elif isinstance(text, Grammar):
            start = f"start: {calls} | reply"
            rules.append(f"reply: {json_schema_lark(json.loads(text.source))}")
        else:
            start = f"start: {calls}"
        return Grammar.lark("\n".join([start, *rules]))


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def render_call(name: str, arguments: str) -> str:
    """One call as the model writes it (``arguments``: a JSON string, as OpenAI sends it back in the history)."""
    try:
        args = json.dumps(json.loads(arguments))
    except (json.JSONDecodeError, TypeError):
        args = json.dumps(arguments)  # a client's malformed history: kept visible as a string
    return f'{OPEN}{{"name": {json.dumps(name)}, "arguments": {args}{CLOSE}'


def render_history(messages: list[dict], tools: ToolSet | None) -> list[dict]:
    """OpenAI messages (with assistant ``tool_calls`` and ``tool`` results) as plain system/user/assistant turns;
    the tools' description joins the first system message (or becomes one). Raises ToolSpecError for a tool
    message whose ``tool_call_id`` no earlier assistant call has."""
    out: list[dict] = []
    calls: dict[str, str] = {}  # id -> function name
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            parts = [m["content"]] if m.get("content") else []
            for j, c in enumerate(m["tool_calls"]):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(c.get("id"), str):
                    raise ToolSpecError(f"messages[{i}].tool_calls[{j}]: needs id and function.name",
                                        f"messages[{i}].tool_calls")
                calls[c["id"]] = fn["name"]
                parts.append(render_call(fn["name"], fn.get("arguments", "{}")))
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            cid = m.get("tool_call_id")
            if cid not in calls:
                raise ToolSpecError(f"messages[{i}].tool_call_id: {cid!r} matches no earlier assistant tool call",
                                    f"messages[{i}].tool_call_id")
            body = json.dumps({"name": calls[cid], "content": m["content"]})
            out.append({"role": "user", "content": f"<tool_response>\n{body}\n</tool_response>"})
        else:
            out.append({"role": role, "content": m["content"]})
    # consecutive tool results are one user turn, as the templates that have a tool format render them
    merged: list[dict] = []
    for m in out:
        if merged and m["role"] == "user" and merged[-1]["role"] == "user" \
                and m["content"].startswith("<tool_response>") and merged[-1]["content"].startswith("<tool_response>"):
            merged[-1] = {"role": "user", "content": merged[-1]["content"] + "\n" + m["content"]}
        else:
            merged.append(m)
    if tools is not None:
        if merged and merged[0]["role"] == "system":
            merged[0] = {"role": "system", "content": (merged[0]["content"] + "\n\n" + tools.system_text()).strip()}
        else:
            merged.insert(0, {"role": "system", "content": tools.system_text()})
    return merged


@dataclass
class ParsedCall:
    index: int
    id: str
    name: str | None = None
    arguments: str = ""
    closed: bool = False


class ToolCallParser:
    """Reads the reply text as it grows: decides text or calls (by its start), and yields OpenAI deltas.

    ``feed(text)`` takes the whole text so far and returns new events: ("content", str) or
    ("call", index, id, name) for a call's first chunk, ("args", index, fragment) after it."""

    def __init__(self):
        self.mode: str | None = None  # None (undecided), "text", "calls"
        self.sent = 0  # content characters sent (text mode)
        self.calls: list[ParsedCall] = []
        self._args_sent = 0  # characters of the current call's arguments already sent

    def feed(self, text: str, final: bool = False) -> list[tuple]:
        if self.mode is None:
            if text.startswith(OPEN):
                self.mode = "calls"
            elif OPEN.startswith(text) and not final:
                return []
            else:
                self.mode = "text"
        if self.mode == "text":
            ev = [("content", text[self.sent:])] if len(text) > self.sent else []
            self.sent = len(text)
            return ev
        return self._calls(text, final)

    def _calls(self, text: str, final: bool) -> list[tuple]:
        ev: list[tuple] = []
        pos, k = 0, -1
        while True:
            k += 1
            if k > 0:  # after a closed call: "\n" and the next block
                if not text.startswith("\n" + OPEN, pos):
                    break
                pos += 1
            if not text.startswith(OPEN, pos):
                break
            m = _HEAD.match(text, pos + len(OPEN))
            if m is None:
                break
            if k == len(self.calls):
                c = ParsedCall(k, call_id(), json.loads(m.group(1)))
                self.calls.append(c)
                self._args_sent = 0
                ev.append(("call", k, c.id, c.name))
            c = self.calls[k]
            a = m.end()
            end = text.find(CLOSE, a)
            if c.closed:
                pos = end + len(CLOSE)
                continue
            # the arguments end just before CLOSE; while it has not come, hold back what may be the start of it
            upto = end if end >= 0 else len(text) if final else max(a, len(text) - (len(CLOSE) - 1))
            frag = text[a + self._args_sent: upto]
            if frag:
                ev.append(("args", k, frag))
                self._args_sent += len(frag)
                c.arguments += frag
            if end < 0:
                break
            c.closed = True
            pos = end + len(CLOSE)
        return ev

    def finish(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) for the whole reply; a reply cut short keeps the calls begun so far (the last one's
        ``closed`` False), as a streaming client has received them."""
        self.feed(text, final=True)
        if self.mode == "calls" and self.calls:
            return None, self.calls
        return text, []


def openai_tool_calls(calls: list[ParsedCall]) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
