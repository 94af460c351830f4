"""ShareGPT sampling rules (vLLM's), the serving metric formulas, and a forced-length run end to end."""
from __future__ import annotations

import json
import random

import pytest
import torch

from qwen2lib.serve.bench import (RequestResult, benchmark, compute_metrics, load_requests, run_requests,
                                  sample_sharegpt_requests, synthetic_requests)


@pytest.fixture(scope="module")
def tokenizer():
    from qwen2lib import load_tokenizer

    return load_tokenizer("tiny-random")


def words(n: int, word: str = "a") -> str:
    """Text of exactly n tokens with the Qwen tokenizer ("a a a" -> 'a', ' a', ' a')."""
    return word + f" {word}" * (n - 1)


def conv(*turns):
    return {"conversations": [{"from": who, "value": text} for who, text in turns]}


# name -> (conversation, survives the filters)
CASES = {
    "ok": (conv(("human", words(10, "x")), ("gpt", words(20)), ("human", words(5))), True),
    "one_turn": (conv(("human", words(10, "y"))), False),
    "prompt_3": (conv(("human", words(3, "p")), ("gpt", words(20))), False),
    "prompt_4": (conv(("human", words(4, "q")), ("gpt", words(20))), True),
    "output_3": (conv(("human", words(10, "r")), ("gpt", words(3))), False),
    "output_4": (conv(("human", words(10, "s")), ("gpt", words(4))), True),
    "prompt_1024": (conv(("human", words(1024, "t")), ("gpt", words(1024))), True),  # total exactly 2048
    "prompt_1025": (conv(("human", words(1025, "u")), ("gpt", words(10))), False),
    "total_2049": (conv(("human", words(1000, "v")), ("gpt", words(1049))), False),
    "system_first": (conv(("system", "be brief"), ("human", words(6, "w")), ("gpt", words(7))), True),
    "no_reply": (conv(("gpt", words(5)), ("human", words(6, "z"))), False),
}


@pytest.fixture
def sharegpt_file(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([c for c, _ in CASES.values()]), encoding="utf-8")
    return path


def test_sharegpt_filters_exactly_like_vllm(sharegpt_file, tokenizer):
    requests = sample_sharegpt_requests(sharegpt_file, tokenizer, num_requests=100, seed=0)
    kept = {r.prompt for r in requests}
    expected = {c["conversations"][1 if n == "system_first" else 0]["value"] for n, (c, ok) in CASES.items() if ok}
    assert kept == expected
    by_prompt = {r.prompt: r for r in requests}
    assert by_prompt[words(10, "x")].output_len == 20  # the first reply, not later turns
    assert by_prompt[words(1024, "t")].prompt_len == 1024 and by_prompt[words(1024, "t")].output_len == 1024
    assert by_prompt[words(6, "w")].output_len == 7


def test_sharegpt_shuffles_with_the_seed_before_capping(sharegpt_file, tokenizer):
    # vLLM drops conversations with < 2 turns, shuffles the (prompt, reply) pairs, then filters in that order
    pairs = [n for n in CASES if n not in ("one_turn", "no_reply")]
    random.Random(5).shuffle(pairs)
    expected = [CASES[n][0]["conversations"][1 if n == "system_first" else 0]["value"] for n in pairs if CASES[n][1]]
    got = [r.prompt for r in sample_sharegpt_requests(sharegpt_file, tokenizer, num_requests=3, seed=5)]
    assert got == expected[:3]
    other = [r.prompt for r in sample_sharegpt_requests(sharegpt_file, tokenizer, num_requests=6, seed=6)]
    assert other != [r.prompt for r in sample_sharegpt_requests(sharegpt_file, tokenizer, num_requests=6, seed=5)]


def test_bad_dataset_files_get_clear_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="ShareGPT"):
        sample_sharegpt_requests(tmp_path / "missing.json", tokenizer, 4)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([conv(("human", "hi"))]))
    with pytest.raises(ValueError, match="no conversation survived"):
        sample_sharegpt_requests(empty, tokenizer, 4)


def test_without_a_file_requests_are_synthetic_seeded_and_in_range(tokenizer):
    a, label = load_requests(None, tokenizer, 20, seed=1)
    b, _ = load_requests(None, tokenizer, 20, seed=1)
    c, _ = load_requests(None, tokenizer, 20, seed=2)
    assert label == "synthetic"
    assert [(r.prompt_ids, r.output_len) for r in a] == [(r.prompt_ids, r.output_len) for r in b]
    assert [r.output_len for r in a] != [r.output_len for r in c]
    assert all(4 <= r.prompt_len <= 1024 and r.output_len >= 4 and r.prompt_len + r.output_len <= 2048 for r in a)


