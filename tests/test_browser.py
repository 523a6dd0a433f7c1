"""The mask inspector in a real browser: JupyterLab + headless Chromium driven by Playwright.

A copy of ``notebooks/04_mask_inspector.ipynb`` (outputs cleared) runs in a JupyterLab server started
on 127.0.0.1 in a temporary folder, in quick mode. The test runs all cells from the Run menu, waits
for the widget's figure (an <img> in the widget's output area), checks that it shows the teacher's and
the student's masks side by side (the panel titles in the image's ``alt`` text, a hover region per box
on each mask panel) and the per-instance table (one row per box), then changes the FPN level in the
dropdown and moves the image slider with the keyboard, and checks that the figure is redrawn each
time; finally it selects FGD in the method dropdown (its maps replace the masks, the score controls
hide) and FitNet (a message instead of the figure).

Needs ``jupyterlab`` and ``playwright`` (pip) and Debian's ``chromium`` at /usr/bin/chromium
(Playwright's own browser download is not used). Without them the test is skipped, unless
``LIAF_REQUIRE_BROWSER=1``, which turns the skip into a failure (CI sets it).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

from test_notebooks import NOTEBOOK_DIR, checkpoint_dir

CHROMIUM = Path(os.environ.get("LIAF_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
NOTEBOOK = "04_mask_inspector.ipynb"
WIDGET_IMG = ".widget-output img"
TABLE_ROWS = ".widget-output table.liaf-instances tbody tr"
HOVER_BOXES = ".widget-output .liaf-box"
SERVER_START_S = 60
RUN_ALL_S = 150
REDRAW_S = 30


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` unless LIAF_REQUIRE_BROWSER=1, which makes it a failure."""
    if condition:
        return
    if os.environ.get("LIAF_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (LIAF_REQUIRE_BROWSER=1 requires the browser test to run)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"JupyterLab did not answer within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and its kernels (its own process group, started by this test)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@pytest.fixture()
def lab(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A JupyterLab server on 127.0.0.1 serving a clean copy of the mask-inspector notebook."""
    require(importlib.util.find_spec("playwright") is not None, "playwright is not installed (pip install playwright)")
    require(importlib.util.find_spec("jupyterlab") is not None, "jupyterlab is not installed (pip install jupyterlab)")
    require(CHROMIUM.is_file(), f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    checkpoints = checkpoint_dir(tmp_path_factory)

    work = tmp_path / "lab"
    work.mkdir()
    nb = nbformat.read(NOTEBOOK_DIR / NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, work / NOTEBOOK)

    port, token = free_port(), secrets.token_hex(16)
    jupyter = tmp_path / "jupyter"
    env = {**os.environ, "LIAF_CHECKPOINTS": str(checkpoints), "LIAF_QUICK": "1",
           "JUPYTER_CONFIG_DIR": str(jupyter / "config"), "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(jupyter / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(jupyter / "workspaces"),
           "IPYTHONDIR": str(jupyter / "ipython")}
    log = tmp_path / "jupyterlab.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.extension_manager=readonly"],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_server(proc, f"{base}/api/status?token={token}", log)
        yield {"url": f"{base}/lab/tree/{NOTEBOOK}?token={token}", "log": log, "shots": tmp_path}
    finally:
        stop(proc)


def test_mask_inspector_redraws_in_jupyterlab(lab):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    start = time.perf_counter()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)

        def fail(message: str) -> None:
            shot = lab["shots"] / "failure.png"
            page.screenshot(path=str(shot), full_page=True)
            pytest.fail(f"{message} (screenshot {shot}, server log {lab['log']})")

        try:
            page.goto(lab["url"], wait_until="domcontentloaded")
            page.wait_for_selector(".jp-NotebookPanel .jp-Notebook", timeout=60_000)
            try:  # JupyterLab may ask for the kernel of a notebook that never ran: take the proposed one
                dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
                dialog.wait_for(state="visible", timeout=15_000)
                dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
            except PlaywrightError:
                pass
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)

            page.click(".lm-MenuBar-itemLabel:text-is('Run')")
            page.click(".lm-Menu-item:has(.lm-Menu-itemLabel:text-is('Run All Cells'))")
            try:  # every code cell ran: its prompt shows a number, not [ ] or [*] (run-all stops at an error)
                page.wait_for_function(
                    """() => {
                        const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
                        return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
                    }""", timeout=RUN_ALL_S * 1000)
            except PlaywrightError:
                fail(f"not every cell ran within {RUN_ALL_S} s (an error stops Run All)")

            image = page.locator(WIDGET_IMG).first
            image.wait_for(state="visible", timeout=REDRAW_S * 1000)
            before = image.get_attribute("src")
            assert before and before.startswith("data:image/"), f"the widget shows no figure: {before!r:.80}"
            assert image.evaluate("img => img.naturalWidth > 0 && img.complete"), "the widget's figure did not load"
            # LIAF-KD: teacher and student masks side by side, one table row and two hover regions per box
            alt = image.get_attribute("alt")
            assert "M (teacher)" in alt and "M (student)" in alt, f"not both mask panels: {alt!r}"
            rows = page.locator(TABLE_ROWS).count()
            assert rows > 0 and page.locator(HOVER_BOXES).count() == 2 * rows
            assert page.locator(f"{TABLE_ROWS}[title]").count() == rows, "table rows without hover values"
            header = page.locator(".widget-output table.liaf-instances thead").text_content()
            assert all(col in header for col in ("class", "A^T", "A^S", "M^T", "M^S", "contribution")), header
            widget = page.locator(".widget-vbox", has=page.locator(".widget-output")).first
            widget.scroll_into_view_if_needed()
            widget.screenshot(path=str(lab["shots"] / "before.png"))

            def wait_redraw(old: str, what: str) -> str:
                try:
                    page.wait_for_function(
                        """([sel, old]) => { const img = document.querySelector(sel);
                                             return img && img.complete && img.naturalWidth > 0 && img.src !== old; }""",
                        arg=[WIDGET_IMG, old], timeout=REDRAW_S * 1000)
                except PlaywrightError:
                    fail(f"the figure did not change after {what}")
                return page.locator(WIDGET_IMG).first.get_attribute("src")

            # 1. another FPN level in the dropdown
            level = page.locator(".widget-dropdown", has=page.locator("label", has_text="level")).locator("select")
            current = level.evaluate("s => s.options[s.selectedIndex].text")
            options = level.locator("option").all_inner_texts()
            other = next(o for o in options if o != current)
            level.select_option(label=other)
            after_level = wait_redraw(before, f"selecting level {other!r} (was {current!r})")
            widget.screenshot(path=str(lab["shots"] / "after_level.png"))

            # 2. the image slider, moved with the keyboard
            handle = page.locator(".widget-slider", has=page.locator("label", has_text="image")).locator(".noUi-handle")
            handle.focus()
            moved = "ArrowLeft" if handle.get_attribute("aria-valuenow") not in (None, "0", "0.0") else "ArrowRight"
            page.keyboard.press(moved)
            after_slider = wait_redraw(after_level, f"pressing {moved} on the image slider")
            widget.screenshot(path=str(lab["shots"] / "after_slider.png"))

            # 3. another method: FGD's maps (no instance scores), then FitNet's message
            method = page.locator(".widget-dropdown", has=page.locator("label", has_text="method")).locator("select")
            selector = page.locator(".widget-dropdown", has=page.locator("label", has_text="selector"))
            assert selector.is_visible(), "LIAF-KD's selector dropdown is hidden"
            method.select_option(label="FGD")
            wait_redraw(after_slider, "selecting the method FGD")
            try:
                page.wait_for_function(
                    """() => { const head = document.querySelector('.widget-output table.liaf-instances thead');
                               return head && head.textContent.includes('spatial attention (teacher)'); }""",
                    timeout=REDRAW_S * 1000)
            except PlaywrightError:
                fail("the table did not switch to FGD's maps")
            assert "A^T" not in page.locator(".widget-output table.liaf-instances thead").text_content()
            assert "spatial attention (student)" in page.locator(WIDGET_IMG).first.get_attribute("alt")
            selector.wait_for(state="hidden", timeout=REDRAW_S * 1000)
            widget.screenshot(path=str(lab["shots"] / "after_fgd.png"))
            method.select_option(label="FitNet")
            try:
                page.locator(".widget-output .liaf-message", has_text="weights every cell alike").wait_for(
                    timeout=REDRAW_S * 1000)
            except PlaywrightError:
                fail("selecting FitNet did not show its message")
            assert page.locator(WIDGET_IMG).count() == 0, "FitNet still shows a figure"
            widget.screenshot(path=str(lab["shots"] / "after_fitnet.png"))
        finally:
            browser.close()
    assert time.perf_counter() - start < 120, "the browser test took more than 2 minutes"
