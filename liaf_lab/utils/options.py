"""Typed options, declared once and checked by one validator.

An option set is a dataclass deriving from ``Options``; each field's type says what it takes:
``bool``, ``str``, ``Literal[...]`` (its choices), ``tuple[...]``, ``list[...]``, ``dict[...]``, ``X | None``,
and numbers with their bounds as ``typing.Annotated`` metadata (``Range``; ``Weight``, ``Positive``,
``PositiveInt`` and the like below). Constructing one checks every field (``check_value``) and rejects
a wrong value with a one-line ``ValueError`` naming the owner and the option; ``from_dict`` also
rejects unknown keys, listing the valid ones. The distillers' options, ``TrainConfig`` and the config
layer (``config.check_value``) all check values here.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, Literal, Self, Union


@dataclass(frozen=True)
class Range:
    """Bounds of a number option (``typing.Annotated`` metadata): ``x >= ge``, ``x > gt``, ``x <= le``, ``x < lt``
    (``None``: no bound). The number is also finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def words(self) -> str:
        """``">= 0"``, ``"> 0"``, ``"in [0, 1)"``."""
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
        return f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}" if high else ""


NonNegative = Annotated[float, Range(ge=0)]
LOSS_WEIGHT = "loss weight"  # metadata marking a loss weight (every method has at least one)
Weight = Annotated[NonNegative, LOSS_WEIGHT]  # a factor on a loss term: finite and >= 0

Positive = Annotated[float, Range(gt=0)]  # temperatures, sizes
Fraction = Annotated[float, Range(ge=0, le=1)]
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]

_COUNTS = {2: "two", 3: "three", 4: "four"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plural(what: str) -> str:
    return f"{what.removeprefix('an ').removeprefix('a ')}s"


_PLAIN: dict[Any, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an int", _is_int),
    float: ("a finite number", _is_number),
    str: ("a string", lambda v: isinstance(v, str)),
}


def describe(hint: Any) -> tuple[str, Callable[[Any], bool]]:
    """What a value of type ``hint`` must be, in words, and the test of it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        what, test = describe(args[0])
        for bound in (m for m in args[1:] if isinstance(m, Range)):
            what = "a positive int" if args[0] is int and bound == Range(ge=1) else f"{what} {bound.words()}"
            test = functools.partial(lambda t, b, v: t(v) and b.holds(v), test, bound)
        return what, test
    if origin is Literal:
        return f"one of {list(args)}", lambda v: any(type(v) is type(a) and v == a for a in args)
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        words = " or ".join(what for what, _ in parts) + (" or None" if type(None) in args else "")
        return words, lambda v: (v is None and type(None) in args) or any(test(v) for _, test in parts)
    if origin in (tuple, list, Sequence):
        what, test = describe(args[0])
        count = f"{_COUNTS.get(len(args), len(args))} " if origin is tuple else ""
        return (f"a list of {count}{_plural(what)}",
                lambda v: isinstance(v, (list, tuple)) and (origin is not tuple or len(v) == len(args))
                and all(map(test, v)))
    if origin in (dict, Mapping):
        (key, key_ok), (value, value_ok) = describe(args[0]), describe(args[1])
        return (f"a table of {_plural(key)} to {_plural(value)}",
                lambda v: isinstance(v, Mapping) and all(key_ok(k) and value_ok(x) for k, x in v.items()))
    return _PLAIN[hint]


def _normalised(hint: Any, value: Any) -> Any:
    """A checked value in its declared form: a ``tuple`` for a tuple type, a ``float`` for a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _normalised(args[0], value)
    if origin is tuple:
        return tuple(_normalised(a, v) for a, v in zip(args, value, strict=True))
    if origin in (Union, types.UnionType) and value is not None:
        return next(_normalised(a, value) for a in args if a is not type(None) and describe(a)[1](value))
    return float(value) if hint is float else value


def check_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` in its declared form (``_normalised``) if it is of type ``hint``, else a one-line ``ValueError``:
    ``"{name}={value!r} must be {what}"``."""
    what, test = describe(hint)
    if not test(value):
        raise ValueError(f"{name}={value!r} must be {what}")
    return _normalised(hint, value)


@functools.cache
def option_types(cls: type) -> dict[str, Any]:
    """A dataclass's fields -> their declared types (``Annotated`` metadata kept), in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in fields(cls)}


class Options:
    """The base of an option set (a dataclass): every field is checked against its type on construction.

    ``owner`` names the options in messages: ``"{owner} {name}={value!r} must be ..."``,
    ``"unknown {owner} {name!r}; its options are [...]"``.
    """

    owner: ClassVar[str] = "option"

    def __post_init__(self) -> None:
        for name, hint in option_types(type(self)).items():
            object.__setattr__(self, name, check_value(f"{self.owner} {name}", getattr(self, name), hint))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """The options ``values`` sets (the others at their defaults); an unknown key is a ``ValueError``."""
        known = list(option_types(cls))
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ValueError(f"unknown {cls.owner} {unknown[0]!r}; its options are {known}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Option name -> value (shallow: the values themselves)."""
        return {name: getattr(self, name) for name in option_types(type(self))}
