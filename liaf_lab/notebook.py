"""The notebooks' shared set-up (above the analysis layer: it loads the demo's shipped models): one call gives the shipped tiny models, the class names, a scratch
folder and the display settings, so no notebook copies set-up code."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import torch
from torch import nn

from .experiments.demo import SHIPPED_DIR, load_demo_models
from .utils.paths import PROJECT_ROOT
from .utils.progress import use_text_progress

__all__ = ["NotebookSession", "setup_notebook"]


@dataclass
class NotebookSession:
    """What ``setup_notebook`` gives a notebook.

    Attributes:
        checkpoints: the folder the models came from.
        quick: CI's quick mode (fewer iterations and images).
        run_dir: a fresh temporary folder for the notebook's runs (never inside the repository).
        config: the tiny preset; ``train``/``val``: its datasets.
        teacher: the shipped teacher; ``students``: method -> the shipped student (``none``, ``fitnet``,
            ``liaf``); ``distiller``: the LIAF-KD distiller with its learned selectors and projectors.
        class_names: label ``i`` -> ``class_names[i]`` (``"background"`` first, as torchvision numbers them).
    """

    checkpoints: Path
    quick: bool
    run_dir: Path
    config: dict[str, Any]
    train: Any
    val: Any
    teacher: nn.Module
    distiller: nn.Module
    students: dict[str, nn.Module] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)


def _display_settings(jpeg: bool) -> None:
    matplotlib.rcParams["figure.dpi"] = 80
    torch.set_printoptions(precision=3, sci_mode=False, linewidth=110)
    try:
        from IPython import get_ipython
    except ImportError:  # a plain script
        return
    shell = get_ipython()
    if shell is None:
        return
    shell.run_line_magic("matplotlib", "inline")
    if jpeg:  # photo-like figures: JPEG is about five times smaller than PNG
        shell.run_line_magic("config", 'InlineBackend.figure_formats = ["jpeg"]')
        shell.run_line_magic("config", 'InlineBackend.print_figure_kwargs = '
                                       '{"bbox_inches": "tight", "pil_kwargs": {"quality": 85}}')


def setup_notebook(checkpoints: str | Path | None = None, quick: bool | None = None, *, jpeg: bool = True,
                   prefix: str = "liaf_nb") -> NotebookSession:
    """Load the shipped tiny models and set the notebook up; prints where the models came from and the mode.

    Args:
        checkpoints: the checkpoint folder; ``None``: ``$LIAF_CHECKPOINTS``, else ``data_samples/checkpoints``.
        quick: quick mode; ``None``: ``$LIAF_QUICK == "1"``.
        jpeg: show figures as JPEG (photo-like panels) rather than PNG (charts).
        prefix: the temporary folder's name prefix.

    Also seeds torch's default generator with 0, draws progress bars as text (a committed widget bar
    shows only its first frame without a kernel) and sets matplotlib's inline display (dpi 80).
    """
    folder = Path(checkpoints if checkpoints is not None else os.environ.get("LIAF_CHECKPOINTS", SHIPPED_DIR))
    quick = os.environ.get("LIAF_QUICK") == "1" if quick is None else bool(quick)
    if not (folder / "teacher_tiny.pt").is_file():
        raise FileNotFoundError(f"no checkpoints in {folder}: set LIAF_CHECKPOINTS or see notebooks/README.md")
    _display_settings(jpeg)
    use_text_progress(True)
    torch.manual_seed(0)
    shown = folder.relative_to(PROJECT_ROOT) if folder.is_absolute() and folder.is_relative_to(PROJECT_ROOT) else folder
    print(f"checkpoints: {shown}")
    print(f"quick mode: {quick}")
    models = load_demo_models("tiny", checkpoint_dir=folder)
    val = models["val"]
    return NotebookSession(
        checkpoints=folder, quick=quick, run_dir=Path(tempfile.mkdtemp(prefix=f"{prefix}_")), config=models["config"],
        train=models["train"], val=val, teacher=models["teacher"], distiller=models["distiller"],
        students={m: models[m] for m in ("none", "fitnet", "liaf")}, class_names=["background", *val.class_names],
    )
