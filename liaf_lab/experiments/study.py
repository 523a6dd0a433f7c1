"""Paired multi-seed studies: methods x seeds x an optional grid of config values, with 95% intervals.

``run_study`` trains (or loads) one teacher when a method needs it, then for every grid variant, seed and method one
student, each in its own run folder (so a killed study resumes where it stopped and never redoes a
finished run), evaluates it on the tuning split (``val``) and, when the config has one, on a held-out
test split, and writes ``results.csv``/``results.json`` (one row per run) and ``report.md`` with
``study.png``. For one seed, every method's student starts from the same weights and sees the same
batches, so methods are compared by their paired difference on each seed. Hyper-parameters a grid
tunes are chosen on ``val``; the AP reported for them is the test split's.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import itertools
import json
import math
import shutil
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from ..utils.figures import plot_run_curves
from .config import ResolvedConfig, resolve_config
from ..distillers import BASELINE
from .executors import Executor, SlurmOptions, check_slurm, execute
from ..models.backbones import fpn_levels
from ..utils.progress import progress
from .study_folders import StudyError, read_differences, study_folder
from .report import Family, plan_seeds, write_study_report

# Config sections that do not change a student trained without KD: its runs are shared by every
# grid variant that differs only there.
KD_SECTIONS = ("kd", "stage1")

GridMode = Literal["product", "one_at_a_time"]
GRID_MODES = typing.get_args(GridMode)

#: The study's shared teacher features (``liaf_lab.engine.teacher_cache``), one folder per seed, removed once
#: the seed's runs have finished.
TEACHER_CACHE = "teacher_cache"

#: The key of a run record (``record.json``) that names the study artefact a run was adopted from (``adopt_finished``).
ADOPTED = "adopted_from"


@dataclass(frozen=True)
class Run:
    """One student: a grid variant (its ``--set`` overrides), a seed and a method."""

    variant: tuple[str, ...]
    seed: int
    method: str

    @property
    def relevant(self) -> tuple[str, ...]:
        """The overrides that change this run: a no-KD student ignores the KD sections but ``kd.inherit``, and a method
        ignores the options of other methods (``kd.<other>.key``)."""
        from .config import method_tables

        tables = method_tables(self.method)

        def matters(override: str) -> bool:
            keys = override.partition("=")[0].split(".")
            if keys[0] not in KD_SECTIONS or keys[:2] == ["kd", "inherit"]:  # the no-KD control inherits too
                return True
            return bool(tables) and (len(keys) == 2 or keys[1] in tables)

        return tuple(o for o in self.variant if matters(o))

    @property
    def folder(self) -> str:
        label = ",".join(self.relevant) or "default"
        return f"runs/{self.method}/{label.replace('/', '_')}/seed{self.seed}"


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["kd.liaf.mask_scale=literal,count"]`` -> ``{"kd.liaf.mask_scale": ["literal", "count"]}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not (len(parts) == 2 or (len(parts) == 3 and parts[0] == "kd")) or not values.strip():
            raise StudyError(f"--grid {item!r} must look like section.key=value1,value2 (kd.<method>.key=... for a "
                             "method's option)")
        if key in grid:
            raise StudyError(f"--grid names {key} twice")
        grid[key.strip()] = [v.strip() for v in values.split(",")]
    return grid


def grid_variants(grid: dict[str, list[str]], mode: GridMode = "product") -> list[tuple[str, ...]]:
    """The grid's variants as tuples of ``section.key=value`` overrides: every combination of the values
    (``"product"``), or the config as it is plus each value alone (``"one_at_a_time"``, a screen)."""
    if mode not in GRID_MODES:
        raise StudyError(f"grid mode {mode!r} is not one of {list(GRID_MODES)}")
    if not grid:
        return [()]
    if mode == "one_at_a_time":
        return [(), *[(f"{k}={v}",) for k, values in grid.items() for v in values]]
    keys = list(grid)
    return [tuple(f"{k}={v}" for k, v in zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def _check_arguments(config: str | Path | ResolvedConfig, methods: Sequence[str], seeds: Sequence[int],
                     grid: dict[str, list[str]], grid_mode: GridMode,
                     overrides: list[str]) -> tuple[ResolvedConfig, dict[tuple[str, ...], ResolvedConfig]]:
    """The study's config, resolved once (``resolve_config``), and each grid variant's, derived from it (every
    value must make a valid config: keys and types checked); a ``StudyError`` for bad seeds or methods."""
    from ..distillers import method_parts

    if not seeds:
        raise StudyError("--seeds is empty: a study needs at least one seed (two or more for an interval)")
    repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated:
        raise StudyError(f"--seeds repeats {repeated}: each seed is one paired replicate")
    if not methods:
        raise StudyError("--methods is empty")
    for method in methods:
        if method != BASELINE:
            try:
                method_parts(method)
            except ValueError as err:
                raise StudyError(f"--methods {method}: {err}") from None
    if len(set(methods)) != len(methods):
        raise StudyError(f"--methods repeats a method: {list(methods)}")
    cfg = resolve_config(config, overrides)
    return cfg, {variant: cfg.with_overrides(variant) for variant in grid_variants(grid, grid_mode)}


def _study_spec(cfg: ResolvedConfig, grid: dict[str, list[str]], threads: int,
                grid_mode: GridMode = "product") -> dict[str, Any]:
    return {"config": json.loads(json.dumps(cfg, default=str)), "grid": grid, "grid_mode": grid_mode,
            "threads": threads}


def _study_inputs(config: dict[str, Any]) -> dict[str, Any]:
    """What the study's results depend on besides its config (``liaf_lab.utils.provenance``): the data of its splits as
    parsed and the package version (the teacher is added by ``_teacher``)."""
    from .builders import build_datasets, build_test_dataset
    from ..utils.provenance import data_inputs, package_version

    train, val = build_datasets(config)
    return {"data": data_inputs({"train": train, "val": val, "test": build_test_dataset(config)}),
            "version": package_version()}


def _input_differences(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved, new)`` for every differing item of two input records (``inputs.data.val``, ...)."""
    from ..engine.run_folder import spec_differences

    return {k.replace("config.", "inputs.", 1): v
            for k, v in spec_differences({"config": saved}, {"config": new}).items()}


