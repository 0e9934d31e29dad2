"""Balancing methods. Every module of this package registers its methods in :data:`METHODS`
when imported; :func:`load_all` imports them all (new method = new module, nothing else edited)."""
import importlib
import pkgutil

from .base import METHODS, LossOutput, Method, TrainContext, build_method, register_method

_SKIP = {"base", "gradients"}


def load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _SKIP and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


load_all()

__all__ = ["METHODS", "LossOutput", "Method", "TrainContext", "build_method", "register_method", "load_all"]
