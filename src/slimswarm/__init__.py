"""slimswarm: compress LLMs for a team of agents, and run the whole team fast on one small machine."""

from .errors import SlimswarmError
from .models.load import load

__all__ = ["SlimswarmError", "load"]
__version__ = "0.1.0"
