"""Inference backends behind one interface; see :mod:`.base`.

Importing this package registers the built-in backends; each imports its library only when an
engine is created, so a missing optional library costs nothing until it is asked for.
"""

from . import ort  # noqa: F401  (registers OnnxRuntimeEngine)
from .base import ENGINES, Engine, EngineUnavailable, load_engine, register_engine

__all__ = ["ENGINES", "Engine", "EngineUnavailable", "load_engine", "register_engine"]
