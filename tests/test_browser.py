"""The workbook in a real browser: JupyterLab as ``python3 tasks.py lab`` starts it, driven by headless Chromium (the
Debian package, through Playwright's Python API). Notebook 00 is opened, "Run All Cells" is clicked, and then: no cell
failed, every code cell ran, and the KV-cache widget renders and reacts to its slider. The screenshot is kept with
the executed notebooks (``executed/browser/``).

A missing browser is a failure, not a skip: ``python3 tasks.py test`` installs it (``apt-get install chromium``).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import urllib.request

import pytest

from qwen2lib.cli import lab
from qwen2lib.model.tiny import tiny_dir

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "00_architecture.ipynb"
SHOTS = ROOT / "executed" / "browser"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
RUN_TIMEOUT_S = 3600  # a busy 2-core machine is normal: the limit is for a hang, not for slowness


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no chromium on PATH: install the Debian package (`apt-get install chromium`; tasks.py test does)"
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """JupyterLab serving a copy of notebooks/ (its autosaves must not touch the tracked notebooks)."""
    tiny_dir(trained=True)  # built outside the browser's wait, as the notebook tests do
    home = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", home / "notebooks")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR"):
            mp.setenv(name, str(home / name.lower()))
        log = open(home / "lab.log", "wb")
        proc, port, token = lab.start(log=log, root_dir=home)
    yield f"http://127.0.0.1:{port}", token, home
    lab.stop(proc)
    log.close()


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(poll_s)


def run_all_cells(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def kernel_idle(page) -> bool:
    return page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count() > 0


def kernel_session(served) -> dict | None:
    """The notebook's kernel as the server reports it (the page's indicator also reads "Idle" before one starts)."""
    url, token, _ = served
    sessions = json.loads(NO_PROXY.open(f"{url}/api/sessions?token={token}", timeout=60).read())
    return next((s["kernel"] for s in sessions if s["path"].endswith(NOTEBOOK) and s.get("kernel")), None)


def kernel_started(page, served) -> bool:
    """True once the server runs an idle kernel for the notebook; accepts JupyterLab's kernel dialog if it asks."""
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    if dialog.count():
        dialog.locator("button", has_text="Select").click()
    kernel = kernel_session(served)
    return bool(kernel) and kernel.get("execution_state") == "idle"


def widget_table_text(page) -> str:
    return page.locator("table.kv-cache-table").first.inner_text()


def test_notebook_00_runs_all_cells_in_jupyterlab_and_its_widget_reacts(served):
    from playwright.sync_api import sync_playwright

    url, token, home = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        try:
            page.goto(f"{url}/lab/tree/notebooks/{NOTEBOOK}?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=300_000)
            wait_until(lambda: kernel_started(page, served), 600, "the kernel to start")
            run_all_cells(page)
            wait_until(lambda: page.locator(".jp-InputPrompt", has_text="[*]").count() > 0 or not kernel_idle(page),
                       120, "the run to start")
            wait_until(lambda: kernel_idle(page) and page.locator(".jp-InputPrompt", has_text="[*]").count() == 0,
                       RUN_TIMEOUT_S, "every cell to finish", poll_s=5)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] "
                                  ":text-matches('Traceback|Error', 'i')")
            page.keyboard.press("Control+s")
            time.sleep(3)
            page.screenshot(path=str(SHOTS / "00_architecture.png"), full_page=False)

            saved = json.loads((home / "notebooks" / NOTEBOOK).read_text())
            code = [c for c in saved["cells"] if c["cell_type"] == "code"]
            failed = [o.get("ename") for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
            assert not failed, f"cells failed in JupyterLab: {failed}"
            assert errors.count() == 0, errors.first.inner_text()
            not_run = [i for i, c in enumerate(code) if c.get("execution_count") is None]
            assert not not_run, f"code cells {not_run} of {len(code)} never ran after Run All Cells"

            slider = page.locator(".widget-slider").nth(1)  # the batch slider of the KV-cache widget
            slider.scroll_into_view_if_needed()
            wait_until(lambda: page.locator("table.kv-cache-table").count() > 0, 300, "the widget's table")
            before = widget_table_text(page)
            slider.locator(".noUi-handle, .ui-slider-handle, [role='slider']").first.focus()
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            wait_until(lambda: widget_table_text(page) != before, 300, "the widget to redraw for batch 4")
            page.screenshot(path=str(SHOTS / "00_architecture_widget.png"), full_page=False)
        finally:
            page.screenshot(path=str(SHOTS / "00_architecture_last.png"))
            browser.close()
