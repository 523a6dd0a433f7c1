"""A registry of distillers and the single ``create_distiller`` entry point (timm style).

Names join with ``+`` into a sum of methods (``"liaf+maskd"``: LIAF-KD + MasKD, the LIAF-KD paper's
hybrid rows), built by ``CombinedDistiller``. This is the only place that maps names to classes
and to named option sets (variants).
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import fields
from typing import Any, NamedTuple, TypeVar

from ..utils.options import option_types
from .base import FeatureDistiller

_REGISTRY: dict[str, type[FeatureDistiller]] = {}
T = TypeVar("T", bound=type[FeatureDistiller])
BASELINE = "none"  # the student trained without KD


class Variant(NamedTuple):
    """A named option set: the method ``of`` with ``options`` (``register_variant``)."""

    of: str
    label: str
    options: dict[str, Any]


_VARIANTS: dict[str, Variant] = {}


def _check_name(name: str) -> None:
    if name in _REGISTRY or name in _VARIANTS:
        raise ValueError(f"a distiller named {name!r} is already registered")
    if name == BASELINE or "+" in name:
        raise ValueError(f"a distiller cannot be registered as {name!r} ({BASELINE!r} and names with '+' are reserved)")


def register_distiller(name: str, label: str | None = None) -> Callable[[T], T]:
    """Class decorator: make a distiller available as ``create_distiller(name, ...)``; ``label`` names it in reports.

    The class declares its options as a nested ``Options`` dataclass (``FeatureDistiller.Options``).
    """

    def add(cls: T) -> T:
        _check_name(name)
        if "Options" not in vars(cls):
            raise ValueError(f"distiller {name!r} ({cls.__name__}) must declare its options: a nested frozen "
                             "dataclass 'Options' deriving from FeatureDistiller.Options")
        shadowed = [k for k in option_types(cls.Options) if hasattr(cls, k)]
        if shadowed:
            raise ValueError(f"the options {shadowed} of distiller {name!r} would shadow attributes of {cls.__name__}")
        cls.Options.owner = f"distiller {name!r} option"
        _REGISTRY[name] = cls
        cls.method_name = name
        cls.label = label or name
        return cls

    return add


def register_variant(name: str, of: str, label: str, **options: Any) -> None:
    """Register ``name`` as a named option set of the method ``of`` (e.g. a paper's literal reading).

    ``create_distiller(name, ...)`` builds ``of`` with ``options`` (options given there override them),
    named ``name``. A config gives it ``[kd.<of>]``'s options except ``options``'s, then ``[kd.<name>]``'s
    (``config.kd_options``).
    """
    _check_name(name)
    checked = _REGISTRY[of].Options.from_dict(options)
    _VARIANTS[name] = Variant(of, label, {k: getattr(checked, k) for k in options})


def variant_of(name: str) -> tuple[str, dict[str, Any]]:
    """``(method, options)`` a registered name is a named option set of; ``(name, {})`` for a method itself."""
    if name in _VARIANTS:
        return _VARIANTS[name].of, dict(_VARIANTS[name].options)
    if name not in _REGISTRY:
        raise ValueError(f"unknown distiller {name!r}; choose one of {list_distillers()}")
    return name, {}


def list_distillers() -> list[str]:
    """The registered method names, variants included (combine them with ``+``)."""
    return sorted([*_REGISTRY, *_VARIANTS])


def method_parts(name: str) -> list[str]:
    """``"liaf+maskd"`` -> ``["liaf", "maskd"]``; a ``ValueError`` naming an unregistered part."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in _REGISTRY and p not in _VARIANTS]
    if unknown or len(set(parts)) != len(parts):
        what = f"unknown distiller {unknown[0]!r}" if unknown else f"{name!r} repeats a method"
        raise ValueError(f"{what}; choose one of {list_distillers()} (or join them with '+', e.g. 'liaf+maskd'), "
                         f"or {BASELINE!r} for no KD")
    return parts


def method_label(name: str) -> str:
    """How reports name a method: ``"LIAF-KD + MasKD"`` for ``"liaf+maskd"``, ``"no KD"`` for ``"none"``."""
    if name == BASELINE:
        return "no KD"
    return " + ".join(_VARIANTS[p].label if p in _VARIANTS else _REGISTRY[p].label for p in method_parts(name))


def _options_class(name: str) -> type[FeatureDistiller.Options]:
    parts = method_parts(name)
    if len(parts) > 1:
        raise ValueError(f"{name!r} is a combination; its options are those of {parts}")
    return _REGISTRY[variant_of(name)[0]].Options


def method_options(name: str) -> dict[str, tuple[Any, Any]]:
    """A registered method's options: name -> ``(type, default)`` (its ``Options``; a variant's defaults are
    its option set). The type is the declared one without its bounds (``float`` for ``Weight``)."""
    declared, fixed = _options_class(name), variant_of(name)[1]
    hints = typing.get_type_hints(declared)
    return {f.name: (hints[f.name], fixed.get(f.name, f.default)) for f in fields(declared)}


def method_option_types(name: str) -> dict[str, Any]:
    """A registered method's options: name -> declared type, bounds included (``liaf_lab.utils.options``)."""
    return option_types(_options_class(name))


def _create(name: str, common: dict[str, Any], options: dict[str, Any]) -> FeatureDistiller:
    of, fixed = variant_of(name)
    distiller = _REGISTRY[of](**common, **{**fixed, **options})
    if of != name:
        distiller.method_name, distiller.label = name, _VARIANTS[name].label
    return distiller


def create_distiller(name: str, student_channels, teacher_channels, strides, **options: Any) -> FeatureDistiller:
    """Build the distiller registered as ``name`` with its options (checked by its ``Options``).

    For a combination ``"a+b"``, pass each part's options as a dict under the part's name
    (``create_distiller("liaf+maskd", ..., liaf={"loss_weight": 0.1}, maskd={})``).
    """
    parts = method_parts(name)
    common = dict(student_channels=student_channels, teacher_channels=teacher_channels, strides=strides)
    if len(parts) == 1:
        return _create(name, common, options)
    from .combined import CombinedDistiller

    stray = [k for k in options if k not in parts]
    if stray:
        raise ValueError(f"options of {name!r} must be given per method ({parts}), got {stray}")
    return CombinedDistiller({part: _create(part, common, dict(options.get(part, {}))) for part in parts})
