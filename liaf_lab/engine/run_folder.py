"""A run folder's bookkeeping: what a run is bound to (``run.json``), what resuming it may change, and which
checkpoint it resumes from."""

from __future__ import annotations

import json
import warnings
from collections.abc import Collection, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.atomic import RecordError, read_json, write_json
from ..utils.checkpoint import CheckpointError, load_checkpoint, previous_path, remove_orphan_temporaries
from .seeding import environment_info

# What ``fit(..., new_schedule=True)`` lets a resumed run change; any other difference is refused.
SCHEDULE_KEYS = ("iterations", "lr", "warmup", "schedule", "min_lr_factor", "checkpoint_every", "log_every",
                 "eval_every")


class RunConfigError(ValueError):
    """A run folder holds a run of another configuration (or is not a liaf_lab run folder)."""


def module_signature(modules: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """What a checkpoint's modules are: class and every state tensor's shape (architecture and width)."""
    return {name: {"class": type(m).__name__,
                   "tensors": {k: list(v.shape) for k, v in m.state_dict().items()}} for name, m in modules.items()}


def run_spec(cfg: Any, modules: dict[str, nn.Module], run_config: dict[str, Any] | None) -> dict[str, Any]:
    """Everything a run folder is bound to: the training options (``cfg``, a dataclass), the caller's resolved
    config, the modules."""
    config = json.loads(json.dumps(run_config or {}, default=str))  # plain JSON types: weights_only loads them
    return {"train": asdict(cfg), "config": config, "modules": module_signature(modules)}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def spec_differences(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved value, new value)`` for every key that differs (module tensors summarised per module)."""
    diffs: dict[str, tuple[Any, Any]] = {}
    for section in ("train", "config"):
        a, b = _flatten(saved.get(section, {})), _flatten(new.get(section, {}))
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<unset>") != b.get(key, "<unset>"):
                diffs[f"{section}.{key}"] = (a.get(key, "<unset>"), b.get(key, "<unset>"))
    old_m, new_m = saved.get("modules", {}), new.get("modules", {})
    for name in sorted(set(old_m) | set(new_m)):
        a, b = old_m.get(name), new_m.get(name)
        if a is None or b is None:
            diffs[f"modules.{name}"] = ("present" if a else "absent", "present" if b else "absent")
        elif a["class"] != b["class"]:
            diffs[f"modules.{name}"] = (a["class"], b["class"])
        elif a["tensors"] != b["tensors"]:
            changed = [k for k in sorted(set(a["tensors"]) | set(b["tensors"]))
                       if a["tensors"].get(k) != b["tensors"].get(k)]
            k = changed[0]
            diffs[f"modules.{name}"] = (f"{len(changed)} tensors differ, e.g. {k} {a['tensors'].get(k)}",
                                        f"{k} {b['tensors'].get(k)}")
    return diffs


def describe_differences(diffs: dict[str, tuple[Any, Any]]) -> str:
    """``"key: old in the folder, new now; ..."`` for the messages that refuse a changed config."""
    return "; ".join(f"{k}: {a!r} in the folder, {b!r} now" for k, (a, b) in diffs.items())


def prepare_run_folder(out: Path) -> None:
    """Create ``out``, check it is writable (before any training) and remove orphan temporary files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_check"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        reason = f"{type(err).__name__}: {err.strerror or err}"
        raise RunConfigError(f"run folder {out} is not writable ({reason})") from None
    removed = remove_orphan_temporaries(out)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary files left in {out} by an interrupted checkpoint write",
                      stacklevel=3)


def read_run_record(path: Path) -> dict[str, Any]:
    """A run folder's previous ``run.json`` (``{}`` when there is none, or, with a warning, when it is damaged:
    the run rewrites it)."""
    if not path.exists():
        return {}
    try:
        return read_json(path, "run record")
    except RecordError as err:
        warnings.warn(f"{err}; it is written again", stacklevel=3)
        return {}


def check_run_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``CheckpointError`` unless ``state`` is a whole ``fit`` checkpoint: its keys, and module tensors of the
    shapes its own spec records (a file damaged inside a valid zip is caught here, not deep in torch)."""
    missing = [k for k in ("modules", "optimizer", "scheduler", "scaler", "iteration", "spec") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a liaf_lab run checkpoint (it lacks {missing}); expected the last.pt "
                              "that fit() writes")
    modules, spec = state["modules"], state["spec"]
    if not isinstance(modules, dict) or not isinstance(spec, dict) or not isinstance(state["iteration"], int) \
            or not all(isinstance(m, dict) for m in modules.values()):
        raise CheckpointError(f"{path} is a damaged run checkpoint (its modules, spec or iteration have the wrong "
                              "type)")
    shapes = {name: {k: list(v.shape) if isinstance(v, Tensor) else type(v).__name__ for k, v in m.items()}
              for name, m in modules.items()}
    recorded = {name: m.get("tensors") for name, m in spec.get("modules", {}).items()}
    if shapes != recorded:
        raise CheckpointError(f"{path} is a damaged run checkpoint (its module tensors do not match the shapes its "
                              "spec records)")


def check_optimizer_state(path: Path, saved: Any, params: list[Tensor]) -> None:
    """``CheckpointError`` unless ``saved`` is an optimiser state of ``params`` (the optimiser's parameters in
    group order, as ``state_dict`` numbers them): its groups name as many
    parameters, and each per-parameter tensor (momentum, moments) has its parameter's shape."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    per_param = saved.get("state") if isinstance(saved, dict) else None
    ids = ([i for g in groups for i in g.get("params", [])]
           if isinstance(groups, list) and all(isinstance(g, dict) for g in groups) else None)
    if ids is None or not isinstance(per_param, dict) or len(ids) != len(params):
        raise CheckpointError(f"{path} is a damaged run checkpoint (its optimizer state does not fit the run's "
                              f"{len(params)} parameters)")
    by_id = dict(zip(ids, params, strict=True))
    for i, entry in per_param.items():
        p = by_id.get(i)
        if p is None or not isinstance(entry, dict) or any(
                isinstance(v, Tensor) and v.dim() > 0 and v.shape != p.shape for v in entry.values()):
            raise CheckpointError(f"{path} is a damaged run checkpoint (its optimizer state of parameter {i} does "
                                  "not match that parameter)")


