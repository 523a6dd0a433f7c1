"""Presets and config files (TOML): ``load_config("tiny" | "paper" | path, overrides)``."""

from __future__ import annotations

import ast
import copy
import tomllib
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "configs"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load a preset by name or a TOML file, then apply ``section.key=value`` overrides."""
    path = Path(name_or_path)
    if not path.suffix and str(name_or_path) in list_presets():
        path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"config {name_or_path!r} is neither a preset {list_presets()} nor a TOML file")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path} is not valid TOML: {err}") from err
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["kd.loss_weight=2", "student.depth=34"]`` -> a copy of ``cfg`` with those values set."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2:
            raise ValueError(f"override {item!r} must look like section.key=value")
        section, name = parts
        if section not in cfg:
            raise ValueError(f"override {item!r}: no section {section!r}; sections: {sorted(cfg)}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False}.get(raw.lower(), raw)
        cfg[section][name] = value
    return cfg


def resolve_path(path: str | Path) -> Path:
    """A relative path from the current folder if it exists there, else from the project root."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    candidate = PROJECT_ROOT / path
    if candidate.exists():
        return candidate
    raise FileNotFoundError(f"{path} not found (looked in {Path.cwd()} and {PROJECT_ROOT})")