def _runs_teacher(out: Path) -> dict[str, str | None] | None:
    """The teacher that the runs of a study folder from before input records name in their ``run.json`` (path,
    and the file's present hash), ``None`` when no run names one."""
    from ..utils.atomic import read_json
    from ..utils.provenance import teacher_input

    for record in sorted(out.glob("runs/*/*/seed*/run.json")):
        teacher = read_json(record, "run record")["spec"]["config"].get("teacher")
        if teacher is not None:
            return teacher_input(teacher) if Path(teacher).is_file() else {"path": teacher, "sha256": None}
    return None


def _open_study(out: Path, spec: dict[str, Any], methods: Sequence[str], seeds: Sequence[int],
                family: dict[str, Any] | None = None, artefact: Path | None = None) -> None:
    """Create ``out/study.json`` or check that the folder holds this study (methods and seeds may grow) with the
    same inputs (data, package version; ``_check_teacher`` checks the teacher).

    ``family`` (``report.Family.as_dict()``) is recorded; a fixed-width study's target and pilot are
    part of its design and may not change (its budget ``max_seeds`` and the comparisons made may).
    ``artefact``: a shipped study folder this one continues (``adopt_finished``); it is checked as the folder's own
    record is, and a new folder starts from its methods and seeds.
    """
    from ..utils.atomic import read_json, write_json
    from ..engine.seeding import environment_info

    path = out / "study.json"
    inputs = _study_inputs(spec["config"])
    records = [(artefact, read_json(artefact / "study.json", "study record"))] if artefact is not None else []
    if path.exists():
        records.append((out, read_json(path, "study record")))
    for where, saved in records:
        _check_same_study(where, saved, spec, inputs, family or {})
        methods = list(dict.fromkeys([*saved["methods"], *methods]))
        seeds = sorted(set(saved["seeds"]) | set(seeds))
    if path.exists():  # the teacher of an artefact is checked by its content (``adopt_finished``), not recorded
        saved = records[-1][1]
        if "inputs" in saved:
            inputs["teacher"] = saved["inputs"].get("teacher")
        else:
            inputs["teacher"] = _runs_teacher(out)
            warnings.warn(f"{path} predates input records: the present data and package version, and the teacher "
                          "its runs name, are recorded as the study's", stacklevel=3)
    write_json(path, {**spec, "methods": list(methods), "seeds": list(seeds), "inputs": inputs,
                      "family": family or {}, "environment": environment_info()})


def _check_same_study(where: Path, saved: dict[str, Any], spec: dict[str, Any], inputs: dict[str, Any],
                      family: dict[str, Any]) -> None:
    """A ``StudyError`` unless the study recorded in ``where/study.json`` (``saved``) is the study ``spec`` describes:
    the same threads, CPU kernels, config, grid, inputs (but the teacher) and fixed-width design."""
    from ..engine.run_folder import describe_differences, spec_differences
    from ..engine.seeding import environment_info

    if saved["threads"] != spec["threads"]:
        raise StudyError(f"study folder {where} was run with {saved['threads']} threads per run and this call "
                         f"uses {spec['threads']}: results would not be comparable bit for bit. Pass "
                         f"--threads {saved['threads']} or use another --out")
    saved_cpu, cpu = saved.get("environment", {}).get("cpu_capability"), environment_info()["cpu_capability"]
    if saved_cpu is not None and saved_cpu != cpu:
        raise StudyError(f"study folder {where} was run on a CPU with {saved_cpu} kernels and this machine uses {cpu}: "
                         "the same seed trains other students with other kernels, so its runs would not be "
                         "comparable bit for bit. Run it on a machine like the first, or use another --out")
    diffs = read_differences(spec_differences({"config": saved["config"]}, {"config": spec["config"]}),
                             saved["methods"])
    for key in ("grid", "grid_mode"):  # studies saved before grid modes existed are products
        if saved.get(key, "product") != spec[key]:
            diffs[key] = (saved.get(key, "product"), spec[key])
    if "inputs" in saved:
        saved_inputs = {k: v for k, v in saved["inputs"].items() if k != "teacher"}
        diffs.update(_input_differences(saved_inputs, {k: v for k, v in inputs.items() if k != "teacher"}))
    old = saved.get("family") or {}
    if old.get("target_half_width") is not None:
        for key in ("target_half_width", "pilot"):
            if old.get(key) != family.get(key):
                diffs[f"family.{key}"] = (old.get(key), family.get(key))
    if diffs:
        raise StudyError(f"study folder {where} holds a study of another configuration or other inputs "
                         f"({describe_differences(diffs)}); use another --out")


def ready_teacher(out: Path, teacher_weights: str | None) -> str | None:
    """The study's teacher if it needs no training: ``teacher_weights`` (as an absolute path, which every run
    records, so a resumed study may name it relatively from another folder), or ``out/teacher/teacher.pt``."""
    if teacher_weights is not None:
        from ..utils.paths import resolve_path

        return str(resolve_path(teacher_weights).resolve())
    path = out / "teacher" / "teacher.pt"
    return str(path) if path.exists() else None



def _teacher(out: Path, cfg: ResolvedConfig, device: str | None, threads: int, teacher_weights: str | None) -> str:
    """The study's teacher: ``ready_teacher``'s, else trained once (``train_teacher``) in ``out/teacher``."""
    ready = ready_teacher(out, teacher_weights)
    if ready is not None:
        return ready
    from .builders import build_datasets

    torch.set_num_threads(threads)
    train, _ = build_datasets(cfg)
    train_teacher(cfg, train, out / "teacher", device, run_config={"config": cfg})
    return str(out / "teacher" / "teacher.pt")


