"""Run the workbook headless: every notebook in order with papermill, executed copies in ``executed/``.

    python -m qwen2lib workbook [-p NAME VALUE ...] [--only 03] [--output-dir executed]

The kernel is named explicitly, and on the embedded model every cell has a time limit, so a stuck kernel fails
the run instead of hanging it (a killed one fails it at once). A real size has none unless ``--cell-timeout`` sets
one: at 1.5B notebook 03's four quantize stages alone take longer than the embedded model's limit on a busy machine.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import papermill
from papermill.clientwrap import PapermillNotebookClient

from .model.tiny import tiny_dir

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"  # ipykernel's own spec: the interpreter of the environment running papermill
CELL_TIMEOUT_S = 900  # per cell, on the embedded model


def cell_timeout(parameters: dict, asked: int | None = None) -> int | None:
    """Seconds a cell may run: ``asked`` (0: no limit); else ``CELL_TIMEOUT_S`` on ``tiny``, none on other models."""
    if asked is not None:
        return asked or None
    return CELL_TIMEOUT_S if str(parameters.get("model", "tiny")) == "tiny" else None


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def _no_output_widget_capture() -> None:
    """Headless runs do not emulate the Output widget.

    nbclient answers an Output widget (``interact`` makes one) by sending comm messages on the shell channel
    while it waits for the cell's reply on that same channel; now and then the reply is then never seen and
    the cell "runs" until its time limit (nbclient issue #312). Without that emulation the function's output
    lands in the cell's outputs as any other, and the widgets' state is still saved with the notebook.
    """
    PapermillNotebookClient.on_comm_open_jupyter_widget = lambda self, msg: None


def run_notebook(path: Path, output: Path, parameters: dict, timeout_s: int | None = CELL_TIMEOUT_S) -> Path:
    """Execute one notebook; raises papermill's PapermillExecutionError naming the failing cell."""
    _no_output_widget_capture()

    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(path),
        str(output),
        parameters=parameters,
        kernel_name=KERNEL,
        execution_timeout=timeout_s,
        cwd=str(ROOT),
        progress_bar=False,
        log_output=False,
    )
    return output


def run_workbook(parameters: dict, only: tuple[str, ...] = (), output_dir: Path = ROOT / "executed",
                 cell_timeout_s: int | None = None) -> int:
    """Run the notebooks (those whose name starts with one of ``only``, else all) in order; 0 when all pass, 1 at
    the first failure (its executed copy kept), 2 when nothing matched. ``cell_timeout_s`` as ``cell_timeout``'s."""
    paths = [p for p in notebook_paths() if not only or any(p.name.startswith(o) for o in only)]
    if not paths:
        print("no notebooks matched", file=sys.stderr)
        return 2
    if str(parameters.get("model", "tiny")) == "tiny":
        # the embedded model is expanded from the shipped file on first use (seconds): here, before any cell's limit
        print("[workbook] the embedded model 'tiny' ...", flush=True)
        print(f"[workbook] tiny: {tiny_dir(trained=True)}", flush=True)
    for path in paths:
        start = time.perf_counter()
        output = Path(output_dir) / path.name
        print(f"[workbook] {path.name} ...", flush=True)
        try:
            run_notebook(path, output, parameters, cell_timeout(parameters, cell_timeout_s))
        except Exception as exc:  # papermill's error names the cell and the traceback
            print(f"[workbook] {path.name} FAILED after {time.perf_counter() - start:.0f} s: {exc}", file=sys.stderr)
            print(f"[workbook] the executed copy with the error is {output}", file=sys.stderr)
            return 1
        print(f"[workbook] {path.name} ok in {time.perf_counter() - start:.0f} s -> {output}", flush=True)
    return 0
