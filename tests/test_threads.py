"""The workbook's thread count: the cores other processes leave free, or $QWEN2LIB_THREADS."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen2lib.model import threads
from qwen2lib.model.threads import THREADS_VARIABLE, free_threads, threads_from_environment


@pytest.mark.parametrize("cores, load, expected", [
    (2, 0.0, 2),    # idle: every core
    (2, 0.3, 2),    # a little background work does not cost a thread
    (2, 1.0, 1),    # one busy core left to its process
    (2, 2.0, 1),    # both busy: still one thread, never none
    (2, 9.0, 1),    # far more runnable threads than cores
    (16, 3.4, 13),  # 12.6 cores free
    (16, 3.6, 12),  # a core more than half busy is the other process's
    (1, 0.0, 1),
    (4, -0.5, 4),   # a negative estimate is no load, and never more threads than cores
])
def test_free_threads_from_cores_and_load(cores, load, expected):
    assert free_threads(cores, load) == expected


def test_the_environment_variable_overrides_and_bad_values_are_named():
    assert threads_from_environment(None) is None and threads_from_environment("") is None
    assert threads_from_environment("auto") is None and threads_from_environment(" AUTO ") is None
    assert threads_from_environment("3") == 3
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ValueError, match=THREADS_VARIABLE):
            threads_from_environment(bad)


def test_workbook_threads_reads_the_variable_once(monkeypatch):
    threads.workbook_threads.cache_clear()
    previous = torch.get_num_threads()
    try:
        monkeypatch.setenv(THREADS_VARIABLE, "1")
        assert threads.apply_workbook_threads() == 1 == torch.get_num_threads()
        monkeypatch.setenv(THREADS_VARIABLE, "3")
        assert threads.workbook_threads() == 1, "decided once per process"
        threads.workbook_threads.cache_clear()
        monkeypatch.setenv(THREADS_VARIABLE, "auto")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert 1 <= threads.workbook_threads() <= threads.usable_cores()
    finally:
        threads.workbook_threads.cache_clear()
        torch.set_num_threads(previous)


def test_the_measured_load_is_a_share_of_our_cores():
    cores = threads.usable_cores()
    assert cores >= 1 and threads.others_load(cores) >= 0.0


def test_importing_qwen2lib_sets_torch_and_onnxruntime_to_the_count():
    code = ("import qwen2lib, torch; from qwen2lib.compile.runtime import session_options as o; "
            "print(torch.get_num_threads(), o().intra_op_num_threads, o(5).intra_op_num_threads)")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {THREADS_VARIABLE: "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1", "5"]
    env[THREADS_VARIABLE] = "none"
    done = subprocess.run([sys.executable, "-c", "import qwen2lib"], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert done.returncode != 0 and f"{THREADS_VARIABLE}='none'" in done.stderr
