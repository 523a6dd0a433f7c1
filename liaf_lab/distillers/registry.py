"""A registry of distillers and the single ``create_distiller`` entry point (timm style).

Names join with ``+`` into a sum of methods (``"liaf+maskd"``: LIAF-KD + MasKD, the LIAF-KD paper's
hybrid rows), built by ``CombinedDistiller``. This is the only place that maps names to classes.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .base import FeatureDistiller

_REGISTRY: dict[str, type[FeatureDistiller]] = {}
T = TypeVar("T", bound=type[FeatureDistiller])
BASELINE = "none"  # the student trained without KD
# Constructor arguments the builder fills from the detectors, not options of a method.
STRUCTURAL = ("student_channels", "teacher_channels", "strides")


def register_distiller(name: str, label: str | None = None) -> Callable[[T], T]:
    """Class decorator: make a distiller available as ``create_distiller(name, ...)``; ``label`` names it in reports."""

    def add(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"a distiller named {name!r} is already registered")
        if name == BASELINE or "+" in name:
            raise ValueError(f"a distiller cannot be registered as {name!r} ({BASELINE!r} and names with '+' are reserved)")
        _REGISTRY[name] = cls
        cls.method_name = name
        cls.label = label or name
        return cls

    return add


def register_variant(name: str, of: str, label: str, **fixed: Any) -> type[FeatureDistiller]:
    """Register ``name`` as the method ``of`` with the options ``fixed`` (e.g. a paper's literal reading).

    The variant is a subclass of ``of``'s class whose constructor defaults are ``fixed``; options given
    to ``create_distiller`` still override them. A config gives it ``[kd.<of>]``'s options except the
    fixed ones, then ``[kd.<name>]``'s (``config.kd_options``).
    """
    parent = _REGISTRY[of]
    check_options(of, fixed)
    signature = inspect.signature(parent.__init__)
    hints = typing.get_type_hints(parent.__init__)

    def __init__(self, *args: Any, **options: Any) -> None:
        parent.__init__(self, *args, **{**fixed, **options})

    __init__.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(default=fixed.get(p.name, p.default)) for p in signature.parameters.values()])
    __init__.__annotations__ = hints
    doc = f"{label}: ``{of}`` ({parent.__name__}) with {', '.join(f'{k}={v!r}' for k, v in fixed.items())}."
    cls = type(f"{parent.__name__}_{name}", (parent,), {"__init__": __init__, "__doc__": doc,
                                                        "variant_of": of, "fixed_options": dict(fixed)})
    return register_distiller(name, label)(cls)


def variant_of(name: str) -> tuple[str, dict[str, Any]]:
    """``(method, fixed options)`` a registered name is a variant of; ``(name, {})`` for a method itself."""
    cls = _REGISTRY[name]
    return getattr(cls, "variant_of", name), dict(getattr(cls, "fixed_options", {}))


def list_distillers() -> list[str]:
    """The registered method names (combine them with ``+``)."""
    return sorted(_REGISTRY)


def method_parts(name: str) -> list[str]:
    """``"liaf+maskd"`` -> ``["liaf", "maskd"]``; a ``ValueError`` naming an unregistered part."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in _REGISTRY]
    if unknown or len(set(parts)) != len(parts):
        what = f"unknown distiller {unknown[0]!r}" if unknown else f"{name!r} repeats a method"
        raise ValueError(f"{what}; choose one of {list_distillers()} (or join them with '+', e.g. 'liaf+maskd'), "
                         f"or {BASELINE!r} for no KD")
    return parts


def method_label(name: str) -> str:
    """How reports name a method: ``"LIAF-KD + MasKD"`` for ``"liaf+maskd"``, ``"no KD"`` for ``"none"``."""
    if name == BASELINE:
        return "no KD"
    return " + ".join(_REGISTRY[p].label for p in method_parts(name))


def method_options(name: str) -> dict[str, tuple[Any, Any]]:
    """A registered method's options: name -> ``(type, default)`` (from its constructor's signature)."""
    cls = _REGISTRY[method_parts(name)[0]] if "+" not in name else None
    if cls is None:
        raise ValueError(f"{name!r} is a combination; its options are those of {method_parts(name)}")
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters
    return {k: (hints[k], p.default) for k, p in params.items() if k not in ("self", *STRUCTURAL)}


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """A ``ValueError`` naming any key of ``options`` that ``name`` does not take, with its options listed."""
    known = method_options(name)
    for key in options:
        if key not in known:
            raise ValueError(f"unknown option {key!r} of distiller {name!r}; its options are {list(known)}")


def create_distiller(name: str, student_channels, teacher_channels, strides, **options: Any) -> FeatureDistiller:
    """Build the distiller registered as ``name`` with its options.

    For a combination ``"a+b"``, pass each part's options as a dict under the part's name
    (``create_distiller("liaf+maskd", ..., liaf={"loss_weight": 0.1}, maskd={})``).
    """
    parts = method_parts(name)
    common = dict(student_channels=student_channels, teacher_channels=teacher_channels, strides=strides)
    if len(parts) == 1:
        check_options(name, options)
        return _REGISTRY[name](**common, **options)
    from .combined import CombinedDistiller

    stray = [k for k in options if k not in parts]
    if stray:
        raise ValueError(f"options of {name!r} must be given per method ({parts}), got {stray}")
    built = {}
    for part in parts:
        part_options = dict(options.get(part, {}))
        check_options(part, part_options)
        built[part] = _REGISTRY[part](**common, **part_options)
    return CombinedDistiller(built)