def train_teacher(cfg: dict[str, Any], train: Any, folder: Path, device: str | torch.device | None,
                  val_dataset: Any = None, run_config: dict[str, Any] | None = None) -> torch.nn.Module:
    """The config's teacher (initialised from seed 0, with the section's pretrained weights remapped to ``train``'s
    classes) trained on ``train`` in the run folder ``folder`` (``train_detector``, evaluated on ``val_dataset``
    when given), its ``curves.png`` drawn and its weights saved as ``folder/teacher.pt``; the teacher of a study
    and of the demo."""
    from .builders import build_detector, dataset_category_ids, train_config
    from ..engine import train_detector
    from ..models import save_detector

    teacher = build_detector(cfg, "teacher", len(train.class_names) + 1, seed=0, class_names=train.class_names,
                             category_ids=dataset_category_ids(train))
    train_detector(teacher, train, train_config(cfg, "train_teacher", seed=0), folder, device, desc="teacher",
                   val_dataset=val_dataset, run_config=run_config)
    plot_run_curves(folder)
    save_detector(folder / "teacher.pt", teacher, train.class_names)
    return teacher


def _check_teacher(out: Path, cfg: ResolvedConfig, path: str) -> None:
    """Before any run trains: the teacher must load into the config's teacher, and be the teacher (path and
    content hash) that ``out/study.json`` records, if it records one; it is recorded there otherwise."""
    from ..utils.atomic import read_json, write_json
    from .builders import build_datasets, build_detector
    from ..engine.run_folder import describe_differences
    from ..utils.provenance import teacher_input

    train, _ = build_datasets(cfg)
    build_detector(cfg, "teacher", len(train.class_names) + 1, weights_path=path, class_names=train.class_names)
    record = read_json(out / "study.json", "study record")
    teacher, saved = teacher_input(path), record["inputs"].get("teacher")
    if saved is not None and saved != teacher:
        listed = describe_differences(_input_differences({"teacher": saved}, {"teacher": teacher}))
        raise StudyError(f"study folder {out} was run with another teacher ({listed}): its students were distilled "
                         f"from {saved['path']}. Pass --teacher {saved['path']} (unchanged) or use another --out")
    if saved is None:
        record["inputs"]["teacher"] = teacher
        write_json(out / "study.json", record)

def _check_teacher_cache(out: Path, cfg: ResolvedConfig, path: str, seeds_at_once: int, bound_gb: float) -> None:
    """Before any run trains: a ``StudyError`` naming the size when the teacher cache of ``seeds_at_once`` seeds
    would exceed ``bound_gb`` GiB or the free disk space (less 1 GiB) of ``out``.

    A seed's entries are the teacher's FPN levels of its training batches: measured on the first batch, times the
    distillation's iterations (a stage 1 reads the first batches of the same order: no entries of its own).
    """
    from .builders import build_datasets, build_detector
    from ..data import collate_fn
    from ..engine.teacher_cache import MIN_FREE_BYTES

    train, _ = build_datasets(cfg)
    teacher = build_detector(cfg, "teacher", len(train.class_names) + 1, weights_path=path).eval()
    batch = cfg["distill"].get("batch_size", 8)
    images, _ = collate_fn([train[i] for i in range(min(batch, len(train)))])
    with torch.no_grad():
        levels = fpn_levels(teacher.backbone, teacher.transform(images)[0].tensors)
    per_batch = sum(v.numel() * v.element_size() for v in levels.values()) * batch / len(images)
    per_seed = per_batch * max(cfg["distill"]["iterations"], cfg.get("stage1", {}).get("iterations", 0))
    needed = per_seed * seeds_at_once
    free = shutil.disk_usage(out).free - MIN_FREE_BYTES
    limit = min(bound_gb * 2**30, free)
    if needed > limit:
        which = (f"the bound of {bound_gb:g} GiB (--teacher-cache-gb)" if limit < free
                 else f"the free disk space of {out} ({free / 2**30:.1f} GiB, less 1 GiB kept free)")
        raise StudyError(f"the teacher cache would need about {needed / 2**30:.1f} GiB ({seeds_at_once} seeds at once x "
                         f"{per_seed / 2**30:.2f} GiB: {per_seed / per_batch:.0f} batches of {per_batch / 2**20:.2f} "
                         f"MiB), above {which}; raise the bound, use fewer --jobs, or pass --teacher-cache off")


