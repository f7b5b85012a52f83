"""The engine layer: continuous batching over one shared base with many adapters; server.py puts HTTP in front."""

from .engine import Engine, EngineClosed, QueueFull, Request

__all__ = ["Engine", "EngineClosed", "QueueFull", "Request"]
