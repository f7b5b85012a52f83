"""Topologies: how a team's members work on one task — pipeline, orchestrator, peer, vote, hierarchy, route."""

from __future__ import annotations

import json
import re

from typing import TYPE_CHECKING

from .agent import Agent
from .runtime import TaskContext, parallel_map
from .voting import debate, majority_vote, normalize, weighted_vote

if TYPE_CHECKING:  # team.py imports this module; the names below are only annotations here
    from .team import Team


def invoke(member, text: str, ctx: TaskContext) -> str:
    """A member's output for ``text``: an agent answers, a team runs its topology."""
    if isinstance(member, Agent):
        return ctx.ask(member, text).content
    return member.run(text, ctx)


def pipeline(team: "Team", text: str, ctx: TaskContext) -> str:
    """Each member transforms the previous member's output; the first gets the task."""
    out = text
    for m in team.members:
        out = invoke(m, out, ctx)
    return out


_NUMBERED = re.compile(r"^\s*(?:\d+[.):]|[-*•])\s+(.+?)\s*$")


def plan_format(team: "Team") -> dict:
    """The planner's reply as a JSON schema (response_format): 2..8 subtasks, each naming one of the members'
    capabilities (or names) — what makes a structured planner's plan fan out instead of parsing to one item."""
    caps = list(dict.fromkeys(c for m in team.members for c in (getattr(m, "capabilities", None) or [m.name])))
    n = len(team.members)
    item = {"type": "object", "properties": {"capability": {"enum": caps},
                                             "task": {"type": "string", "minLength": 3, "maxLength": 100}},
            "required": ["capability", "task"], "additionalProperties": False}
    schema = {"type": "object", "properties": {"subtasks": {"type": "array", "items": item, "minItems": min(2, n),
                                                            "maxItems": min(8, max(2, 2 * n))}},
              "required": ["subtasks"], "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "plan", "schema": schema, "strict": True}}


def parse_subtasks(reply: str) -> list[dict]:
    """Subtasks from a planner's reply: {"subtasks": [...]} (a structured plan), a JSON list (of strings or
    {"task", "capability"} objects) or a numbered / bulleted list. Each is {"task": str, "capability": str | None}."""
    try:
        obj = json.loads(reply)
        if isinstance(obj, dict) and isinstance(obj.get("subtasks"), list):
            return [{"task": str(s["task"]).strip(), "capability": s.get("capability")} for s in obj["subtasks"]
                    if isinstance(s, dict) and str(s.get("task", "")).strip()]
    except json.JSONDecodeError:
        pass
    m = re.search(r"\[.*\]", reply, re.S)
    if m:
        try:
            items = json.loads(m.group(0))
            out = []
            for it in items if isinstance(items, list) else []:
                if isinstance(it, str) and it.strip():
                    out.append({"task": it.strip(), "capability": None})
                elif isinstance(it, dict) and str(it.get("task", "")).strip():
                    out.append({"task": str(it["task"]).strip(), "capability": it.get("capability")})
            if out:
                return out
        except json.JSONDecodeError:
            pass
    out = []
    for line in reply.splitlines():
        mm = _NUMBERED.match(line)
        if mm:
            task, cap = mm.group(1), None
            tag = re.match(r"\[([\w/-]+)\]\s*(.+)", task)  # "1. [math] compute ..." names a capability
            if tag:
                cap, task = tag.group(1), tag.group(2)
            out.append({"task": task, "capability": cap})
    return out


def assign(team: "Team", subtask: dict, i: int):
    """The member for a subtask: one whose capabilities include the named capability, else one whose capability
    word occurs in the subtask's text, else round robin over the members."""
    workers = team.members
    cap = (subtask.get("capability") or "").lower()
    if cap:
        for m in workers:
            if cap in [c.lower() for c in m.capabilities] or cap == m.name.lower():
                return m
    words = subtask["task"].lower()
    for m in workers:
        if any(re.search(r"\b" + re.escape(c.lower()) + r"\b", words) for c in m.capabilities):
            return m
    return workers[i % len(workers)]


def orchestrator(team: "Team", text: str, ctx: TaskContext) -> str:
    """The planner splits the task into subtasks, each goes to a member by capability (all concurrently), and the
    aggregator combines their results. A plan that parses to nothing becomes one subtask: the task itself."""
    caps = ", ".join(f"{m.name} ({', '.join(m.capabilities) or 'general'})" for m in team.members)
    if ctx.structured(team.planner):  # the plan is decoded under its schema: JSON, one item per subtask
        plan = ctx.ask(team.planner, f"Split this task into subtasks, one for each worker who should do part of "
                                     f"it. Workers: {caps}.\n\nTask: {text}", response_format=plan_format(team)).content
    else:
        plan = ctx.ask(team.planner, f"Split this task into subtasks, as a numbered list; start a subtask with "
                                     f"[capability] to choose who does it. Workers: {caps}.\n\nTask: {text}").content
    subtasks = parse_subtasks(plan) or [{"task": text, "capability": None}]
    ctx.notes.setdefault("plans", []).append({"team": team.name, "subtasks": subtasks})
    jobs = [(s, assign(team, s, i)) for i, s in enumerate(subtasks)]
    results = parallel_map(lambda job: invoke(job[1], job[0]["task"], ctx), jobs)
    if team.aggregator is None:
        return "\n".join(results)
    listing = "\n".join(f"{i + 1}. [{m.name}] {s['task']}\n   result: {r.strip()}"
                        for i, ((s, m), r) in enumerate(zip(jobs, results)))
    return ctx.ask(team.aggregator, f"Task: {text}\n\nSubtask results:\n{listing}\n\n"
                                    f"Combine them into the final answer.").content


def _ask(ctx: TaskContext):
    return lambda member, content: invoke(member, content, ctx)


def _pick(replies: list[str], winner: str | None, extract) -> str:
    """The first reply whose extracted answer is the winner (so callers keep the full text)."""
    for r in replies:
        if winner is not None and normalize(extract(r) or "") == winner:
            return r
    return replies[0] if replies else ""


def peer(team: "Team", text: str, ctx: TaskContext) -> str:
    """Members post to a shared board for up to ``rounds`` rounds, each seeing the others' last posts; stops once
    their extracted answers agree. The answer is the last round's majority."""
    ex = team.extract
    result, history = debate(team.members, text, ctx, team.rounds, extract=ex, ask=_ask(ctx))
    ctx.notes.setdefault("votes", []).append({"team": team.name, "scores": result.scores, "rounds": result.rounds,
                                              "agreed": result.agreed})
    return _pick(history[-1], result.answer, ex)


def answer_format(ex) -> dict | None:
    """A voter's ballot as a JSON schema: one of the team's labels (a JSON string), or an integer for numeric
    answers. A bare value, not an object: a ballot must fit the few tokens a voter is given (``"positive"`` is
    three SmolLM2 tokens)."""
    if getattr(ex, "labels", None):
        schema = {"enum": list(ex.labels)}
    elif getattr(ex, "number", False):
        schema = {"type": "integer", "minimum": -10**9, "maximum": 10**9}
    else:
        return None
    return {"type": "json_schema", "json_schema": {"name": "ballot", "schema": schema, "strict": True}}


def vote(team: "Team", text: str, ctx: TaskContext) -> str:
    """Members answer independently and vote (majority, confidence-weighted, or debate rounds); an aggregator,
    when set, sees the ballots and writes the final answer."""
    ex = team.extract
    if team.vote == "debate":
        return peer(team, text, ctx)
    replies = []

    fmt = answer_format(ex)

    def one(m):
        if not isinstance(m, Agent):  # a sub-team
            return m.run(text, ctx), None
        if fmt is not None and ctx.structured(m):  # the ballot is decoded under its schema: no parsing to miss
            msg = ctx.ask(m, text, response_format=fmt)
            try:
                content = str(json.loads(msg.content))
            except json.JSONDecodeError:
                content = msg.content  # cut by max_tokens: left to the extractor
        else:
            msg = ctx.ask(m, text)
            content = msg.content
        return content, getattr(msg.metadata.get("completion"), "logprobs", None)

    outs = parallel_map(one, team.members)
    replies = [o for o, _ in outs]
    answers = [ex(o) for o in replies]
    result = weighted_vote(answers, [lp for _, lp in outs]) if team.vote == "weighted" else majority_vote(answers)
    ctx.notes.setdefault("votes", []).append({"team": team.name, "scores": result.scores, "method": team.vote})
    if team.aggregator is not None:
        ballots = "\n".join(f"- {m.name}: {r.strip()}" for m, r in zip(team.members, replies))
        return ctx.ask(team.aggregator, f"Task: {text}\n\nVotes:\n{ballots}\n\nWinner by {team.vote} vote: "
                                        f"{result.answer}. Give the final answer.").content
    return _pick(replies, result.answer, ex)


def hierarchy(team: "Team", text: str, ctx: TaskContext) -> str:
    """A team of teams: every member (agent or sub-team) works on the task concurrently; the lead (aggregator)
    combines their outputs, or without one the members' majority answer wins."""
    outs = parallel_map(lambda m: invoke(m, text, ctx), team.members)
    if team.aggregator is None:
        return _pick(outs, majority_vote([team.extract(o) for o in outs]).answer, team.extract)
    reports = "\n".join(f"- {m.name}: {o.strip()}" for m, o in zip(team.members, outs))
    return ctx.ask(team.aggregator, f"Task: {text}\n\nReports from your teams:\n{reports}\n\n"
                                    f"Give the final answer.").content


def route(team: "Team", text: str, ctx: TaskContext) -> str:
    """The team's router picks one member for the task; the choice is noted so the runner can reward it."""
    arm = team.router.choose(text, ctx)
    member = team.member(arm)
    before = ctx.used_tokens
    out = invoke(member, text, ctx)
    ctx.notes.setdefault("routes", []).append({"team": team, "text": text, "arm": arm,
                                               "tokens": ctx.used_tokens - before,
                                               "cost": getattr(member, "cost", 1.0)})
    return out


TOPOLOGIES = {"pipeline": pipeline, "orchestrator": orchestrator, "peer": peer, "vote": vote,
              "hierarchy": hierarchy, "route": route}
