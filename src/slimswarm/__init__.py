"""slimswarm: compress LLMs for a team of agents, and run the whole team fast on one small machine."""

from .errors import SlimswarmError
from .models.load import load
from . import compress  # the package is also the verb: slimswarm.compress(model, recipe, calib)

__all__ = ["SlimswarmError", "load", "compress", "load_recipe", "Engine", "AdapterBank", "Agent", "Team"]
__version__ = "0.1.0"


def __getattr__(name):  # the heavier layers load on first use
    if name == "load_recipe":
        from .compress.recipe import load_recipe

        return load_recipe
    if name == "Engine":
        from .engine.engine import Engine

        return Engine
    if name == "AdapterBank":
        from .compress.lora import AdapterBank

        return AdapterBank
    if name in ("Agent", "Team"):
        from . import agents

        return getattr(agents, name)
    raise AttributeError(f"module 'slimswarm' has no attribute {name!r}")
