"""A registry of distillers and the single ``create_distiller`` entry point (timm style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

_REGISTRY: dict[str, type[nn.Module]] = {}
T = TypeVar("T", bound=type[nn.Module])


def register_distiller(name: str) -> Callable[[T], T]:
    """Class decorator: make a distiller available as ``create_distiller(name, ...)``."""

    def add(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"a distiller named {name!r} is already registered")
        _REGISTRY[name] = cls
        cls.method_name = name
        return cls

    return add


def list_distillers() -> list[str]:
    """Names accepted by ``create_distiller``."""
    return sorted(_REGISTRY)


def create_distiller(name: str, **kwargs) -> nn.Module:
    """Build the distiller registered as ``name`` with its keyword arguments."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown distiller {name!r}; choose one of {list_distillers()}")
    return _REGISTRY[name](**kwargs)