def _legacy_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run begun before runs recorded their inputs (its ``run.json`` has none): it is
    resumed and adopted as it is."""
    from ..utils.atomic import RecordError, read_json

    try:
        spec = read_json(folder / "run.json", "run record")["spec"]
    except (FileNotFoundError, RecordError, KeyError, TypeError):
        return False
    return "inputs" not in spec.get("config", {})


def _write_run_record(folder: Path, run_config: dict[str, Any]) -> None:
    """``folder/record.json``: the run's config and inputs, and the hashes of its ``result.json`` and ``student.pt``
    (written last: a run is finished when this record, its result and its weights agree)."""
    from ..utils.atomic import write_json
    from ..utils.provenance import file_sha256

    write_json(folder / "record.json", {"run_config": run_config, "result_sha256": file_sha256(folder / "result.json"),
                                        "student_sha256": file_sha256(folder / "student.pt")})


def _finished_row(folder: Path, run_config: dict[str, Any]) -> dict[str, Any] | None:
    """The row of the finished run in ``folder``, or ``None`` when it must be trained: not finished, or damaged
    (its result, weights and record disagree; redone with a warning). ``StudyError`` when it finished with
    another configuration or other inputs than ``run_config``."""
    from ..utils.atomic import RecordError, read_json
    from ..engine.run_folder import describe_differences, spec_differences
    from ..utils.provenance import file_sha256

    result, record_path, student = folder / "result.json", folder / "record.json", folder / "student.pt"
    if not result.exists():
        return None
    try:
        row, record = read_json(result, "run result"), None
        if record_path.exists():
            record = read_json(record_path, "run record")
        elif "inputs" not in run_config and student.is_file():  # finished before records: run.json records it
            record = {"run_config": read_json(folder / "run.json", "run record")["spec"]["config"]}
    except RecordError as err:
        problem = str(err)
    else:
        if record is None:
            problem = f"{record_path} is missing"
        elif ADOPTED not in record and record.get("run_config") != run_config:
            listed = describe_differences(spec_differences({"config": record.get("run_config", {})},
                                                           {"config": run_config}))
            raise StudyError(f"run {folder} finished with another configuration or other inputs ({listed}); use "
                             "another --out")
        elif ADOPTED in record:  # checked as a whole study when it was adopted (``adopt_finished``)
            if file_sha256(result) == record.get("result_sha256"):
                return row
            problem = f"{result} is not the result its record names"
        elif "student_sha256" not in record:  # a run finished before records, adopted: its record is written now
            _write_run_record(folder, run_config)
            return {**row, "student_sha256": file_sha256(student)}
        elif not student.is_file() or file_sha256(student) != record.get("student_sha256"):
            problem = f"{student} is missing or is not the student its record names"
        elif file_sha256(result) != record.get("result_sha256"):
            problem = f"{result} is not the result its record names"
        else:
            return {**row, "student_sha256": record["student_sha256"]}
    warnings.warn(f"run {folder} is damaged ({problem}); it is redone", stacklevel=3)
    for path in (result, record_path):
        path.unlink(missing_ok=True)
    return None


def run_one(out: str, config: str | Path | ResolvedConfig, overrides: Sequence[str], run: Run,
            teacher_path: str | None, device: str | None, threads: int, teacher_cache: bool = False) -> dict[str, Any]:
    """Train and evaluate one student of the study (in this process); returns its row.

    Its config is ``config`` with ``overrides`` and the run's (``run.relevant``) applied (``resolve_config``): a
    study passes its resolved config, so a run reads no config file.

    A finished run (its result, weights and record agree, and its record names these inputs) is not
    trained again; a damaged one is redone with a warning. With ``teacher_cache`` the teacher's FPN levels
    are shared with the seed's other runs through ``out/teacher_cache/seed<k>`` (``TeacherCache``: exact; how
    many batches were read and computed goes to the run's ``teacher_cache.json``).
    """
    from ..utils.atomic import write_json
    from .builders import (
        build_datasets, build_detector, build_distiller, build_test_dataset, dataset_category_ids, train_config,
    )
    from .config import method_config
    from ..engine import evaluate_coco, train_student
    from ..engine.distributed import resolve_device
    from ..engine.teacher_cache import TeacherCache
    from ..engine.tracking import log_run_summary
    from ..models import save_detector
    from ..utils.provenance import data_inputs, file_sha256, package_version

    torch.set_num_threads(threads)
    folder = Path(out) / run.folder
    result_path = folder / "result.json"
    start, cpu_start = time.perf_counter(), time.process_time()
    cfg = resolve_config(config, [*overrides, *run.relevant])
    train, val = build_datasets(cfg)
    test = build_test_dataset(cfg, train.class_names)
    inherit = cfg["kd"].get("inherit", False)
    uses_teacher = run.method != BASELINE or inherit  # a no-KD run reads the teacher only to inherit
    run_config = {"config": method_config(cfg, run.method), "method": run.method,
                  "teacher": teacher_path if uses_teacher else None}
    if not _legacy_run(folder):
        run_config["inputs"] = {"data": data_inputs({"train": train, "val": val, "test": test}),
                                "version": package_version(),
                                "teacher_sha256": file_sha256(teacher_path) if uses_teacher else None}
    run_config = json.loads(json.dumps(run_config, default=str))  # as run.json and record.json hold it
    finished = _finished_row(folder, run_config)
    if finished is not None:
        return finished
    nc = len(train.class_names) + 1
    student = build_detector(cfg, "student", nc, seed=run.seed, class_names=train.class_names,
                             category_ids=dataset_category_ids(train))
    tcfg = train_config(cfg, "distill", seed=run.seed)
    teacher = (build_detector(cfg, "teacher", nc, weights_path=teacher_path, class_names=train.class_names)
               if run_config["teacher"] else None)
    dev = resolve_device(device)
    cache = (TeacherCache(Path(out) / TEACHER_CACHE / f"seed{run.seed}", teacher, dev)
             if teacher_cache and teacher is not None and run.method != BASELINE else None)
    train_student(student, teacher, build_distiller(run.method, cfg, student, seed=run.seed), train, tcfg, folder,
                  device, stage1_cfg=train_config(cfg, "stage1", seed=run.seed), inherit=inherit,
                  run_config=run_config, desc=f"no KD seed {run.seed}", teacher_cache=cache)
    plot_run_curves(folder)
    if cache is not None:
        write_json(folder / "teacher_cache.json", {"read": cache.hits, "computed": cache.misses})
    save_detector(folder / "student.pt", student, train.class_names)
    row: dict[str, Any] = {"method": run.method, "seed": run.seed, "variant": ",".join(run.variant) or "default",
                           "folder": run.folder, "threads": threads}
    row.update({f"val_{k}": v for k, v in evaluate_coco(student, val, device=dev, desc="evaluate val").items()})
    if test is not None:
        row.update({f"test_{k}": v for k, v in evaluate_coco(student, test, device=dev, desc="evaluate test").items()})
    row["seconds"] = time.perf_counter() - start
    row["cpu_seconds"] = time.process_time() - cpu_start  # this process's CPU time: the run's cost on a loaded machine
    row["student_sha256"] = file_sha256(folder / "student.pt")  # a rerun of the same seed and machine kind gives it
    hparams = {"method": run.method, "seed": run.seed, "variant": row["variant"],
               **dict(o.partition("=")[::2] for o in run.variant)}  # one HParams entry per run, with its grid values
    log_run_summary(folder, tcfg.iterations, {k: v for k, v in row.items() if k.startswith(("val_", "test_"))},
                    hparams)
    write_json(result_path, row)
    _write_run_record(folder, run_config)
    return row


def _locked(study: Callable[..., StudyResult]) -> Callable[..., StudyResult]:
    """``study`` run holding the lock of its study folder (``out_dir``): a second process is refused with the
    holder's PID instead of both writing the same runs."""
    from ..utils.processes import FolderLock, FolderLockedError

    signature = inspect.signature(study)

    @functools.wraps(study)
    def locked(*args: Any, **kwargs: Any) -> StudyResult:
        out = Path(signature.bind(*args, **kwargs).arguments["out_dir"])
        created = not out.exists()
        try:
            with FolderLock(out) as lock:
                try:
                    return study(*args, **kwargs)
                except BaseException:
                    if created:  # a study refused before it began leaves no folder behind
                        lock.path.unlink(missing_ok=True)
                        with contextlib.suppress(OSError):
                            out.rmdir()
                    raise
        except FolderLockedError as err:  # raised on entering only
            raise StudyError(f"study folder {err}: a study runs there; wait for it to end or use another "
                             "--out") from None

    return locked


