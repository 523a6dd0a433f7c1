"""Presets and config files (TOML): ``load_config("tiny" | "paper" | path, overrides)``.

A config has the sections of ``SECTIONS``. ``load_config`` checks it once, before anything is
built: an unknown section or key, a missing one, or a value of the wrong type is a ``ValueError``
naming ``section.key``. The expected types are those of what the values go to (``create_detector``,
each registered distiller's ``Options``, ``distill``, ``TrainConfig``), checked by the one validator
of ``liaf_lab.utils.options``.

``[kd]`` holds ``inherit`` and one table per method, ``[kd.<method>]`` (e.g. ``[kd.liaf]``), with that
method's options; the registry says which methods and options exist, so a new method needs no edit here.

A config is resolved once: the entry points (the CLI, ``run_study``, ``run_demo``, ``load_demo_models``) call
``load_config`` (or ``resolve_config``, which also takes a config already resolved) and pass the
``ResolvedConfig`` down; a grid variant or a study run derives its own with ``with_overrides``, from the file's
values as first read, and the builders take it as it is. Nothing below the entry points reads a preset by name.
"""

from __future__ import annotations

import ast
import copy
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ..data.kitti import check_test_split
from ..distillers import BASELINE, list_distillers, method_option_types, method_parts, variant_of
from ..engine import TrainConfig, distill
from ..models import create_detector
from ..utils.options import NonNegative, PositiveInt, check_value
from ..utils.paths import PROJECT_ROOT, resolve_path  # noqa: F401  (config.resolve_path, config.PROJECT_ROOT: public)

PRESET_DIR = Path(__file__).parents[1] / "configs"  # liaf_lab/configs

# [input]: torchvision's resize, the same for teacher and student (their features must align).
INPUT_KEYS = ("min_size", "max_size")
# [teacher], [student]: create_detector's arguments (the optional ones: pretrained weights, frozen BatchNorm), and the
# options of the section's arch (section_key_types).
DETECTOR_KEYS = ("arch", "depth", "width_mult", "fpn_channels")
DETECTOR_OPTIONAL = {"frozen_bn": bool, "weights": str, "weights_backbone": str}
# [kd]: distill()'s options shared by every method; [kd.<method>]: the method's options (its ``Options``).
KD_KEYS = {"inherit": typing.get_type_hints(distill)["inherit"]}
# Training sections: TrainConfig's fields, less seed (the run's --seed).
TRAIN_SECTIONS = ("train_teacher", "stage1", "distill")
SECTIONS = ("data", "input", "teacher", "student", "kd", *TRAIN_SECTIONS)
REQUIRED_SECTIONS = ("data", "input", "teacher", "student")
# [data], per kind: the keys it needs and those it may have (docs/data.md).
DATA_REQUIRED = {"coco": ("train_images", "train_ann", "val_images", "val_ann"), "kitti": ("root",), "voc": ("root",),
                 "shapes": ("num_train", "num_val")}
DATA_OPTIONAL = {"coco": ("test_images", "test_ann", "allow_outside_images"),
                 "kitti": ("classes", "merge", "test_fraction", "test_ids"),
                 "voc": ("train_set", "val_set", "test_set", "classes"),
                 "shapes": ("num_test", "image_size", "seed", "cache")}
