"""The one option validator (``liaf_lab/options.py``), and every registered method checked by it alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from liaf_lab.options import (
    Fraction, NonNegativeInt, Options, Positive, PositiveInt, Weight, check_value, describe,
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
