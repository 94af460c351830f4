"""Execute every notebook with papermill on the embedded model; any failing cell or assert fails the test.

Executed copies land in ``executed/tests/`` (git-ignored) so a failure can be opened and read.
"""
from pathlib import Path

import pytest

from qwen2lib.workbook import ROOT, notebook_paths, run_notebook

NOTEBOOK_TIMEOUT_S = 900  # per cell: a hung or OOM-killed kernel fails instead of hanging CI


@pytest.mark.notebook
@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs_on_the_embedded_model(path: Path, tmp_path_factory):
    workdir = tmp_path_factory.getbasetemp() / "workbook-run"  # shared: later notebooks reuse earlier stages
    output = ROOT / "executed" / "tests" / path.name
    run_notebook(path, output, {"model": "tiny", "workdir": str(workdir), "seed": 0}, cell_timeout=NOTEBOOK_TIMEOUT_S)
    assert output.is_file()


def test_there_are_six_notebooks_in_order():
    names = [p.stem.split("_")[0] for p in notebook_paths()]
    assert names == sorted(names) and names[0] == "00"