DATA_TYPES: dict[str, Any] = {
    "kind": Literal[tuple(DATA_REQUIRED)], "train_images": str, "train_ann": str, "val_images": str, "val_ann": str,
    "test_images": str, "test_ann": str, "root": str, "train_set": str, "val_set": str, "test_set": str,
    "classes": list[str], "merge": dict[str, str], "test_fraction": NonNegative, "test_ids": list[str],
    "skip_bad_images": bool, "num_train": PositiveInt, "num_val": PositiveInt, "num_test": PositiveInt,
    "image_size": PositiveInt, "seed": PositiveInt, "cache": str, "allow_outside_images": bool,
}
# Plain numbers as a config takes them: ints positive, floats finite and >= 0.
_CONFIG_NUMBERS = {int: PositiveInt, float: NonNegative}
_DETECTOR_TYPES = {k: _CONFIG_NUMBERS.get(v, v) for k, v in typing.get_type_hints(create_detector).items()}
# section -> key -> type, and the keys a section must have.
KEY_TYPES: dict[str, dict[str, Any]] = {
    "input": {k: _DETECTOR_TYPES[k] for k in INPUT_KEYS},
    "teacher": {**{k: _DETECTOR_TYPES[k] for k in DETECTOR_KEYS}, **DETECTOR_OPTIONAL},
    "student": {**{k: _DETECTOR_TYPES[k] for k in DETECTOR_KEYS}, **DETECTOR_OPTIONAL},
}
REQUIRED_KEYS = {"input": ("min_size",), "teacher": DETECTOR_KEYS, "student": DETECTOR_KEYS}
# Keys that moved: old -> new.
RENAMED = {f"{role}.{k}": f"input.{k}" for role in ("teacher", "student") for k in INPUT_KEYS}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


class ResolvedConfig(dict):
    """A config read and checked once: the dict of its sections (every one of ``SECTIONS`` present), which
    also says where it came from.

    Attributes:
        source: the preset name or the file it was read from, as given to ``load_config``.
        overrides: the ``section.key=value`` overrides applied to the file's values, in order.

    It is read-only at the top level (a changed copy is ``with_overrides``'s), and pickles as itself, so a study's
    run processes and Slurm jobs receive it whole.
    """

    def __init__(self, values: Mapping[str, Any], source: str | Path, overrides: Sequence[str],
                 file: Mapping[str, Any]) -> None:
        super().__init__(values)
        self.source, self.overrides, self._file = str(source), tuple(overrides), file

    def with_overrides(self, overrides: Sequence[str]) -> ResolvedConfig:
        """This config with more ``section.key=value`` overrides, checked: the file's values as first read with
        ``self.overrides`` and then ``overrides`` applied, as ``load_config(source, [*self.overrides,
        *overrides])`` would give without reading the file again; ``self`` when there are none."""
        return _resolve(self._file, self.source, [*self.overrides, *overrides]) if overrides else self

    def __reduce__(self) -> tuple[Any, ...]:
        return ResolvedConfig, (dict(self), self.source, self.overrides, self._file)

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"config {self.source!r} is resolved and read-only: derive another with with_overrides, or "
                        "copy it to a dict")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only


def load_config(name_or_path: str | Path, overrides: Sequence[str] | None = None) -> ResolvedConfig:
    """Load a preset by name or a TOML file, apply ``section.key=value`` overrides and check the result.

    Sections ``kd``, ``train_teacher``, ``stage1`` and ``distill`` may be absent (their defaults apply)
    and are then present and empty in the returned dict.
    """
    path = Path(name_or_path)
    if not path.suffix and str(name_or_path) in list_presets():
        path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"config {name_or_path!r} is neither a preset {list_presets()} nor a TOML file")
    try:
        file = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path} is not valid TOML: {err}") from err
    return _resolve(file, name_or_path, overrides or [])


def resolve_config(config: str | Path | ResolvedConfig, overrides: Sequence[str] = ()) -> ResolvedConfig:
    """What an entry point calls once: a preset name or file loaded (``load_config``), or a config already
    resolved, with ``overrides`` applied (``ResolvedConfig.with_overrides``, without reading its file again)."""
    if isinstance(config, ResolvedConfig):
        return config.with_overrides(overrides)
    return load_config(config, overrides)


def _resolve(file: dict[str, Any], source: str | Path, overrides: Sequence[str]) -> ResolvedConfig:
    """The file's values (untouched) with ``overrides`` applied, checked, its absent sections present and empty."""
    cfg = apply_overrides(file, list(overrides))  # a deep copy: the file's values stay as read
    try:
        check_config(cfg)
    except ValueError as err:
        raise ValueError(f"config {source}: {err}") from None
    for section in SECTIONS:
        cfg.setdefault(section, {})
    return ResolvedConfig(cfg, source, overrides, file)


