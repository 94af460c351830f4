"""The pure helpers of benchmarks/long_context.py (tables, targets, llama.cpp's output): nothing is timed here."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
bench = pytest.importorskip("long_context")

CONFIG = {"num_hidden_layers": 2, "num_key_value_heads": 2, "num_attention_heads": 4, "hidden_size": 64,
          "max_position_embeddings": 4096}  # 2 x 2 layers x 2 heads x 16 dims = 128 values per token


def rows(prefill, step_ms, kv_mb, held_mb=0.0, peak_mb=0.0):
    return {"prefill tok/s": prefill, "decode ms": step_ms, "KV MB": kv_mb, "held MB": held_mb, "peak MB": peak_mb}


def test_speed_ratios_are_against_llamacpp_at_the_same_length_and_targets_name_the_verdict():
    best = {"graph int8": {2048: rows(300.0, 20.0, 0), 4096: rows(200.0, 25.0, 0), 8192: rows(100.0, 40.0, 0)},
            bench.REFERENCE: {2048: rows(150.0, 25.0, 0), 4096: rows(250.0, 20.0, 0), 8192: rows(100.0, 40.0, 0)}}
    table = bench.speed_table(best, [2048, 4096, 8192])
    assert table.loc["graph int8", "prefill 2048 x ref"] == pytest.approx(2.0)
    assert table.loc["graph int8", "decode @2048 x ref"] == pytest.approx(1.25)  # 25 ms against 20 ms: faster
    assert table.loc["graph int8", "decode @4096 x ref"] == pytest.approx(0.8)
    lines = bench.check_targets(table)
    assert lines == ["graph int8 prefill of 4096 tokens = 0.80x llama.cpp Q8_0 (target >= 1.0x): FAIL",
                     "graph int8 decode at 2048 tokens = 1.25x llama.cpp Q8_0 (target >= 1.0x): PASS",
                     "graph int8 decode at 8192 tokens = 1.00x llama.cpp Q8_0 (target >= 1.0x): PASS"]
    alone = bench.speed_table({"graph int8": best["graph int8"]}, [2048, 4096, 8192])
    assert math.isnan(alone.loc["graph int8", "prefill 4096 x ref"]) and bench.check_targets(alone) == []


def test_kv_check_compares_growth_with_notebook_00s_formula_in_each_kv_dtype():
    per_token = 2 * 2 * 2 * 16  # K and V x layers x kv heads x head_dim
    grown = 1000 * per_token * 4 / 1e6  # 1,000 more tokens in float32
    last = {"graph int8": {1000: rows(0, 0, 1.0, 5.0), 2000: rows(0, 0, 1.0 + 2 * grown, 5.0 + 3 * grown)},
            bench.REFERENCE: {1000: rows(0, 0, math.nan, math.nan, 10.0), 2000: rows(0, 0, math.nan, math.nan, 10.0 + grown / 2)}}
    check = bench.kv_check(last, [1000, 2000], CONFIG)
    assert check.loc["graph int8", "formula MB"] == pytest.approx(grown)
    assert check.loc["graph int8", "KV / formula"] == pytest.approx(2.0)  # spare capacity shows as 2x
    assert check.loc["graph int8", "held / formula"] == pytest.approx(3.0)
    assert check.loc[bench.REFERENCE, "KV dtype"] == "float16"
    assert check.loc[bench.REFERENCE, "peak / formula"] == pytest.approx(1.0)


def test_batched_bench_jsonl_row_and_positions_for_the_longest_run():
    text = "llama_context: n_ctx = 8224\n" + json.dumps({"pl": 1, "speed_pp": 512.5, "speed_tg": 40.0}) + "\nmain: done"
    assert bench.parse_batched_bench(text)["speed_tg"] == 40.0
    with pytest.raises(ValueError):
        bench.parse_batched_bench("error: failed to load model")
    assert bench.graph_overrides(CONFIG, [2048, 8192], 32)["graph.max_sequence_length"] == 16384  # past 4096
    assert bench.graph_overrides({**CONFIG, "max_position_embeddings": 32768}, [8192], 32)["graph.max_sequence_length"] == 32768
