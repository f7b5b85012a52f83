"""Built-in tools agents can name in a team YAML (``tools: [calculator]``), or any ``module:function``."""

from __future__ import annotations

import ast
import importlib
import operator
from typing import Annotated

from pydantic import Field

from ..errors import SlimswarmError

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
        ast.UAdd: operator.pos}


def calculator(expression: Annotated[str, Field(max_length=80, pattern=r"^[0-9+*/%().\- ]+$")]) -> float:
    """Evaluate an arithmetic expression (+ - * / // % ** and parentheses)."""
    def ev(node):
        # walk the syntax tree ourselves: eval() on model output would run arbitrary code
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if isinstance(node.op, ast.Pow) and abs(ev(node.right)) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")

    return float(ev(ast.parse(expression.replace(",", ""), mode="eval")))


def word_count(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


# a small fact table for the lookup tool (the examples' questions ask about these)
FACTS = {
    "minutes in an hour": 60, "hours in a day": 24, "days in a week": 7, "weeks in a year": 52,
    "months in a year": 12, "days in a year": 365, "eggs in a dozen": 12, "cents in a dollar": 100,
    "inches in a foot": 12, "feet in a yard": 3, "ounces in a pound": 16, "centimeters in a meter": 100,
    "grams in a kilogram": 1000, "seconds in a minute": 60, "legs on a spider": 8, "wheels on a bicycle": 2,
}


def lookup(key: Annotated[str, Field(max_length=40)]) -> str:
    """Look up a unit fact, e.g. "eggs in a dozen" or "minutes in an hour"."""
    k = " ".join(key.lower().replace("_", " ").split())
    if k in FACTS:
        return str(FACTS[k])
    near = [f for f in FACTS if set(k.split()) & set(f.split()) - {"in", "a", "an", "on"}]
    return f"unknown key {key!r}; known: " + ", ".join(near or FACTS)


BUILTIN = {"calculator": calculator, "word_count": word_count, "lookup": lookup}


def resolve_tool(ref: str):
    """A built-in tool name, or ``package.module:function``."""
    if ref in BUILTIN:
        return BUILTIN[ref]
    if ":" in ref:
        mod, _, fn = ref.partition(":")
        try:
            return getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise SlimswarmError(f"tool {ref!r}: cannot import ({e})") from None
    raise SlimswarmError(f"tool {ref!r}: not a built-in ({', '.join(BUILTIN)}) nor module:function")