def finished_row(out: str | Path, folder: str) -> dict[str, Any] | None:
    """The row of the study run in ``out/folder`` if it finished (its result, weights and record agree), else
    ``None``; ``run_one`` checks the rest (its configuration and inputs) when it runs."""
    from ..utils.atomic import RecordError, read_json
    from ..utils.provenance import file_sha256

    folder_path = Path(out) / folder
    result, record, student = (folder_path / n for n in ("result.json", "record.json", "student.pt"))
    try:
        if not (result.is_file() and record.is_file()):
            return None
        saved = read_json(record, "run record")
        if ADOPTED in saved:
            return read_json(result, "run result") if file_sha256(result) == saved.get("result_sha256") else None
        if not student.is_file() or (file_sha256(result), file_sha256(student)) != (saved.get("result_sha256"),
                                                                                     saved.get("student_sha256")):
            return None
        return {**read_json(result, "run result"), "student_sha256": saved["student_sha256"]}
    except RecordError:
        return None


def adopt_finished(out: Path, artefact: Path, teacher_path: str | None) -> int:
    """Adopt the finished runs of ``artefact``, a study shipped as its ``study.json`` and ``results.json`` (what
    ``--report-only`` writes), into the study folder ``out``: each run ``out`` has not finished becomes a run folder
    holding the artefact's row (``result.json``) and a record naming the artefact (``ADOPTED``), without weights.
    The study then goes on where the artefact stopped, on another machine of the same kind or after its run folders
    were lost. Returns the number of runs adopted.

    ``_open_study`` has checked that the artefact is this study (config, grid, data, version, threads, CPU kernels,
    design); here its teacher must be the same file by content. A run is deterministic for a seed, machine kind
    and thread count, so an adopted row is the row the run gives again; its ``student_sha256`` (rows from
    2026-12-07 on) lets a rerun in another folder prove it. ``load_study_run`` refuses an adopted run (no weights).
    """
    from ..utils.atomic import read_json, write_json
    from ..utils.provenance import file_sha256

    shipped = read_json(artefact / "study.json", "study record")
    teacher = (shipped.get("inputs") or {}).get("teacher")
    if teacher is not None and teacher_path is not None and teacher.get("sha256") != file_sha256(teacher_path):
        raise StudyError(f"{artefact} was distilled from another teacher (sha256 {teacher.get('sha256')}) than "
                         f"{teacher_path}: its runs cannot be adopted; pass the teacher it names ({teacher.get('path')})")
    adopted = 0
    for row in read_json(artefact / "results.json", "study results"):
        folder = out / row["folder"]
        if (folder / "result.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "result.json", {k: v for k, v in row.items() if k != "settings"})
        write_json(folder / "record.json", {ADOPTED: str(artefact), "result_sha256": file_sha256(folder / "result.json"),
                                            "student_sha256": row.get("student_sha256")})
        adopted += 1
    return adopted


@dataclass
class StudyResult:
    rows: list[dict[str, Any]]
    report: Path
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


@_locked
def run_study(out_dir: str | Path, config: str | Path | ResolvedConfig = "bench",
              methods: Sequence[str] = ("none", "fitnet", "liaf"), seeds: Sequence[int] = (0, 1, 2),
              grid: dict[str, list[str]] | None = None,
              overrides: Sequence[str] = (), device: str | None = None, jobs: int = 1, threads: int = 1,
              teacher_weights: str | None = None, grid_mode: GridMode = "product", pairwise: bool = False,
              versus: Sequence[str] = (), target_half_width: float | None = None, max_seeds: int | None = None,
              executor: Executor = "local", executor_options: SlurmOptions | None = None,
              teacher_cache: bool | None = None, teacher_cache_gb: float = 20.0,
              resume_from: str | Path | None = None) -> StudyResult:
    """Run (or resume) a study and write its rows, report, comparisons and figure in ``out_dir``.

    Args:
        config, overrides: a preset name or TOML file (or a config already resolved) and ``section.key=value``
            overrides, resolved once here (``resolve_config``); the grid's variants, the teacher and every run
            derive from that, reading no config file again.
        methods: ``"none"`` (the baseline every difference is paired with) and registered distillers.
        seeds: one paired replicate each (>= 2 for an interval); with ``target_half_width``, the pilot.
        grid: ``{"section.key": [values]}``; its variants (``grid_mode``) apply to every KD method.
        grid_mode: ``"product"`` (every combination) or ``"one_at_a_time"`` (the config as it is, then
            each value alone: a screen of many options at the cost of their number, not their product).
        teacher_weights: the teacher checkpoint; without it one is trained in ``out_dir/teacher``, only if
            a KD method needs it (a study of ``none`` alone trains no teacher).
        jobs: runs trained at once in separate processes, each with ``threads`` threads; results do not
            depend on ``jobs``, only on ``threads`` (recorded; a folder refuses another value).
        pairwise, versus: the family of comparisons (``report.Family``): by default each method
            against the baseline; ``pairwise`` adds every pair, ``versus`` every method against these.
            Verdicts follow Holm-adjusted p-values over the family.
        target_half_width, max_seeds: fixed-width intervals by Stein's two-stage rule: after the pilot
            (``seeds``), each comparison gets the seeds its pilot spread says a 95% half-width of
            ``target_half_width`` AP needs, at most ``max_seeds`` (the next integers after the pilot).
        executor: ``"local"`` (processes, ``jobs``) or ``"slurm"``: the teacher (when trained) and every run as a
            Slurm job through submitit (``executor_options``; logs and job ids in ``out_dir/slurm``), with the same
            results (``liaf_lab.experiments.executors``).
        teacher_cache: share the frozen teacher's FPN levels between the runs of a seed (``TeacherCache``; exact:
            the students are bit-identical either way) in ``out_dir/teacher_cache``, each seed's folder removed
            once its runs have finished. ``None``: on when the runs train on the CPU. Refused before any run when
            it would need more than ``teacher_cache_gb`` GiB or the free disk space (seeds at once x the
            teacher's levels of one seed's batches; at once: ``jobs + 1`` seeds locally, every seed on Slurm).
        resume_from: a shipped artefact of this same study (``study.json`` and ``results.json``, e.g.
            ``data_samples/studies/bench_all``) whose finished runs are adopted, not trained (``adopt_finished``).
    """
    start = time.perf_counter()
    out, grid, overrides = Path(out_dir), dict(grid or {}), list(overrides)
    if jobs < 1 or threads < 1:
        raise StudyError(f"jobs ({jobs}) and threads ({threads}) must be at least 1")
    if executor == "slurm":
        check_slurm(executor_options or SlurmOptions())
    methods = list(dict.fromkeys([BASELINE, *methods])) if BASELINE not in methods else list(methods)
    cfg, variants = _check_arguments(config, methods, seeds, grid, grid_mode, overrides)
    family = _check_family(methods, seeds, grid, grid_mode, pairwise, versus, target_half_width, max_seeds)
    artefact = study_folder(resume_from) if resume_from is not None else None
    if artefact is not None and not (artefact / "results.json").is_file():
        raise StudyError(f"--resume-from {artefact} holds no results.json: it is not a shipped study (write one with "
                         "`liaf-lab study --out DIR --report-only`)")
    _open_study(out, _study_spec(cfg, grid, threads, grid_mode), methods, seeds, family.as_dict(), artefact)
    needs_teacher = any(m != BASELINE for m in methods) or any(v["kd"].get("inherit", False)
                                                               for v in variants.values())
    execute_tasks = partial(execute, jobs=jobs, executor=executor, options=executor_options,
                            log_folder=out / "slurm")
    teacher_path = None
    if needs_teacher:  # trained where the runs train (a Slurm job), unless it exists; checked before any run
        teacher_task = ("teacher", (out, cfg, device, threads, teacher_weights))
        teacher_path = next(execute_tasks(_teacher, [teacher_task], jobs=1,
                                          finished=lambda _: ready_teacher(out, teacher_weights)))[1]
        _check_teacher(out, cfg, teacher_path)
    if artefact is not None:
        adopt_finished(out, artefact, teacher_path)
    if teacher_cache is None:
        from ..engine.distributed import resolve_device

        teacher_cache = resolve_device(device).type == "cpu"
    teacher_cache = bool(teacher_cache and needs_teacher and any(m != BASELINE for m in methods))
    if teacher_cache:
        every_seed = max(len(seeds), max_seeds or 0)
        _check_teacher_cache(out, cfg, teacher_path, every_seed if executor == "slurm"
                             else min(every_seed, jobs + 1), teacher_cache_gb)
    runs = list(dict.fromkeys(Run(v, s, m) for v in grid_variants(grid, grid_mode) for s in seeds for m in methods))
    # Locally run_one checks a finished run in full; on Slurm a run whose result, weights and record agree is read
    # back without a job.
    finished = partial(finished_row, out) if executor == "slurm" else None
    rows = _execute(execute_tasks, [(str(out), cfg, (), r, teacher_path, device, threads, teacher_cache)
                                    for r in runs], "study", finished)
    if family.target_half_width is not None:  # Stein's second stage: the seeds the pilot's spread asks for
        plan = plan_seeds(_table(runs, rows), methods, grid, grid_mode, family)
        # seed by seed, as the pilot: a stopped study then leaves whole seeds (``report_finished``), and the teacher
        # cache holds the few seeds under way that ``_check_teacher_cache`` bounded
        extra = sorted((Run(() if v == "default" else tuple(v.split(",")), s, m)
                        for (m, v), wanted in plan.items() for s in wanted if s not in family.pilot),
                       key=lambda r: (r.seed, methods.index(r.method)))
        runs = list(dict.fromkeys([*runs, *extra]))
        if extra:
            _open_study(out, _study_spec(cfg, grid, threads, grid_mode), methods,
                        sorted({r.seed for r in runs}), family.as_dict())
        rows.update(_execute(execute_tasks, [(str(out), cfg, (), r, teacher_path, device, threads,
                                              teacher_cache) for r in extra if r.folder not in rows],
                             "study, stage 2", finished))
    table = _table(runs, rows)
    seconds = time.perf_counter() - start
    report, summary = write_study_report(out, table, methods, sorted({r.seed for r in runs}), grid, seconds,
                                         grid_mode, family)
    return StudyResult(table, report, seconds, summary)


def report_finished(out_dir: str | Path) -> StudyResult:
    """Write the report of a study folder's finished runs and run nothing: what a stopped (or still running) study
    says so far, in its ``report.md``, ``results.json`` and comparisons (``liaf-lab study --out DIR --report-only``).

    The runs are those of the folder's recorded methods, seeds and grid (``study.json``); a seed counts only when
    every run of it has finished, so every comparison stays paired. Raises ``StudyError`` when the folder holds no
    study or no seed has finished whole.
    """
    from ..utils.atomic import read_json

    start = time.perf_counter()
    out = study_folder(out_dir)
    spec = read_json(out / "study.json", "study record")
    grid, grid_mode = spec.get("grid", {}), spec.get("grid_mode", "product")
    family = Family.from_dict(spec.get("family"))
    variants = grid_variants(grid, grid_mode)
    rows: dict[str, dict[str, Any]] = {}
    seeds = []
    for seed in spec["seeds"]:
        runs = list(dict.fromkeys(Run(v, seed, m) for v in variants for m in spec["methods"]))
        found = {r.folder: finished_row(out, r.folder) for r in runs}
        if all(row is not None for row in found.values()):
            rows.update(found)
            seeds.append(seed)
    if not seeds:
        raise StudyError(f"{out} has no seed whose runs have all finished: nothing to report yet")
    runs = list(dict.fromkeys(Run(v, s, m) for v in variants for s in seeds for m in spec["methods"]))
    table = _table(runs, rows)
    seconds = time.perf_counter() - start
    report, summary = write_study_report(out, table, spec["methods"], seeds, grid, seconds, grid_mode, family)
    return StudyResult(table, report, seconds, summary)


def _table(runs: list[Run], rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, seed, method); a no-KD run serves every variant that differs only in KD settings."""
    return [{**rows[r.folder], "variant": ",".join(r.variant) or "default",
             "settings": ",".join(r.relevant) or "default"} for r in runs]



def _execute(execute_tasks: Callable, tasks: list[tuple], desc: str,
             finished: Callable[[str], dict[str, Any] | None] | None) -> dict[str, dict[str, Any]]:
    """Run (or load) each task's run through ``execute_tasks`` (``executors.execute`` with the study's jobs and
    executor); ``{folder: row}``. ``finished`` reads a run back without running it (``None``: ``run_one`` checks
    each run itself)."""
    tasks = list({task[3].folder: task for task in tasks}.values())
    rows: dict[str, dict[str, Any]] = {}
    pending = collections.Counter(task[3].seed for task in tasks)
    bar = progress(total=len(tasks), desc=desc, dynamic_ncols=True)
    for folder, row in execute_tasks(run_one, [(task[3].folder, task) for task in tasks], finished=finished):
        rows[folder] = row  # the bar moves as runs finish, in any order
        bar.update(1)
        seed = int(row["seed"])
        pending[seed] -= 1
        if not pending[seed]:  # no run of this seed reads its teacher cache again
            shutil.rmtree(Path(tasks[0][0]) / TEACHER_CACHE / f"seed{seed}", ignore_errors=True)
    bar.close()
    return rows


def _check_family(methods: Sequence[str], seeds: Sequence[int], grid: dict[str, list[str]], grid_mode: GridMode,
                  pairwise: bool, versus: Sequence[str], target_half_width: float | None, max_seeds: int | None):
    """The study's ``Family`` of comparisons, or a ``StudyError`` naming what is wrong with its arguments."""
    for ref in versus:
        if ref not in methods or ref == BASELINE:
            raise StudyError(f"--versus {ref}: not one of the study's KD methods {[m for m in methods if m != BASELINE]}")
    if target_half_width is None:
        if max_seeds is not None:
            raise StudyError("--max-seeds is the seed budget of --target-halfwidth; give both or neither")
        return Family(pairwise, tuple(versus))
    if not (isinstance(target_half_width, (int, float)) and math.isfinite(target_half_width)
            and target_half_width > 0):
        raise StudyError(f"--target-halfwidth must be a finite number of AP points > 0, got {target_half_width}")
    if max_seeds is None:
        raise StudyError("--target-halfwidth needs --max-seeds, the most seeds a comparison may use (the budget)")
    if len(seeds) < 2:
        raise StudyError(f"--target-halfwidth: the pilot (--seeds) needs at least 2 seeds to measure the spread, "
                         f"got {len(seeds)}")
    if max_seeds < len(seeds):
        raise StudyError(f"--max-seeds {max_seeds} is below the pilot's {len(seeds)} seeds (--seeds)")
    if grid and grid_mode == "product":
        raise StudyError("--target-halfwidth works without a grid or with a one-at-a-time screen (--one-at-a-time), "
                         "whose family is each value against its method's preset")
    family = Family(pairwise, tuple(versus), float(target_half_width), int(max_seeds), tuple(seeds))
    _warn_small_pilot(len(family.pairs(list(methods))) if not grid else sum(map(len, grid.values())), len(seeds))
    return family


