"""Execute every notebook with papermill on the embedded model; any failing cell or assert fails the test.

Each notebook runs through ``python -m qwen2lib workbook`` in a child process (the same path as the README's
workbook command), its log in a file: the kernel then never shares pytest's captured streams. Executed copies
land in ``executed/tests/`` (git-ignored) so a failure can be opened and read.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2lib.workbook import CELL_TIMEOUT_S, ROOT, cell_timeout, notebook_paths

NOTEBOOK_TIMEOUT_S = 3600  # whole notebook, generous for a busy machine; each cell also has the workbook's limit


@pytest.fixture(scope="module", autouse=True)
def embedded_model_built():
    """Build (or find) `tiny` before any notebook runs, with no time limit: on a busy machine its one-time
    training is slow, and no notebook cell should be what waits for it."""
    from qwen2lib.model.tiny import tiny_dir

    tiny_dir(trained=True)


@pytest.mark.notebook
@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs_on_the_embedded_model(path: Path, tmp_path_factory):
    workdir = tmp_path_factory.getbasetemp() / "workbook-run"  # shared: later notebooks reuse earlier stages
    output_dir = ROOT / "executed" / "tests"
    log = tmp_path_factory.mktemp("log") / f"{path.stem}.log"
    cmd = [sys.executable, "-m", "qwen2lib", "workbook", "--only", path.stem, "--output-dir", str(output_dir),
           "-p", "model", "tiny", "-p", "workdir", str(workdir), "-p", "seed", "0"]
    with open(log, "w") as fh:
        result = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                timeout=NOTEBOOK_TIMEOUT_S)
    assert result.returncode == 0, f"{path.name} failed; executed copy in {output_dir}:\n{log.read_text()[-4000:]}"
    assert (output_dir / path.name).is_file()


def test_there_are_notebooks_in_order():
    names = [p.stem.split("_")[0] for p in notebook_paths()]
    assert names == sorted(names) and names[0] == "00"


def test_the_cell_time_limit_holds_on_the_embedded_model_and_not_on_real_sizes():
    assert cell_timeout({}) == cell_timeout({"model": "tiny"}) == CELL_TIMEOUT_S
    assert cell_timeout({"model": "Qwen2.5-1.5B", "weights": "random"}) is None  # hours on a busy machine is no hang
    assert cell_timeout({"model": "Qwen2.5-1.5B"}, 60) == 60
    assert cell_timeout({"model": "tiny"}, 0) is None
