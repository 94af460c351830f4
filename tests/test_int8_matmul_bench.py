"""benchmarks/int8_matmul.py: every path timed at every token count, and the printed verdict names the claim."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import int8_matmul  # noqa: E402


def test_matmul_timings_table_has_every_path():
    table = int8_matmul.matmul_timings(64, 96, tokens=(1, 8), repeats=2)
    assert list(table.index) == [1, 8] and (table > 0).all().all()
    assert set(int8_matmul.CLAIM) <= set(table.columns)


def test_the_script_prints_the_table_and_the_verdict(capsys):
    assert int8_matmul.main(["--shape", "64", "96", "--tokens", "1", "4", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "median ms per call" in out and ("holds" in out or "does NOT hold" in out)
