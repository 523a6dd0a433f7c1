"""A frozen teacher's FPN features, computed once per input and shared by the runs of a study.

Every KD student of a seed sees the same batches (``liaf_lab.engine.seeding``: data order and augmentation
are functions of the seed and the iteration), so on the CPU a study of many methods would run the same
frozen teacher on the same inputs once per method, and once more for each two-stage method's stage 1:
about a third of a bench KD run's arithmetic (docs/benchmarks.md). ``TeacherCache`` stores the teacher's
levels on disk under a key computed from the input's bytes, and a run that meets the same input reads them
back instead of recomputing them.

It is exact: an entry holds what the same teacher, code, thread count and CPU kernels compute for that
input, so a run reading it trains bit for bit the student it would have trained without it (tested).
The teacher's state, the package version and backbone code, torch's and torchvision's versions, the
thread count, the CPU kernel set and the device type name the folder, and an autocast dtype a subfolder (a
run under ``amp_cpu``), so a run that differs in any of them never reads another's entries. A missing, truncated or damaged entry is recomputed; entries are
written without ``fsync`` (a cache: the next run recomputes what a crash lost) and replaced atomically,
so concurrent runs may write the same key.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.backbones import fpn_levels
from ..utils.provenance import package_version

#: Free disk space a cache leaves: below it, entries are computed but no longer written.
MIN_FREE_BYTES = 1 << 30


def teacher_fingerprint(teacher: nn.Module, device: torch.device | str = "cpu") -> str:
    """A short hash of the teacher's weights and buffers and of what makes its outputs bit-exact here.

    Equal fingerprints mean equal FPN features for equal inputs: same state, package, backbone code
    (``models/backbones.py``), torch and torchvision versions, thread count, CPU kernel set
    (``torch.backends.cpu.get_cpu_capability``) and device type.
    """
    import torchvision

    from ..models import backbones

    h = hashlib.blake2b(Path(backbones.__file__).read_bytes(), digest_size=10)
    env = (package_version(), torch.__version__, torchvision.__version__, torch.get_num_threads(),
           torch.backends.cpu.get_cpu_capability(), torch.device(device).type)
    h.update(repr(env).encode())
    for name, value in teacher.state_dict().items():
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def input_key(images: Tensor) -> str:
    """A hash of a batched input ``[N, 3, H, W]``: its dtype, shape and bytes."""
    h = hashlib.blake2b(f"{images.dtype}:{tuple(images.shape)}".encode(), digest_size=16)
    h.update(images.detach().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


class TeacherCache:
    """``fpn_levels(teacher.backbone, images)`` read from ``folder`` when a run of the study computed it before.

    Args:
        folder: the cache's folder (a study uses ``<study>/teacher_cache/seed<k>``); entries go into a
            subfolder named by ``teacher_fingerprint``.
        teacher: the frozen teacher whose backbone the cache stands for.
        device: where the features are used (entries are stored on the CPU and moved there).

    ``hits`` and ``misses`` count the batches read and computed.
    """

    def __init__(self, folder: str | Path, teacher: nn.Module, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.folder = Path(folder) / teacher_fingerprint(teacher, self.device)
        self.hits = 0
        self.misses = 0

    def fpn_levels(self, backbone: nn.Module, images: Tensor) -> OrderedDict[str, Tensor]:
        """The teacher's levels for ``images`` ``[N, 3, H, W]`` (``models.backbones.fpn_levels``), from the cache
        when an entry for these exact bytes exists, else computed (under ``no_grad``) and stored."""
        path = self._precision_folder() / f"{input_key(images)}.pt"
        feats = self._read(path, images)
        if feats is not None:
            self.hits += 1
            return feats
        self.misses += 1
        with torch.no_grad():
            feats = fpn_levels(backbone, images)
        self._write(path, feats)
        return feats

    def _precision_folder(self) -> Path:
        """Where entries computed at the present precision go: the folder itself in float32, a subfolder per
        autocast dtype under ``torch.autocast`` (whose features differ), so neither reads the other's."""
        kind = self.device.type
        if not torch.is_autocast_enabled(kind):
            return self.folder
        return self.folder / f"autocast_{str(torch.get_autocast_dtype(kind)).removeprefix('torch.')}"

    def _read(self, path: Path, images: Tensor) -> OrderedDict[str, Tensor] | None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a truncated or damaged entry (torch raises many types): recompute it
            return None
        if (not isinstance(state, dict) or not state
                or not all(isinstance(v, Tensor) and v.dim() == 4 and v.shape[0] == images.shape[0]
                           for v in state.values())):
            return None
        return OrderedDict((k, v.to(self.device)) for k, v in state.items())

    def _write(self, path: Path, feats: OrderedDict[str, Tensor]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fs = os.statvfs(path.parent)
            if fs.f_bavail * fs.f_frsize < MIN_FREE_BYTES:
                return
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save({k: v.detach().cpu() for k, v in feats.items()}, f)
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError:  # a full disk or a vanished folder costs the entry, never the run
            return

    def __repr__(self) -> str:
        return f"TeacherCache({self.folder}, {self.hits} read, {self.misses} computed)"