def _warn_small_pilot(family_size: int, pilot: int) -> None:
    """Warn, before any run, when Stein's test on a pilot of ``pilot`` seeds can separate only differences of more
    than 3 half-widths over a family of ``family_size`` comparisons (``verdicts.separable_ratio``), naming the
    pilot that would bring it to 3 or less."""
    from .verdicts import separable_ratio

    if family_size < 2 or (ratio := separable_ratio(family_size, pilot)) <= 3:
        return
    better = next((p for p in range(pilot + 1, 100) if separable_ratio(family_size, p) <= 3), 100)
    warnings.warn(f"--target-halfwidth with a pilot of {pilot} seeds: Stein's test keeps {pilot - 1} degrees of "
                  f"freedom, so over a family of {family_size} comparisons a difference is separated only when it is "
                  f"{ratio:.1f} times its interval's half-width; a pilot of {better} seeds (--seeds) brings that to "
                  f"{separable_ratio(family_size, better):.1f}", stacklevel=3)



@dataclass
class StudyRun:
    """One finished run of a study folder, loaded for analysis (``load_study_run``).

    Attributes:
        method, seed, variant: which run; ``folder``: its folder.
        config: the run's resolved config (from its ``run.json``).
        student: the trained student (eval mode); ``distiller``: the trained distiller (eval mode,
            stage-1 and stage-2 modules), or ``None`` for no KD.
        result: the run's row (``result.json``: val/test COCO metrics, seconds).
        class_names: the dataset's classes (label ``i`` is ``class_names[i - 1]``).
    """

    method: str
    seed: int
    variant: str
    folder: Path
    config: dict[str, Any]
    student: Any
    distiller: Any
    result: dict[str, Any]
    class_names: list[str]


