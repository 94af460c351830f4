"""C-Eval scoring (OpenCompass PPL mode) with rigged logits, and strided perplexity against a direct computation."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM

from conftest import tiny_hf_config
from qwen2lib.evaluate import (
    ceval_context,
    continuation_ce,
    evaluate_ceval,
    score_question,
    strided_perplexity,
    write_builtin_mc_set,
)

VOCAB = 151936


@pytest.fixture(scope="module")
def tokenizer():
    from qwen2lib import load_tokenizer

    return load_tokenizer("tiny-random")


def write_subject(folder, subject, dev, val):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("dev", dev), ("val", val)):
        with open(folder / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
            for i, (q, answer) in enumerate(rows):
                writer.writerow([i, q, "甲", "乙", "丙", "丁", answer, ""])


@pytest.fixture
def ceval_dir(tmp_path):
    dev = [(f"示例题{i}", "ABCDA"[i]) for i in range(5)]
    write_subject(tmp_path / "ceval", "computer_network", dev, [("问题一", "B"), ("问题二", "B"), ("问题三", "C"), ("问题四", "D")])
    write_subject(tmp_path / "ceval", "logic", dev, [("问题五", "B"), ("问题六", "A")])
    return tmp_path / "ceval"


def letter_ids(tokenizer):
    """The token that carries each answer letter after the newline ("\\nA" -> ..., 'A')."""
    return {c: tokenizer.encode("答案: \n" + c)[-1] for c in "ABCD"}


def favouring(tokenizer, pick):
    """A fake model: uniform logits except the answer letters at the last position, set by ``pick(text)``."""

    def logits_fn(ids):
        logits = torch.zeros(ids.shape[0], ids.shape[1], VOCAB)
        for row in range(ids.shape[0]):
            preferred = pick(tokenizer.decode(ids[row]))
            for letter, token in letter_ids(tokenizer).items():
                logits[row, -1, token] = 5.0 if letter == preferred else 1.0
        return logits

    return logits_fn


def test_prompt_is_the_opencompass_ceval_text():
    shot = {"question": "1+1=?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}
    row = {"question": "2+2=?", "A": "4", "B": "5", "C": "6", "D": "7", "answer": "A"}
    head = "以下是中国关于逻辑学考试的单项选择题，请选出其中的正确答案。\n"
    assert ceval_context("逻辑学", [shot], row) == (
        f"{head}1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案: \nB\n{head}2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案: "
    )


def test_scoring_picks_the_lowest_cross_entropy_and_reports_it(tokenizer):
    ids = letter_ids(tokenizer)
    bias = {"A": 1.0, "B": 3.0, "C": 2.0, "D": 0.0}

    def logits_fn(x):
        logits = torch.zeros(x.shape[0], x.shape[1], VOCAB)
        for letter, value in bias.items():
            logits[:, -1, ids[letter]] = value
        return logits

    context = ceval_context("逻辑学", [], {"question": "q", "A": "a", "B": "b", "C": "c", "D": "d"})
    scored = score_question(logits_fn, tokenizer, context)
    assert scored["prediction"] == "B"
    # the continuation is " \n" (uniform logits: log V) then the letter
    logz = torch.logsumexp(torch.tensor([0.0] * (VOCAB - 4) + list(bias.values())), 0)
    expected = [(math.log(VOCAB) + float(logz - bias[c])) / 2 for c in "ABCD"]
    assert scored["ce"] == pytest.approx(expected, rel=1e-5)


def test_multi_token_candidates_are_scored_by_mean_continuation_ce():
    torch.manual_seed(0)
    table = torch.randn(50, 50)  # a bigram "model": logits depend on the previous token

    def logits_fn(x):
        return table[x]

    context = [3, 4, 5]
    candidates = [context + [7], context + [8, 9], context + [10, 11, 12]]
    got = continuation_ce(logits_fn, context, candidates)
    logp = F.log_softmax(table, -1)
    expected = [float(-logp[5, 7]), float(-(logp[5, 8] + logp[8, 9]) / 2),
                float(-(logp[5, 10] + logp[10, 11] + logp[11, 12]) / 3)]
    assert got == pytest.approx(expected, rel=1e-6)


def test_accuracy_per_subject_and_overall(ceval_dir, tokenizer):
    always_b = evaluate_ceval(favouring(tokenizer, lambda text: "B"), tokenizer, ceval_dir, progress=False)
    assert always_b["subjects"]["computer_network"] == {"accuracy": 0.5, "correct": 2, "total": 4}
    assert always_b["subjects"]["logic"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert always_b["overall_accuracy"] == pytest.approx(3 / 6)
    assert always_b["average_accuracy"] == pytest.approx(0.5)
    assert always_b["dataset"] == "C-Eval (val)" and always_b["shots"] == 5

    gold = {"问题一": "B", "问题二": "B", "问题三": "C", "问题四": "D", "问题五": "B", "问题六": "A"}

    def oracle(text):  # reads the last question of the prompt and favours its answer
        return gold[text.rsplit("正确答案。\n", 1)[1].split("\n")[0]]

    perfect = evaluate_ceval(favouring(tokenizer, oracle), tokenizer, ceval_dir, subjects=["logic"], progress=False)
    assert perfect["subjects"] == {"logic": {"accuracy": 1.0, "correct": 2, "total": 2}}
    # every prompt carries the 5 dev examples with their answers, in OpenCompass's layout
    assert perfect["predictions"][0]["prediction"] == "B"


def test_missing_files_get_clear_errors(ceval_dir, tokenizer, tmp_path):
    fn = favouring(tokenizer, lambda text: "A")
    with pytest.raises(FileNotFoundError, match="no \\{subject\\}_val.csv for history"):
        evaluate_ceval(fn, tokenizer, ceval_dir, subjects=["history"], progress=False)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        evaluate_ceval(fn, tokenizer, tmp_path / "nowhere", progress=False)


def test_builtin_set_is_labelled_not_ceval_and_loads(tmp_path, tokenizer):
    folder = write_builtin_mc_set(tmp_path / "mc", n_val=3)
    result = evaluate_ceval(favouring(tokenizer, lambda text: "A"), tokenizer, folder, progress=False)
    assert result["dataset"].startswith("not C-Eval")
    assert all(s.startswith("not_ceval_") for s in result["subjects"]) and result["questions"] == 9
    names = json.loads((folder / "subject_mapping.json").read_text(encoding="utf-8"))
    assert all("not C-Eval" in v[0] for v in names.values())


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_hf_config()).eval()
    return lambda ids: model(input_ids=ids).logits


def test_strided_ppl_with_stride_equal_to_window_is_the_chunked_direct_computation(lm):
    ids = torch.randint(0, 320, (100,), generator=torch.Generator().manual_seed(1))
    got = strided_perplexity(lm, ids, max_length=32, stride=32)
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, 100, 32):
            chunk = ids[start:start + 32]
            logits = lm(chunk[None])[0]
            nll += float(F.cross_entropy(logits[:-1], chunk[1:], reduction="sum"))
            n += len(chunk) - 1
    assert got["tokens_scored"] == n == 100 - 4 and got["windows"] == 4
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_strided_ppl_scores_every_token_once_and_one_window_is_the_full_forward(lm):
    ids = torch.randint(0, 320, (90,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = float(F.cross_entropy(lm(ids[None])[0][:-1], ids[1:]))
    assert strided_perplexity(lm, ids, max_length=128, stride=64)["nll"] == pytest.approx(full, rel=1e-5)
    for stride in (1, 7, 16, 29):  # any overlap scores all but the first token
        assert strided_perplexity(lm, ids, max_length=30, stride=stride)["tokens_scored"] == 89
    overlapped = strided_perplexity(lm, ids, max_length=30, stride=10)["nll"]
    assert overlapped != pytest.approx(strided_perplexity(lm, ids, max_length=30, stride=30)["nll"], rel=1e-4)
    with pytest.raises(ValueError, match="stride"):
        strided_perplexity(lm, ids, max_length=30, stride=31)


def test_cli_eval_ceval_and_ppl_print_and_write_json(ceval_dir, tmp_path, capsys):
    from qwen2lib.cli import main

    workdir = tmp_path / "run"
    assert main(["eval", "ceval", "--model", "tiny-random", "--workdir", str(workdir), "--data", str(ceval_dir),
                 "--subjects", "logic"]) == 0
    out = capsys.readouterr().out
    assert "logic" in out and "overall" in out
    saved = json.loads((workdir / "inference" / "ceval-torch-float32.json").read_text(encoding="utf-8"))
    assert saved["subjects"]["logic"]["total"] == 2

    text = tmp_path / "sample.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    assert main(["eval", "ppl", "--model", "tiny-random", "--workdir", str(workdir), "--text", str(text),
                 "--max-length", "64", "--stride", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    saved = json.loads((workdir / "inference" / "ppl-sample-torch-float32.json").read_text())
    assert saved["ppl"] > 1 and saved["tokens_scored"] == saved["tokens"] - 1
