"""TaskContext: runs one agent call for one task — tracing it, counting its tokens against the budget, tools."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from ..errors import SlimswarmError
from .agent import Agent, parse_tool_call
from .backends import Backend
from .message import Message


class BudgetExceeded(SlimswarmError):
    """The task used more tokens than its budget: it stops and is recorded as ``budget_exceeded``."""


@dataclass
class TaskContext:
    task_id: str
    backend: Backend
    tracer: object | None = None  # a trace.Tracer
    budget_tokens: int | None = None
    logprobs: bool = False  # ask backends for token log-probabilities (confidence-weighted votes need them)
    used_tokens: int = 0
    calls: int = 0
    notes: dict = field(default_factory=dict)  # topologies leave things here (router choices, vote counts)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _charge(self, tokens: int) -> None:
        with self._lock:
            self.used_tokens += tokens
            self.calls += 1
            over = self.budget_tokens is not None and self.used_tokens > self.budget_tokens
        if over:
            raise BudgetExceeded(f"task {self.task_id}: {self.used_tokens} tokens used, budget {self.budget_tokens}")

    def check_budget(self) -> None:
        if self.budget_tokens is not None and self.used_tokens >= self.budget_tokens:
            raise BudgetExceeded(f"task {self.task_id}: budget of {self.budget_tokens} tokens spent")

    def structured(self, agent: Agent) -> bool:
        """Whether this agent's backend decodes tool calls and schemas under a grammar."""
        pick = getattr(self.backend, "structured_for", None)
        return bool(pick(agent) if pick is not None else getattr(self.backend, "structured", False))

    def complete(self, agent: Agent, messages: list[Message], structured: dict | None = None):
        """One backend call, traced (success or failure) and charged to the budget."""
        self.check_budget()
        start = time.time()
        comp, err = None, None
        kw = {"structured": structured} if structured else {}
        try:
            comp = self.backend.generate(messages, agent.params, agent=agent, task_id=self.task_id,
                                         logprobs=self.logprobs, **kw)
        except Exception as e:
            err = str(e) if isinstance(e, SlimswarmError) else f"{type(e).__name__}: {e}"
            raise
        finally:
            if self.tracer is not None:
                self.tracer.call(self.task_id, agent, self.backend.model_label(agent), messages, comp, start,
                                 time.time(), err, structured)
        self._charge(comp.prompt_tokens + comp.completion_tokens)
        return comp

    def ask(self, agent: Agent, content: str, history: list[Message] | None = None,
            response_format: dict | None = None) -> Message:
        """The agent's reply to ``content`` (after ``history``), running its tool calls in between.

        On a structured backend tool calls are decoded under the tools' grammar and ``response_format`` (OpenAI's
        shape) constrains the answer; elsewhere the agent follows the text protocol and the format is a wish."""
        structured = self.structured(agent)
        system = agent.system_prompt or (f"You are {agent.name}, {agent.role}." if agent.role else "")
        if structured and (agent.tools or response_format):
            msgs = ([Message("system", system)] if system else []) + list(history or [])
            msgs.append(Message("user", content))
            return self._ask_structured(agent, msgs, response_format)
        msgs = ([Message("system", agent.system_text())] if agent.system_text() else []) + list(history or [])
        msgs.append(Message("user", content))
        for _ in range(agent.max_tool_calls + 1):
            comp = self.complete(agent, msgs)
            call = parse_tool_call(comp.text) if agent.tools else None
            if call is None:
                return Message("assistant", comp.text, agent.name, {"completion": comp})
            name, args = call
            tool = agent.tool(name)
            result, error = None, None
            try:
                if tool is None:
                    raise SlimswarmError(f"unknown tool {name!r} (have: {', '.join(t.name for t in agent.tools)})")
                result = tool(args)
            except SlimswarmError as e:  # bad arguments are the model's mistake: tell it, record it, go on
                error = str(e)
            except Exception as e:  # a tool that crashes must not crash the team either
                error = f"tool {name}: {type(e).__name__}: {e}"
            if self.tracer is not None:
                self.tracer.tool(self.task_id, agent.name, name, args, result, error)
            msgs.append(Message("assistant", comp.text, agent.name))
            msgs.append(Message("tool", f"error: {error}" if error else json.dumps(result, default=str), name,
                                {"error": error} if error else {}))
        return Message("assistant", comp.text, agent.name, {"completion": comp, "tool_calls_exhausted": True})

    def _ask_structured(self, agent: Agent, msgs: list[Message], response_format: dict | None) -> Message:
        """The tool loop on a structured backend: every call is valid against its tool's schema by construction;
        it ends when the model answers, after ``max_tool_calls`` calls (the last turn is decoded with
        tool_choice none), or when the task's budget is spent (BudgetExceeded)."""
        specs = [t.spec() for t in agent.tools] or None
        made = 0
        while True:
            choice = None if specs is None else (agent.tool_choice if made < agent.max_tool_calls else "none")
            # one call a turn keeps max_tool_calls an exact bound
            comp = self.complete(agent, msgs, {"tools": specs, "tool_choice": choice, "response_format": response_format,
                                               "parallel_tool_calls": False if specs else None})
            if not comp.tool_calls:
                return Message("assistant", comp.text, agent.name, {"completion": comp})
            msgs.append(Message("assistant", "", agent.name, {"tool_calls": comp.tool_calls}))
            for call in comp.tool_calls:
                name = call["function"]["name"]
                result, error, args = None, None, call["function"].get("arguments", "{}")
                try:
                    args = json.loads(args)
                    result = agent.tool(name)(args)
                except json.JSONDecodeError as e:
                    error = f"tool {name}: arguments are not JSON ({e.msg})"
                except SlimswarmError as e:
                    error = str(e)
                except Exception as e:
                    error = f"tool {name}: {type(e).__name__}: {e}"
                if self.tracer is not None:
                    self.tracer.tool(self.task_id, agent.name, name, args, result, error)
                msgs.append(Message("tool", f"error: {error}" if error else json.dumps(result, default=str), name,
                                    {"tool_call_id": call["id"], **({"error": error} if error else {})}))
                made += 1


def parallel_map(fn, items: list) -> list:
    """``[fn(x) for x in items]`` on threads (so an engine backend batches the calls), results in order; the first
    exception is raised. A fresh pool per fan-out: nested teams never wait on a pool their parent holds."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="agent") as pool:
        futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]
