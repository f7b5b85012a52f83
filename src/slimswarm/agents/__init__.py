"""Agents on top of the engine: Agent, Message, Team and topologies, voting, router, trace, backends.

The names below are imported on first use (PEP 562): the command line imports ``agents.command`` to build its
parser for every command, and the package's modules (pydantic among them) cost ~4 MB of resident memory that
``slimswarm generate`` has no use for.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"Agent": "agent", "ModelRef": "agent", "Tool": "agent", "Backend": "backends", "BackendError": "backends",
            "Completion": "backends", "EngineBackend": "backends", "HTTPBackend": "backends",
            "ReplayBackend": "backends", "ReplayDivergence": "backends", "ScriptedBackend": "backends",
            "Message": "message", "BudgetExceeded": "runtime", "TaskContext": "runtime", "Team": "team"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
