"""Fail early, and clearly, when torchvision's compiled ops cannot load.

A torchvision wheel only works with the torch build it was compiled against. With a mismatched pair
``import torchvision`` dies inside torch with ``operator torchvision::nms does not exist``; liaf_lab
turns that into an error that says what is wrong and how to fix it.
"""

from __future__ import annotations

from importlib import metadata

_FIX = (
    "torchvision's compiled ops (nms, roi_align) did not load: torch {torch} and torchvision {tv} "
    "are not a matching pair ({err}). Install a matching pair from the same index, for example\n"
    "    pip install --isolated torch==2.13.0 torchvision==0.28.0\n"
    "(`--isolated` skips a local pip config that points at a CPU-only torch wheel), or run "
    "`make install`, which does this in .venv."
)


class TorchvisionOpsError(ImportError):
    """torch and torchvision are installed but torchvision's C++ ops cannot be used."""


def check_torchvision_ops() -> None:
    """Import torchvision and run ``nms`` and ``roi_align`` once; raise ``TorchvisionOpsError`` if not."""
    import torch

    try:
        from torchvision.ops import nms, roi_align

        boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]])
        nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
        roi_align(torch.zeros(1, 1, 4, 4), [boxes[:1]], output_size=(2, 2))
    except (RuntimeError, OSError, ImportError, AttributeError) as err:
        try:
            tv_version = metadata.version("torchvision")
        except metadata.PackageNotFoundError:
            tv_version = "(not installed)"
        raise TorchvisionOpsError(
            _FIX.format(torch=torch.__version__, tv=tv_version, err=str(err).splitlines()[0])
        ) from err
