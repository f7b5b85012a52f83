"""Voting: majority over normalized answers, confidence-weighted votes, and debate rounds that stop on agreement."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from .agent import Agent
from .runtime import TaskContext, parallel_map


def normalize(answer: str) -> str:
    """Case, surrounding punctuation and whitespace do not change a vote; numbers lose thousands separators."""
    a = answer.strip().lower()
    a = re.sub(r"(?<=\d),(?=\d{3}\b)", "", a)
    a = re.sub(r"\s+", " ", a)
    return a.strip(" .!?:;\"'`*")


@dataclass
class VoteResult:
    answer: str | None  # the winning normalized answer (None when nobody voted)
    scores: dict[str, float] = field(default_factory=dict)
    rounds: int = 1
    agreed: bool = False


def _winner(scores: dict[str, float], order: list[str]) -> str | None:
    # Ties go to the tied answer given first in voter order: deterministic, and independent of dict/hash order.
    if not scores:
        return None
    best = max(scores.values())
    return next(a for a in order if math.isclose(scores[a], best, rel_tol=1e-12, abs_tol=1e-12))


def majority_vote(answers: list[str | None]) -> VoteResult:
    """Most frequent normalized answer; None/empty answers abstain."""
    norm = [normalize(a) for a in answers if a]
    norm = [a for a in norm if a]
    counts = Counter(norm)
    win = _winner(dict(counts), norm)
    return VoteResult(win, {k: float(v) for k, v in counts.items()}, agreed=len(counts) == 1 and bool(norm))


def confidence(logprobs: list[float] | None) -> float:
    """exp(mean token log-probability) of a voter's answer: its per-token geometric-mean probability; 1 when the
    backend gave no log-probabilities (then the vote is a plain majority)."""
    if not logprobs:
        return 1.0
    return math.exp(sum(logprobs) / len(logprobs))


def weighted_vote(answers: list[str | None], logprobs: list[list[float] | None]) -> VoteResult:
    """Each voter's answer weighs its confidence; the heaviest normalized answer wins."""
    scores: dict[str, float] = {}
    order = []
    for a, lp in zip(answers, logprobs):
        n = normalize(a) if a else ""
        if not n:
            continue
        scores[n] = scores.get(n, 0.0) + confidence(lp)
        order.append(n)
    return VoteResult(_winner(scores, order), scores, agreed=len(scores) == 1)


def debate(agents: list, question: str, ctx: TaskContext, rounds: int = 3,
           extract: Callable[[str], str | None] = lambda t: t, ask=None) -> tuple[VoteResult, list[list[str]]]:
    """Up to ``rounds`` rounds: all agents answer concurrently; from round 2 each sees the others' last answers.
    Stops as soon as every agent's extracted answer agrees. Returns the majority of the last round and every
    round's raw replies. ``ask(member, content) -> str`` lets teams take part (default: ctx.ask on an Agent)."""
    ask = ask or (lambda a, content: ctx.ask(a, content).content)
    history: list[list[str]] = []
    last: list[str] = []
    for r in range(rounds):
        def turn(i: int, last=last) -> str:
            if r == 0:
                return ask(agents[i], question)
            others = "\n".join(f"- {agents[j].name}: {last[j].strip()}" for j in range(len(agents)) if j != i)
            return ask(agents[i], f"{question}\n\nThe other agents answered:\n{others}\n\n"
                                  f"Considering their answers, give your final answer.")

        last = parallel_map(turn, range(len(agents)))
        history.append(last)
        result = majority_vote([extract(t) for t in last])
        if result.agreed and len(result.scores) == 1 and sum(result.scores.values()) == len(agents):
            result.rounds = r + 1
            return result, history
    result.rounds = rounds
    return result, history


def run_vote(agents: list[Agent], question: str, ctx: TaskContext, method: str = "majority",
             extract: Callable[[str], str | None] = lambda t: t) -> VoteResult:
    """One round of independent answers, then a majority or confidence-weighted vote over the extracted answers."""
    replies = parallel_map(lambda a: ctx.ask(a, question), agents)
    answers = [extract(m.content) for m in replies]
    if method == "weighted":
        lps = [getattr(m.metadata.get("completion"), "logprobs", None) for m in replies]
        return weighted_vote(answers, lps)
    return majority_vote(answers)