def apply_overrides(cfg: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["kd.liaf.loss_weight=2", "student.depth=34"]`` -> a copy of ``cfg`` with those values set.

    Values are Python literals (``7``, ``[7, 7]``, ``'a b'``), ``true``/``false``, or else strings.
    Setting ``data.kind`` to another kind drops the file's ``[data]`` keys that the new kind does not take.
    """
    cfg = copy.deepcopy(dict(cfg))  # a plain dict, also of a ResolvedConfig (read-only)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not (len(parts) == 2 or (len(parts) == 3 and parts[0] == "kd")):
            raise ValueError(f"override {item!r} must look like section.key=value (kd.<method>.key=value for a "
                             "method's option)")
        section, name = parts[0], parts[-1]
        if section not in SECTIONS:
            raise ValueError(f"override {item!r}: unknown section [{section}]; the sections are {list(SECTIONS)}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False}.get(raw.lower(), raw)
        values = cfg.setdefault(section, {})
        if len(parts) == 3:
            values = values.setdefault(parts[1], {})
            if not isinstance(values, dict):
                raise ValueError(f"override {item!r}: kd.{parts[1]} is not a table")
        new_kind = (section, name) == ("data", "kind") and isinstance(value, str) and value != values.get("kind", "coco")
        if new_kind and value in DATA_REQUIRED:
            cfg["data"] = values = {k: v for k, v in values.items() if k in data_keys(value)}
        values[name] = value
    return cfg


def check_config(cfg: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for an unknown or missing section or key, or a value of the wrong type."""
    unknown = [s for s in cfg if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section [{unknown[0]}]; the sections are {list(SECTIONS)}")
    missing = [s for s in REQUIRED_SECTIONS if s not in cfg]
    if missing:
        raise ValueError(f"missing sections {missing}")
    for section, values in cfg.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"[{section}] must be a table of key = value, got {values!r}")
        if section == "data":
            check_data(values)
        elif section in TRAIN_SECTIONS:
            _check_train(section, values)
        elif section == "kd":
            check_kd(values)
        else:
            types = section_key_types(section, values)
            _check_keys(section, values, types, REQUIRED_KEYS.get(section, ()))
            for key, value in values.items():
                check_value(f"{section}.{key}", value, types[key])
    min_size, max_size = input_size(cfg)
    if min_size > max_size:
        raise ValueError(f"input.min_size={min_size} is larger than input.max_size={max_size}, which caps the longer "
                         "image side; raise input.max_size or leave it out (default: min_size * 1333 / 800)")


def section_key_types(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The keys ``[section]`` may have, with their types: for ``[teacher]`` / ``[student]`` ``create_detector``'s
    own, then the options of the section's ``arch`` (``detector_option_types``: e.g. ``reg_max``, ``atss_topk``,
    ``num_groups`` for GFL; ``score_thresh`` for every dense detector)."""
    from ..models.detectors import detector_option_types

    types = dict(KEY_TYPES[section])
    if section in ("teacher", "student") and "arch" in values:
        check_value(f"{section}.arch", values["arch"], types["arch"])
        types.update({k: _CONFIG_NUMBERS.get(v, v) for k, v in detector_option_types(values["arch"]).items()})
    return types


def check_kd(kd: Mapping[str, Any]) -> None:
    """Check ``[kd]``: ``inherit``, and per registered method a table of its options (its ``Options``)."""
    for key, value in kd.items():
        if key in KD_KEYS:
            check_value(f"kd.{key}", value, KD_KEYS[key])
        elif key in list_distillers():
            if not isinstance(value, Mapping):
                raise ValueError(f"kd.{key} must be a table of the options of {key!r} ([kd.{key}] in the file)")
            options = method_option_types(key)
            for name, option in value.items():
                if name not in options:
                    raise ValueError(f"unknown key kd.{key}.{name}; the options of {key!r} are {list(options)}")
                check_value(f"kd.{key}.{name}", option, options[name])
        elif isinstance(value, Mapping):
            raise ValueError(f"no distiller is registered as {key!r} ([kd.{key}]); registered: {list_distillers()}")
        else:
            owners = [m for m in list_distillers() if key in method_option_types(m)]
            if owners:
                raise ValueError(f"kd.{key} is an option of {owners}: set it per method, e.g. kd.{owners[0]}.{key} "
                                 f"([kd.{owners[0]}] in the file)")
            raise ValueError(f"unknown key kd.{key}; [kd] takes {list(KD_KEYS)} and one table per method "
                             f"([kd.<method>], methods {list_distillers()})")


def method_config(cfg: Mapping[str, Any], method: str | None) -> dict[str, Any]:
    """``cfg`` without the ``[kd.<m>]`` tables of the methods a run of ``method`` does not use (all of
    them for ``None`` or ``"none"``): what binds the run's folder, so that another method's options
    never block resuming it."""
    tables = method_tables(method)
    kd = {k: v for k, v in cfg.get("kd", {}).items() if not isinstance(v, Mapping) or k in tables}
    return {**cfg, "kd": kd}


def method_tables(method: str | None) -> set[str]:
    """The ``[kd.<m>]`` tables a run of ``method`` reads: one per part, and a variant's method's too."""
    parts = set() if method in (None, BASELINE) else set(method_parts(method))
    return parts | {variant_of(p)[0] for p in parts}


def kd_options(cfg: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The config's options of one registered ``method`` (``[kd.<method>]``), as ``create_distiller`` takes
    them (its ``Options`` normalise them, e.g. a list to a tuple).

    A variant (``register_variant``) takes its method's table without the options it fixes, then its own.
    """
    kd = cfg.get("kd", {})
    of, fixed = variant_of(method)
    table = {k: v for k, v in kd.get(of, {}).items() if k not in fixed} if of != method else {}
    table.update(kd.get(method, {}))
    return table


def check_data(data: Mapping[str, Any]) -> str:
    """Check a ``[data]`` section (its keys: docs/data.md) and return its kind."""
    kind = data.get("kind", "coco")
    check_value("data.kind", kind, DATA_TYPES["kind"])
    allowed = data_keys(kind)
    missing, unknown = [k for k in DATA_REQUIRED[kind] if k not in data], [k for k in data if k not in allowed]
    if missing or unknown:
        problems = ", ".join(f"{what} keys {keys}" for what, keys in (("missing", missing), ("unknown", unknown))
                             if keys)
        raise ValueError(f"[data] with kind = {kind!r}: {problems}; its keys are {allowed}")
    for key, value in data.items():
        check_value(f"data.{key}", value, DATA_TYPES[key])
    if kind == "kitti":
        check_test_split(data.get("test_fraction"), data.get("test_ids"), prefix="data.")
    return kind


def data_keys(kind: str) -> list[str]:
    """The keys a ``[data]`` section of ``kind`` may have."""
    return ["kind", *DATA_REQUIRED[kind], *DATA_OPTIONAL[kind], "skip_bad_images"]


def input_size(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """``(min_size, max_size)`` of ``cfg["input"]``; ``max_size`` defaults to torchvision's ratio, 1333 / 800."""
    size = cfg["input"]
    return size["min_size"], size.get("max_size", round(size["min_size"] * 1333 / 800))


def _check_keys(section: str, values: Mapping[str, Any], allowed: Sequence[str], required: Sequence[str]) -> None:
    for key in values:
        if key not in allowed:
            if f"{section}.{key}" in RENAMED:
                raise ValueError(f"{section}.{key} is now {RENAMED[f'{section}.{key}']}: one key sets the input "
                                 f"size of teacher and student (--set {RENAMED[f'{section}.{key}']}=...)")
            raise ValueError(f"unknown key {section}.{key}; the keys of [{section}] are {list(allowed)}")
    missing = [k for k in required if k not in values]
    if missing:
        raise ValueError(f"[{section}] lacks the keys {missing}; its keys are {list(allowed)}")


def _check_train(section: str, values: Mapping[str, Any]) -> None:
    """Through ``TrainConfig.from_dict``, which rejects unknown keys and values of the wrong type."""
    if "seed" in values:
        raise ValueError(f"{section}.seed is not a config key: the seed of a run is --seed "
                         "(in Python, train_config(cfg, section, seed=...))")
    try:
        TrainConfig.from_dict(dict(values))
    except ValueError as err:
        raise ValueError(f"[{section}] {err}") from None
