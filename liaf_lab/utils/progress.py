"""The package's progress bars: tqdm's notebook widget where one can show, or plain text.

A notebook committed with widget bars shows them stuck at their first frame in viewers without
widget state (GitHub, nbviewer), so ``liaf_lab.notebook.setup_notebook`` switches to text bars,
whose last line is the final state.
"""

from __future__ import annotations

from typing import Any

from tqdm import auto, std

_text = False


def use_text_progress(text: bool = True) -> None:
    """Draw every later progress bar as text (``True``) or with ``tqdm.auto`` (``False``, the default)."""
    global _text
    _text = bool(text)


def progress(*args: Any, **kwargs: Any) -> std.tqdm:
    """A tqdm bar (same arguments as ``tqdm.tqdm``) of the kind ``use_text_progress`` chose."""
    return (std.tqdm if _text else auto.tqdm)(*args, **kwargs)