def test_metric_formulas_on_fake_timings():
    results = [
        RequestResult(prompt_len=10, output_len=5, ttft_s=0.1, itl_s=[0.01, 0.02, 0.03, 0.04], e2e_s=0.2),
        RequestResult(prompt_len=20, output_len=3, ttft_s=0.2, itl_s=[0.05, 0.05], e2e_s=0.3),
        RequestResult(prompt_len=30, output_len=1, ttft_s=0.3, itl_s=[], e2e_s=0.3),
        RequestResult(prompt_len=40, output_len=2, ttft_s=0.4, itl_s=[0.1], e2e_s=0.5),
    ]
    m = compute_metrics(results, duration_s=2.0)
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["output_throughput"] == pytest.approx(11 / 2.0)
    assert m["total_token_throughput"] == pytest.approx((100 + 11) / 2.0)
    assert m["ttft_ms"] == pytest.approx({"mean": 250.0, "median": 250.0, "p99": 397.0})
    # TPOT = (E2E - TTFT) / (n - 1), requests with one token left out: 25, 50, 100 ms
    assert m["tpot_ms"] == pytest.approx({"mean": 175 / 3, "median": 50.0, "p99": 50 + 0.98 * 50})
    gaps = sorted([10, 20, 30, 40, 50, 50, 100])
    assert m["itl_ms"]["mean"] == pytest.approx(sum(gaps) / 7) and m["itl_ms"]["median"] == pytest.approx(40.0)
    assert m["itl_ms"]["p99"] == pytest.approx(50 + 0.94 * 50)
    assert m["e2e_ms"] == pytest.approx({"mean": 325.0, "median": 300.0, "p99": 300 + 0.97 * 200})
    assert set(m) >= {"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "request_throughput", "output_throughput",
                      "total_token_throughput"}


class EosBackend:
    """Always predicts the end token: the benchmark must ignore it and generate the forced length."""

    max_positions, vocab_size = 4096, 151936

    def _logits(self, batch):
        logits = torch.zeros(batch, self.vocab_size)
        logits[:, 151643] = 1.0
        return logits

    def prefill(self, ids, attention_mask):
        return self._logits(ids.shape[0]), None

    def decode(self, next_ids, state):
        return self._logits(next_ids.shape[0]), None


@pytest.mark.parametrize("batch_size", [1, 3])
def test_requests_run_to_their_forced_length_ignoring_eos(batch_size):
    requests = synthetic_requests(5, seed=0, mean_prompt=8, mean_output=6)
    results, duration = run_requests(EosBackend(), requests, batch_size, progress=False)
    assert [r.output_len for r in results] == [r.output_len for r in requests]
    assert [r.prompt_len for r in results] == [r.prompt_len for r in requests]
    assert all(len(r.itl_s) == r.output_len - 1 and 0 < r.ttft_s <= r.e2e_s <= duration for r in results)


def test_benchmark_report_has_vllm_key_names_and_the_cli_writes_it(tmp_path, capsys, tokenizer):
    run = benchmark(EosBackend(), synthetic_requests(4, seed=0, mean_prompt=8, mean_output=5), 2, progress=False)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(run[key]) == {"mean", "median", "p99"}
    assert run["dataset"] == "synthetic" and run["completed"] == 4 and len(run["requests"]) == 4

    from qwen2lib.cli import main

    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps([conv(("human", words(6, "k")), ("gpt", words(5))),
                                conv(("human", words(9, "m")), ("gpt", words(4)))]))
    rc = main(["bench", "--model", "tiny-random", "--workdir", str(tmp_path / "run"), "--dataset", str(data),
               "--num-requests", "2", "--batch-size", "2"])
    assert rc == 0
    assert "ttft median ms" in capsys.readouterr().out
    written = list((tmp_path / "run" / "inference").glob("bench-*.json"))
    assert len(written) == 1
    saved = json.loads(written[0].read_text())
    assert saved["dataset"] == "sharegpt.json" and saved["total_output_tokens"] == 9
    assert (tmp_path / "run" / "inference" / f"{written[0].stem}-cdf.png").is_file()
