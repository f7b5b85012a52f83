"""Team: named members (agents or teams) run under one topology; nesting is checked for cycles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import SlimswarmError
from .agent import Agent
from .answers import Extractor
from .runtime import TaskContext
from .topologies import TOPOLOGIES, invoke  # noqa: F401  (invoke is re-exported: a member's output)


@dataclass(eq=False)
class Team:
    name: str
    topology: str
    members: list = field(default_factory=list)  # Agent | Team
    planner: Agent | None = None  # orchestrator: decomposes the task
    aggregator: Agent | None = None  # orchestrator / hierarchy / vote: combines results
    rounds: int = 3  # peer / debate rounds
    vote: str = "majority"  # majority | weighted | debate
    router: Any = None  # router.Router for the "route" topology
    extract: Extractor = field(default_factory=Extractor)
    capabilities: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise SlimswarmError(f"team {self.name}: unknown topology {self.topology!r} (one of {', '.join(TOPOLOGIES)})")
        if self.vote not in ("majority", "weighted", "debate"):
            raise SlimswarmError(f"team {self.name}: vote must be majority, weighted or debate, got {self.vote!r}")
        if not self.members:
            raise SlimswarmError(f"team {self.name}: no members")
        if self.rounds < 1:
            raise SlimswarmError(f"team {self.name}: rounds must be >= 1, got {self.rounds}")
        if self.topology == "orchestrator" and self.planner is None:
            raise SlimswarmError(f"team {self.name}: the orchestrator topology needs a planner agent")
        if self.topology == "route" and self.router is None:
            raise SlimswarmError(f"team {self.name}: the route topology needs a router")
        names = [m.name for m in self.members]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise SlimswarmError(f"team {self.name}: member {dup!r} listed twice")

    def member(self, name: str):
        m = next((m for m in self.members if m.name == name), None)
        if m is None:
            raise SlimswarmError(f"team {self.name}: no member {name!r}")
        return m

    def validate(self) -> "Team":
        """Raise on a team that contains itself, naming the cycle (a -> b -> a)."""
        def visit(t: "Team", path: list["Team"]) -> None:
            if any(t is p for p in path):
                cyc = path[next(i for i, p in enumerate(path) if p is t):] + [t]
                raise SlimswarmError("team cycle: " + " -> ".join(p.name for p in cyc))
            for m in t.members:
                if isinstance(m, Team):
                    visit(m, path + [t])

        visit(self, [])
        return self

    def agents(self) -> list[Agent]:
        """Every agent in this team and its sub-teams (planner, aggregator, router agent included), once each."""
        seen: dict[str, Agent] = {}

        def walk(t: "Team") -> None:
            extra = [t.planner, t.aggregator, getattr(t.router, "agent", None)]
            for m in [*t.members, *extra]:
                if isinstance(m, Team):
                    walk(m)
                elif isinstance(m, Agent):
                    seen.setdefault(m.name, m)

        walk(self.validate())
        return list(seen.values())

    def teams(self) -> list["Team"]:
        out = [self]
        for m in self.members:
            if isinstance(m, Team):
                out += [t for t in m.teams() if all(t is not o for o in out)]
        return out

    def needs_logprobs(self) -> bool:
        return any(t.vote == "weighted" for t in self.teams())

    def run(self, text: str, ctx: TaskContext) -> str:
        return TOPOLOGIES[self.topology](self, text, ctx)

