"""The one option validator (``liaf_lab/utils/options.py``), and every registered method checked by it alike."""

from __future__ import annotations

import json
import re
import tomllib
import typing
from dataclasses import dataclass
from typing import Literal

import pytest

from liaf_lab.experiments.config import apply_overrides, check_config, kd_options, load_config
from liaf_lab.distillers import create_distiller, list_distillers, method_option_types, variant_of
from liaf_lab.utils.options import (
    Fraction, NonNegativeInt, Options, Positive, PositiveInt, Range, Weight, check_value, describe, option_types,
)


@pytest.mark.parametrize("hint, words", [
    (Weight, "a finite number >= 0"),
    (Positive, "a finite number > 0"),
    (Fraction, "a finite number in [0, 1]"),
    (PositiveInt, "a positive int"),
    (NonNegativeInt, "an int >= 0"),
    (tuple[PositiveInt, PositiveInt], "a list of two positive ints"),
    (Literal["a", "b"], "one of ['a', 'b']"),
    (Weight | None, "a finite number >= 0 or None"),
    (dict[str, str], "a table of strings to strings"),
    (bool, "true or false"),
])
def test_describe_says_what_a_type_takes(hint, words):
    assert describe(hint)[0] == words


@pytest.mark.parametrize("hint, good, bad", [
    (Weight, [0, 0.0, 2.5], [-1e-9, float("nan"), float("inf"), True, "1", None]),
    (Positive, [1e-9, 3], [0, 0.0, -1.0, float("nan")]),
    (Fraction, [0, 1, 0.5], [-0.1, 1.1, float("nan")]),
    (PositiveInt, [1, 7], [0, -1, 2.0, True]),
    (NonNegativeInt, [0, 3], [-1, 0.5, False]),
    (tuple[PositiveInt, PositiveInt], [[7, 7], (1, 2)], [7, [7], [7, 0], [7.0, 7]]),
    (Literal["a", "b"], ["a", "b"], ["c", 1, None]),
    (Weight | None, [None, 1.0], ["x", -1.0]),
    (bool, [True, False], [0, 1, "true"]),
])
def test_check_value_accepts_and_rejects(hint, good, bad):
    for value in good:
        check_value("x", value, hint)
    for value in bad:
        with pytest.raises(ValueError, match=rf"^x={value!r} must be ".replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[")):
            check_value("x", value, hint)


def test_check_value_returns_the_declared_form():
    assert check_value("x", [7, 7], tuple[PositiveInt, PositiveInt]) == (7, 7)
    assert type(check_value("x", 1, Weight)) is float and type(check_value("x", 1, Weight | None)) is float
    assert check_value("x", None, Weight | None) is None and type(check_value("x", 2, PositiveInt)) is int


@dataclass(frozen=True)
class _Demo(Options):
    owner = "demo option"
    weight: Weight = 1.0
    size: tuple[PositiveInt, PositiveInt] = (7, 7)
    mode: Literal["a", "b"] = "a"


def test_an_option_set_checks_its_fields_and_keys():
    assert _Demo.from_dict({"size": [3, 4], "weight": 2}) == _Demo(weight=2.0, size=(3, 4))
    assert _Demo().to_dict() == {"weight": 1.0, "size": (7, 7), "mode": "a"}
    with pytest.raises(ValueError, match=r"^demo option weight=-1.0 must be a finite number >= 0$"):
        _Demo(weight=-1.0)
    with pytest.raises(ValueError, match=r"^unknown demo option 'wieght'; its options are \['weight', 'size', 'mode'\]$"):
        _Demo.from_dict({"wieght": 1.0})


# -- every registered method, checked alike (as timm tests every model) --------------------------------
METHODS = list_distillers()
STRUCTURE = {"student_channels": 8, "teacher_channels": 16, "strides": {"0": 8.0}}


def _options(name: str) -> type[Options]:
    return type(create_distiller(name, **STRUCTURE).options)


def _bounds(hint) -> list[Range]:
    return [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Range)]


def _other(hint, value):
    """A valid value of type ``hint`` other than ``value``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return next(a for a in args if a != value)
    if origin is tuple:
        return tuple(v + 1 for v in value)
    if isinstance(value, bool):
        return not value
    upper = [b for b in _bounds(hint) if b.le is not None or b.lt is not None]
    return value / 2 if upper else value + 1


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return f"[{', '.join(map(_toml, value))}]"
    return json.dumps(value)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_declares_typed_bounded_options_with_a_loss_weight(name):
    types = method_option_types(name)
    assert types == option_types(_options(name))
    weights = [k for k, hint in types.items() if hint == Weight]
    assert weights, f"{name} declares no loss weight (options.Weight)"
    for key, hint in types.items():
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        if base in (int, float):
            assert _bounds(hint), f"{name}.{key}: a number option declares its bounds (options.Range)"


@pytest.mark.parametrize("name", METHODS)
def test_every_method_rejects_a_negative_or_non_finite_weight_or_number_alike_in_python_and_a_config(name):
    method = variant_of(name)[0]
    cfg = load_config("tiny")
    for key, hint in method_option_types(name).items():
        if typing.get_origin(hint) is not typing.Annotated or typing.get_args(hint)[0] is not float:
            continue
        for value in (-1.0, float("nan"), float("inf")):  # every number option here is bounded below by 0
            with pytest.raises(ValueError, match=rf"^distiller '{method}' option {key}={value!r} must be a finite number"):
                create_distiller(name, **STRUCTURE, **{key: value})
            with pytest.raises(ValueError, match=rf"^kd\.{name}\.{key}={value!r} must be a finite number"):
                check_config({**cfg, "kd": {name: {key: value}}})


@pytest.mark.parametrize("name", METHODS)
def test_every_method_rejects_an_unknown_option_naming_it_and_the_valid_ones(name):
    method, valid = variant_of(name)[0], list(method_option_types(name))
    with pytest.raises(ValueError, match=rf"^unknown distiller '{method}' option 'no_such_option'; its options are "
                                         rf"{re.escape(str(valid))}$"):
        create_distiller(name, **STRUCTURE, no_such_option=1.0)
    with pytest.raises(ValueError, match=rf"unknown key kd\.{name}\.no_such_option; the options of '{name}' are"):
        check_config(apply_overrides(load_config("tiny"), [f"kd.{name}.no_such_option=1.0"]))


@pytest.mark.parametrize("name", METHODS)
def test_every_method_round_trips_its_options_through_a_config_table(name):
    """options -> a ``[kd.<name>]`` TOML table -> ``load_config``'s checks -> ``kd_options`` -> equal options."""
    declared = _options(name)
    defaults = create_distiller(name, **STRUCTURE).options
    changed = declared(**{k: _other(hint, getattr(defaults, k)) for k, hint in option_types(declared).items()})
    for options in (defaults, changed):
        table = "\n".join(f"{k} = {_toml(v)}" for k, v in options.to_dict().items())
        cfg = load_config("tiny")
        cfg["kd"][name] = tomllib.loads(table)
        check_config(cfg)
        assert declared.from_dict(kd_options(cfg, name)) == options