def loadable_runs(study_dir: str | Path, method: str) -> list[tuple[str, int]]:
    """``(variant, seed)`` of every finished run of ``method`` in a study folder that ``load_study_run`` can load
    (trained there, not adopted), sorted."""
    from ..utils.atomic import read_json

    out = study_folder(study_dir)
    found = []
    for result in (out / "runs" / method).glob("*/seed*/result.json"):
        record = result.parent / "record.json"
        if record.is_file() and ADOPTED in read_json(record, "run record"):
            continue
        found.append((result.parent.parent.name, int(result.parent.name.removeprefix("seed"))))
    return sorted(found)


def study_teacher(study_dir: str | Path) -> Path:
    """The teacher a study folder recorded (its ``study.json``): at its recorded path, else the shipped checkpoint
    in ``data_samples/checkpoints`` with its sha256 (a study made in another checkout). ``StudyError`` when
    neither is there."""
    from ..utils.atomic import read_json
    from ..utils.paths import PROJECT_ROOT
    from ..utils.provenance import file_sha256

    out = study_folder(study_dir)
    recorded = (read_json(out / "study.json", "study record").get("inputs") or {}).get("teacher")
    if not isinstance(recorded, dict):
        raise StudyError(f"{out}/study.json records no teacher; pass the teacher's weights yourself")
    if recorded.get("path") and Path(recorded["path"]).is_file():
        return Path(recorded["path"])
    for candidate in sorted((PROJECT_ROOT / "data_samples" / "checkpoints").glob("*.pt")):
        if file_sha256(candidate) == recorded.get("sha256"):
            return candidate
    raise StudyError(f"the teacher of {out} ({recorded.get('path')}) is gone and no shipped checkpoint has its "
                     "sha256; pass the teacher's weights yourself")


