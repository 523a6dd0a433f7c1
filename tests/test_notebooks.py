"""The analysis notebooks: each runs top to bottom in quick mode on a fresh kernel, and the committed
copies carry the outputs of a full run.

Checkpoints: ``LIAF_CHECKPOINTS`` when set, else ``data_samples/checkpoints`` when it holds the shipped
models, else temporary ones made once per session (``run_demo(quick=True)`` + ``export_checkpoints``).

Run as a script to execute the notebooks in place (full mode, what is committed)::

    .venv/bin/python tests/test_notebooks.py                       # all notebooks
    .venv/bin/python tests/test_notebooks.py notebooks/03_*.ipynb  # some of them
    .venv/bin/python tests/test_notebooks.py --quick --out /tmp/nb # quick mode, copies elsewhere
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from queue import Empty

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
SHIPPED = ROOT / "data_samples" / "checkpoints"
CHECKPOINT_FILES = ("teacher_tiny.pt", "student_none.pt", "student_fitnet.pt", "student_liaf.pt", "liaf_distiller.pt")
MAX_BYTES = 2 * 1024 * 1024
CELL_TIMEOUT = 600


def has_checkpoints(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``LIAF_CHECKPOINTS``, the shipped checkpoints, or temporary ones made once in this session."""
    if os.environ.get("LIAF_CHECKPOINTS"):
        return Path(os.environ["LIAF_CHECKPOINTS"])
    if has_checkpoints(SHIPPED):
        return SHIPPED
    base = tmp_path_factory.getbasetemp()
    dest = base / "liaf_demo_checkpoints"
    if not has_checkpoints(dest):
        from liaf_lab.experiments.demo import export_checkpoints, run_demo

        run_demo(base / "liaf_demo_run", quick=True, teacher_weights=None, device="cpu")
        export_checkpoints(base / "liaf_demo_run", dest)
    return dest


POLL_STEP_S = 1.0


def _short_polls(get_msg):
    """``channel.get_msg`` that waits in steps of at most POLL_STEP_S seconds, same contract otherwise.

    One long ``await socket.poll(timeout)`` on the kernel's shell/iopub sockets sometimes misses the
    kernel's reply (zmq's edge-triggered wake-up; pyzmq only re-checks the socket on a new poll), and
    nbclient then waits for the whole cell timeout, or forever without one: seen here after the
    mask inspector's widget cell in about 1 run in 12 (nbclient) to 1 in 2 (nbconvert without a
    timeout); jupyter/nbclient#312. Polling again every second recovers.
    """

    async def get_msg_in_steps(timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = POLL_STEP_S if deadline is None else min(POLL_STEP_S, max(0.0, deadline - time.monotonic()))
            try:
                return await get_msg(timeout=step)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    return get_msg_in_steps


class _Client(NotebookClient):
    """nbclient's NotebookClient with the kernel channels polled in short steps (see _short_polls)."""

    async def async_start_new_kernel_client(self):
        kc = await super().async_start_new_kernel_client()
        for channel in (kc.shell_channel, kc.iopub_channel):
            channel.get_msg = _short_polls(channel.get_msg)
        return kc


def execute_notebook(nb, checkpoints: Path, quick: bool, cwd: Path):
    """Execute ``nb`` (a NotebookNode, changed in place) on a fresh ``python3`` kernel."""
    env = {k: v for k, v in os.environ.items() if k != "LIAF_QUICK"}
    env["LIAF_CHECKPOINTS"] = str(checkpoints)
    if quick:
        env["LIAF_QUICK"] = "1"
    client = _Client(nb, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=False,
                     resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    if not widget_views(nb):  # widgets made and dropped during the run (e.g. a progress bar): no state to keep
        nb.metadata.pop("widgets", None)
    return nb


def widget_views(nb) -> list:
    return [o for o in outputs(nb) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]


def outputs(nb, output_type: str | None = None) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if output_type is None or o.output_type == output_type]


def images(nb) -> list:
    return [o for o in outputs(nb) if {"image/png", "image/jpeg"} & set(o.get("data", {}))]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint_dir(tmp_path_factory)


def test_the_six_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == [
        "01_training_walkthrough.ipynb", "02_instance_selectors.ipynb", "03_gradcam_attention.ipynb",
        "04_mask_inspector.ipynb", "05_efficiency.ipynb", "06_methods_side_by_side.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path: Path, checkpoints: Path, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # No time limit here (timed asserts fail on a loaded machine); `python tests/test_notebooks.py --quick` prints
    # each notebook's time.
    execute_notebook(nb, checkpoints, quick=True, cwd=tmp_path)  # raises CellExecutionError on any error
    assert not outputs(nb, "error")
    assert images(nb), f"{path.name} showed no figure"
    assert any("quick mode: True" in o.get("text", "") for o in outputs(nb, "stream"))
    assert not list(tmp_path.iterdir()), "notebooks must write only to their own temporary folders"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_full_run_outputs(path: Path):
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path.name} is {size / 2**20:.2f} MiB (limit 2 MiB): lower figure dpi or sizes"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert all(isinstance(n, int) for n in counts), f"{path.name} has cells that were not executed"
    assert counts == list(range(1, len(counts) + 1)), f"{path.name} was not executed top to bottom once"
    assert not outputs(nb, "error"), f"{path.name} holds an error output"
    assert images(nb), f"{path.name} holds no figure"
    stream = "".join(o.get("text", "") for o in outputs(nb, "stream"))
    assert "quick mode: False" in stream, f"{path.name} holds the outputs of a quick run, not a full one"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "LIAF_CHECKPOINTS" in tagged[0].source and "LIAF_QUICK" in tagged[0].source
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    assert widget_views(nb) or not state, f"{path.name} carries the state of {len(state)} widgets it no longer shows"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute the analysis notebooks, writing their outputs.")
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: all of notebooks/")
    parser.add_argument("--quick", action="store_true", help="quick mode (LIAF_QUICK=1); needs --out")
    parser.add_argument("--out", type=Path, help="write the executed copies here instead of in place")
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error("--quick outputs must not be committed: give --out DIR")
    checkpoints = Path(os.environ.get("LIAF_CHECKPOINTS", SHIPPED))
    if not has_checkpoints(checkpoints):
        parser.error(f"{checkpoints} lacks some of {CHECKPOINT_FILES}: set LIAF_CHECKPOINTS")
    for path in args.notebooks or NOTEBOOKS:
        path = path.resolve()
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        execute_notebook(nb, checkpoints, args.quick, cwd=path.parent)
        dest = path if args.out is None else args.out / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, dest)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s, {dest.stat().st_size / 2**20:.2f} MiB -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
