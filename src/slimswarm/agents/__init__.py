"""Agents on top of the engine: Agent, Message, Team and topologies, voting, router, trace, backends."""

from .agent import Agent, ModelRef, Tool
from .backends import (Backend, BackendError, Completion, EngineBackend, HTTPBackend, ReplayBackend,
                       ReplayDivergence, ScriptedBackend)
from .message import Message
from .runtime import BudgetExceeded, TaskContext
from .team import Team

__all__ = ["Agent", "ModelRef", "Tool", "Backend", "BackendError", "Completion", "EngineBackend", "HTTPBackend",
           "ReplayBackend", "ReplayDivergence", "ScriptedBackend", "Message", "BudgetExceeded", "TaskContext", "Team"]
