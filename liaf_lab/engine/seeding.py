"""Counter-based randomness: every random draw of a run is a function of ``(seed, what, counters)``.

A run never relies on the state a generator happens to be in. Each module is initialised under
``seeded(seed, name)``; each training sample is loaded and augmented under a seed derived from
``(seed, epoch, dataset index)``; each training step runs with the global generator reseeded from
``(seed, rank, iteration)``. The whole random state of a run at iteration ``i`` is therefore
``(seed, i)``: a checkpoint that stores the iteration restores every random stream (data order,
augmentation on every rank, random masks, CPU and CUDA), and a resumed run draws exactly what an
uninterrupted one would, from any iteration, whatever the number of data-loader workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from collections.abc import Hashable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset


def derive_seed(seed: int, *keys: Hashable) -> int:
    """A 63-bit seed from ``seed`` and ``keys`` (stable across processes, platforms and Python runs)."""
    digest = hashlib.blake2b(repr((int(seed), *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def _manual_seed(seed: int) -> None:
    """``torch.manual_seed(seed)``, without its cost when no accelerator is in use.

    Before CUDA is initialised ``torch.manual_seed`` queues a lazy CUDA seeding with a formatted stack trace
    (about 0.2 ms: a tenth of loading a bench image). A process that has not initialised CUDA seeds the CPU
    generator alone, which is what ``torch.manual_seed`` does to it (the same stream, bit for bit); a process
    that has initialised CUDA (it moved a model there before training) gets every generator seeded.
    """
    if _devices():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int, *keys: Hashable) -> Iterator[None]:
    """Run the block with the global CPU and CUDA generators seeded from ``(seed, *keys)``; restore them after.

    ``with seeded(0, "student"): model = create_detector(...)`` gives the same weights whatever was
    drawn before, so every method's student of one seed starts from the same weights.
    """
    with torch.random.fork_rng(devices=_devices()):
        _manual_seed(derive_seed(seed, *keys))
        yield


def reseed(seed: int, *keys: Hashable) -> None:
    """Seed the global CPU and CUDA generators from ``(seed, *keys)`` (the per-iteration step seed)."""
    _manual_seed(derive_seed(seed, *keys))


class SeededSamples(Dataset):
    """Wraps a dataset so that ``self[(index, seed)]`` loads ``dataset[index]`` under ``seeded(seed)``.

    Random augmentations (torchvision's transforms draw from the global generator) then depend only
    on the seed handed with the index, not on the worker, the rank or the order samples are loaded in.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):  # transforms draw from the CPU generator only
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a run ran on: package versions, device, thread count and CPU kernels (results are bit-exact only for the
    same)."""
    import torchvision

    from ..utils.version import __version__

    device = torch.device(device) if device is not None else torch.device("cpu")
    info: dict[str, Any] = {
        "liaf_lab": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        # the CPU kernels torch dispatches to (e.g. AVX2, AVX512): another set trains other students from one seed
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn_deterministic"] = torch.backends.cudnn.deterministic
    return info