def load_resume_state(ckpt_path: Path, device: torch.device, params: list[Tensor],
                       modules: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint to resume from: ``last.pt``, or ``last.prev.pt`` when ``last.pt`` is missing or damaged in
    any way (unreadable, not a run checkpoint, inconsistent, or, for a checkpoint of this run's ``modules`` (its
    spec's), an optimiser state of other ``params``; a checkpoint of other modules is refused later, naming the
    config keys that differ)."""
    prev = previous_path(ckpt_path)
    candidates = [p for p in (ckpt_path, prev) if p.exists()]
    for i, path in enumerate(candidates):
        try:
            state = load_checkpoint(path, map_location=device)
            check_run_checkpoint(path, state)
            if state["spec"].get("modules") == modules:
                check_optimizer_state(path, state["optimizer"], params)
        except CheckpointError as err:
            if i + 1 < len(candidates):
                warnings.warn(f"{err}; resuming from the previous checkpoint {candidates[i + 1]}", stacklevel=3)
                continue
            raise CheckpointError(f"{err}; there is no earlier good checkpoint: use another --out, or delete {path} "
                                  "to start the run afresh") from None
        if path != ckpt_path and not ckpt_path.exists():
            warnings.warn(f"{ckpt_path} is missing (a kill between two renames); resuming from {path}", stacklevel=3)
        return state
    return None


def _schedule_key(key: str, spec: dict[str, Any], option_names: Collection[str]) -> bool:
    """Whether the spec key ``key`` (e.g. ``train.lr``, ``config.config.distill.iterations``) is a schedule key:
    one of ``SCHEDULE_KEYS`` in the training options, or in a table of the caller's config that holds only
    training options (``option_names``: a config's training section, which the CLI records whole)."""
    section, _, name = key.rpartition(".")
    if name not in SCHEDULE_KEYS:
        return False
    if section == "train":
        return True
    table: Any = spec
    for part in section.split("."):
        table = table.get(part) if isinstance(table, dict) else None
    return isinstance(table, dict) and set(table) <= set(option_names)


def check_resume(out: Path, saved: dict[str, Any], new: dict[str, Any], new_schedule: bool,
                 option_names: Collection[str], defaults: Mapping[str, Any] | None = None) -> dict[str, tuple]:
    """The differences of a resumed run's spec ``new`` from the folder's ``saved`` one: ``RunConfigError`` naming
    them unless there are none, or only schedule keys differ and ``new_schedule`` allows them. A training option
    the saved spec lacks (added to the package after the run started) is no difference while it is at its
    ``defaults`` value: the run trains as it did."""
    diffs = spec_differences(saved, new)
    for name, value in (defaults or {}).items():
        if diffs.get(f"train.{name}") == ("<unset>", value):
            del diffs[f"train.{name}"]
    refused = {k: v for k, v in diffs.items() if not (new_schedule and _schedule_key(k, new, option_names))}
    if refused:
        listed = describe_differences(refused)
        hint = (" Only the schedule may change with new_schedule (--new-schedule): " + ", ".join(SCHEDULE_KEYS)
                if any(k.removeprefix("train.") in SCHEDULE_KEYS for k in refused) or new_schedule else "")
        raise RunConfigError(f"run folder {out} holds a run of another configuration ({listed}). Use another "
                             f"--out/out_dir for a new run, or the same settings to resume.{hint}")
    return diffs


def record_run(out: Path, desc: str, seed: int, device: torch.device, spec: dict[str, Any],
               changes: list[dict[str, Any]], world_size: int, resumed: bool) -> None:
    """Write ``out/run.json`` (description, seed, environment, spec, schedule changes, world size); warn when a
    resumed run has another thread count than the folder's (the result will then differ from an uninterrupted
    run's)."""
    old = read_run_record(out / "run.json")
    env = environment_info(device)
    if resumed and old.get("environment", {}).get("threads") not in (None, env["threads"]):
        warnings.warn(f"{out} was run with {old['environment']['threads']} threads and resumes with "
                      f"{env['threads']}: the result will not be bit-identical to an uninterrupted run", stacklevel=3)
    write_json(out / "run.json", {"desc": desc, "seed": seed, "environment": env, "spec": spec,
                                  "schedule_changes": changes, "world_size": world_size}, default=str)