def load_study_run(study_dir: str | Path, method: str, seed: int, variant: str = "default",
                   device: str | torch.device = "cpu") -> StudyRun:
    """Load a finished run of ``study_dir``: its student (``student.pt``) and distiller (from ``last.pt``).

    Raises ``StudyError`` naming the problem: no study in the folder, or the run is not there or not
    finished (the runs the folder holds are listed).
    """
    from ..utils.atomic import read_json
    from .builders import build_detector, build_distiller
    from ..utils.checkpoint import CheckpointError, load_checkpoint, load_module_state

    out = study_folder(study_dir)
    folder = out / Run(tuple(v for v in variant.split(",") if v != "default"), seed, method).folder
    if not (folder / "result.json").is_file():
        done = sorted(str(p.parent.relative_to(out / "runs")) for p in (out / "runs").glob("*/*/seed*/result.json"))
        raise StudyError(f"{out} has no finished run {method}/{variant}/seed{seed}; it has {done or 'none'}")
    record = read_json(folder / "record.json", "run record") if (folder / "record.json").is_file() else {}
    if ADOPTED in record:
        raise StudyError(f"run {method}/{variant}/seed{seed} of {out} was adopted from {record[ADOPTED]}: it has its "
                         "row, not its weights; train it in a study folder of its own to load it")
    spec = read_json(folder / "run.json", "run record")["spec"]["config"]
    cfg, saved = spec["config"], load_checkpoint(folder / "student.pt")
    if not isinstance(saved.get("meta"), dict) or "class_names" not in saved["meta"]:
        raise CheckpointError(f"{folder / 'student.pt'} is not a student written by save_detector (it has no "
                              "class names)")
    names = list(saved["meta"]["class_names"])
    student = build_detector(cfg, "student", len(names) + 1, weights_path=folder / "student.pt", class_names=names)
    distiller = build_distiller(method, cfg, student, seed=seed)
    if distiller is not None:
        last = folder / "last.pt"
        modules = load_checkpoint(last).get("modules")
        if not isinstance(modules, dict) or "distiller" not in modules:
            raise CheckpointError(f"{last} holds no distiller state; expected the last.pt of a {method!r} run")
        state = dict(modules["distiller"])
        for key in distiller.state_dict():  # runs saved before the stage-1 counter existed had a full stage 1
            if key.endswith("stage1_steps"):
                state.setdefault(key, torch.tensor(int(cfg["stage1"]["iterations"])))
        load_module_state(distiller, state, last, f"a {method!r} distiller")
        distiller = distiller.to(device).eval()
    return StudyRun(method, seed, variant, folder, cfg, student.to(device).eval(), distiller,
                    read_json(folder / "result.json", "run result"), names)
