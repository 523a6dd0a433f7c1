"""What results depend on besides their config: the content of the teacher file, the data, the package version.

A study records these inputs in ``study.json`` and every run of it in its ``run.json`` (through ``fit``'s
run config) and ``record.json``; a study folder refuses a rerun or an extension whose inputs differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 1 << 20
_digests: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256, per process


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the file's content (hex), cached per process while its size and mtime stay the same."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def dataset_sha256(dataset: Any) -> str:
    """The SHA-256 of a loader's data as parsed: its classes and, per image, file name, size, boxes and labels.

    ``dataset``: a ``DetectionDataset`` (its ``class_names`` and ``records``). Two datasets read from
    annotation files or image lists that differ in anything training or evaluation sees differ here.
    """
    digest = hashlib.sha256(repr(list(dataset.class_names)).encode())
    for r in dataset.records:
        digest.update(repr((r.image_id, r.path.name, r.width, r.height)).encode())
        for array in (r.boxes, r.labels, r.ignore_boxes, r.ignore_labels, r.areas, r.ignore_areas):
            digest.update(b"-" if array is None else np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def data_inputs(splits: Mapping[str, Any]) -> dict[str, str | None]:
    """``{split: dataset_sha256}`` of ``{"train": ..., "val": ..., "test": ... or None}``."""
    return {name: None if ds is None else dataset_sha256(ds) for name, ds in splits.items()}


def package_version() -> str:
    """liaf_lab's version, recorded with every study and run."""
    from .version import __version__

    return __version__


def teacher_input(path: str | Path | None) -> dict[str, str] | None:
    """``{"path": absolute path, "sha256": content hash}`` of a teacher file, ``None`` without one."""
    if path is None:
        return None
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}
