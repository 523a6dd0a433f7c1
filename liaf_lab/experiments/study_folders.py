"""What a study folder is, for the study that runs in it (``study.py``) and the report that reads it
(``report.py``): where one is found (``study_folder``), the error a wrong one raises (``StudyError``) and
which config differences its saved runs ignore (``read_differences``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class StudyError(ValueError):
    """A study folder holds another study, or the study's arguments are wrong."""


def study_folder(study_dir: str | Path) -> Path:
    """A study folder that must exist: a relative path from the current folder, else from the project
    root (as data paths resolve); ``StudyError`` when it holds no ``study.json``."""
    from ..utils.paths import PROJECT_ROOT

    out = Path(study_dir).expanduser()
    if not out.is_absolute() and not out.exists() and (PROJECT_ROOT / out).exists():
        out = PROJECT_ROOT / out
    if not (out / "study.json").is_file():
        raise StudyError(f"{out} holds no study (no study.json): run `liaf-lab study --out {out}` first")
    return out


def read_differences(diffs: dict[str, tuple[Any, Any]], methods: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """``diffs`` (``config.<section>.<key>`` -> values) without the ``[kd.<method>]`` tables no run of ``methods``
    reads: a method new to the package or the study changes no saved run."""
    from .config import method_tables

    ran = {table for m in methods for table in method_tables(m)}
    return {k: v for k, v in diffs.items()
            if not (k.startswith("config.kd.") and k.split(".")[2] not in ran and len(k.split(".")) > 3)}
