"""Inference backends behind one interface; see :mod:`.base`.

Importing this package registers the built-in backends; each imports its library only when an
engine is created, so a missing optional library costs nothing until it is asked for.
"""

from . import ort, tensorrt, torch_engine  # noqa: F401  (register their engines)
from .base import ENGINES, Engine, EngineUnavailable, load_engine, load_models, register_engine

__all__ = ["ENGINES", "Engine", "EngineUnavailable", "load_engine", "load_models", "register_engine"]
