"""Multiple choice the OpenCompass way on files the tests write in every published layout, and strided perplexity.

The "models" here are rigged logits: uniform except the answer letters at the last position, which
favour what ``pick(prompt text)`` says, so accuracies are known exactly.
"""
from __future__ import annotations

import csv
import json
import math
import re
import tarfile
import zipfile

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM

from conftest import tiny_hf_config
from qwen2lib.evaluation.accuracy import (EvalDataError, accuracy_table, build_prompt, continuation_ce,
                                          evaluate_benchmark, evaluate_ceval, open_benchmark, score_ppl,
                                          strided_perplexity, write_builtin_mc_set)

VOCAB = 151936
GOLD: dict[str, str] = {}  # question text -> answer, for every row the writers below produce


@pytest.fixture(scope="module")
def tokenizer():
    from qwen2lib import load_tokenizer

    return load_tokenizer("tiny-random")


# ---- writers: small copies of each published layout --------------------------------------------

def rows(dataset, subject, split, n):
    out = []
    for i in range(n):
        question = f"Q|{dataset}|{subject}|{split}|{i}"
        answer = "ABCD"[(i * 3 + len(subject)) % 4]
        GOLD[question] = answer
        out.append({"id": i, "question": question, "A": "甲", "B": "乙", "C": "丙", "D": "丁", "answer": answer})
    return out


def write_ceval_exam(root, subjects=("logic", "college_physics"), n_val=3):
    for split, n in (("dev", 5), ("val", n_val), ("test", 2)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            columns = ["id", "question", "A", "B", "C", "D"] + (["answer", "explanation"] if split != "test" else [])
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows({**r, "explanation": "因为"} for r in rows("ceval", subject, split, n))
    return root


def write_cmmlu(root, subjects=("agronomy", "chinese_history")):
    for split, n in (("dev", 5), ("test", 4)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            with open(root / split / f"{subject}.csv", "w", newline="", encoding="utf-8-sig") as fh:  # with a BOM
                writer = csv.writer(fh)
                writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                writer.writerows([r["id"], r["question"], *"甲乙丙丁", r["answer"]] for r in rows("cmmlu", subject, split, n))
    return root


def write_mmlu(root, subjects=("astronomy", "philosophy")):
    for split, n in (("dev", 5), ("val", 2), ("test", 3)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows([r["question"], "one", "two", "three", "four", r["answer"]]
                                         for r in rows("mmlu", subject, split, n))
    return root


def write_opencompass(top):
    write_ceval_exam(top / "data" / "ceval" / "formal_ceval")
    write_cmmlu(top / "data" / "cmmlu")
    write_mmlu(top / "data" / "mmlu")
    (top / "data" / "gsm8k").mkdir(parents=True)
    (top / "data" / "gsm8k" / "test.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    return top


def zip_folder(folder, archive, prefix=""):
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, prefix + f.relative_to(folder).as_posix())
    return archive


# ---- rigged models --------------------------------------------------------------------------------

def letter_ids(tokenizer):
    """Every token an answer letter can be: after a newline ("B") and after a space (" B")."""
    return {c: (tokenizer.encode("答案: \n" + c)[-1], tokenizer.encode("Answer: " + c)[-1]) for c in "ABCD"}


def favouring(tokenizer, pick):
    ids = letter_ids(tokenizer)

    def logits_fn(x):
        logits = torch.zeros(x.shape[0], x.shape[1], VOCAB)
        for row in range(x.shape[0]):
            preferred = pick(tokenizer.decode(x[row]))
            for letter, (plain, spaced) in ids.items():
                logits[row, -1, plain] = 5.0 if letter == preferred else 1.0
                logits[row, -1, spaced] = 4.9 if letter == preferred else 1.0
        return logits

    return logits_fn


def oracle(text):
    """The gold answer of the last question in the prompt."""
    return GOLD[re.findall(r"Q\|[^\n]+", text)[-1]]


# ---- prompts -------------------------------------------------------------------------------------

SHOT = {"question": "1+1=?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}
ROW = {"question": "2+2=?", "A": "4", "B": "5", "C": "6", "D": "7", "answer": "A"}
OPTS1, OPTS2 = "A. 1\nB. 2\nC. 3\nD. 4", "A. 4\nB. 5\nC. 6\nD. 7"


def test_prompts_are_the_opencompass_ppl_texts():
    head = "以下是中国关于逻辑学考试的单项选择题，请选出其中的正确答案。\n"
    assert build_prompt("ceval", "逻辑学", [SHOT], ROW) == f"{head}1+1=?\n{OPTS1}\n答案: \nB\n{head}2+2=?\n{OPTS2}\n答案: \n"
    head = "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n"
    assert build_prompt("cmmlu", "农学", [SHOT], ROW) == (
        f"{head}题目：1+1=?\n{OPTS1}\n答案是: B\n{head}题目：2+2=?\n{OPTS2}\n答案是: ")
    assert build_prompt("mmlu", "astronomy", [SHOT, SHOT], ROW) == (
        "The following are multiple choice questions (with answers) about  astronomy.\n\n"
        f"1+1=?\n{OPTS1}\nAnswer: B\n\n1+1=?\n{OPTS1}\nAnswer: B\n\n2+2=?\n{OPTS2}\nAnswer: ")


# ---- scoring -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["ceval", "mmlu"])
def test_ppl_picks_the_lowest_continuation_cross_entropy(tokenizer, dataset):
    bias = {"A": 1.0, "B": 3.0, "C": 2.0, "D": 0.0}
    ids = letter_ids(tokenizer)

    def logits_fn(x):
        logits = torch.zeros(x.shape[0], x.shape[1], VOCAB)
        for letter, value in bias.items():
            logits[:, -1, ids[letter][0 if dataset == "ceval" else 1]] = value
        return logits

    scored = score_ppl(logits_fn, tokenizer, build_prompt(dataset, "x", [], ROW))
    assert scored["prediction"] == "B"
    # the continuation is the letter's one token: CE = logsumexp - its logit
    logz = math.log(VOCAB - 4 + sum(math.exp(v) for v in bias.values()))
    assert scored["ce"] == pytest.approx([logz - bias[c] for c in "ABCD"], abs=5e-4)  # fp32 softmax over 152k


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


# ---- layouts -------------------------------------------------------------------------------------

def test_each_published_layout_and_its_archive_is_recognised(tmp_path):
    ceval = write_ceval_exam(tmp_path / "ceval-exam")
    cmmlu = write_cmmlu(tmp_path / "CMMLU" / "data")
    mmlu = write_mmlu(tmp_path / "hendrycks" / "data")
    tar = tmp_path / "data.tar"
    with tarfile.open(tar, "w") as t:
        t.add(mmlu, arcname="data")
    cases = [("ceval", ceval, "ceval-exam layout (folder)"),
             ("ceval", zip_folder(ceval, tmp_path / "ceval-exam.zip"), "ceval-exam layout (zip)"),
             ("cmmlu", tmp_path / "CMMLU", "CMMLU layout (folder)"),
             ("cmmlu", zip_folder(cmmlu, tmp_path / "cmmlu_v1_0_1.zip"), "CMMLU layout (zip)"),
             ("mmlu", tmp_path / "hendrycks", "MMLU (Hendrycks) layout (folder)"),
             ("mmlu", tar, "MMLU (Hendrycks) layout (tar)")]
    expected_subjects = {"ceval": ["college_physics", "logic"], "cmmlu": ["agronomy", "chinese_history"],
                         "mmlu": ["astronomy", "philosophy"]}
    for dataset, path, form in cases:
        bench = open_benchmark(dataset, path)
        assert (bench.form, bench.subjects()) == (form, expected_subjects[dataset]), path
        first = bench.rows(bench.subjects()[0], bench.split)[0]
        assert GOLD[first["question"]] == first["answer"] and first["B"] in ("乙", "two")
    assert open_benchmark("ceval", ceval).rows("logic", "test")[0]["answer"] is None  # C-Eval's test has no answers
    assert open_benchmark("cmmlu", tmp_path / "CMMLU").names["agronomy"] == "农学"


@pytest.mark.parametrize("where", ["top", "data", "zip", "dataset folder"])
def test_opencompass_data_core_from_its_top_folder_data_folder_or_zip(tmp_path, where):
    top = write_opencompass(tmp_path / "OpenCompassData-core")
    path = {"top": top, "data": top / "data", "zip": zip_folder(top, tmp_path / "OpenCompassData-core.zip"),
            "dataset folder": top / "data" / "ceval" / "formal_ceval"}[where]
    for dataset, split in (("ceval", "val"), ("cmmlu", "test"), ("mmlu", "test")):
        if where == "dataset folder" and dataset != "ceval":
            continue
        bench = open_benchmark(dataset, path)
        assert bench.split == split and len(bench.subjects()) == 2
        if where != "dataset folder":
            assert bench.form.startswith("OpenCompassData-core layout")
        assert all(r["question"].startswith(f"Q|{dataset}|") for r in bench.rows(bench.subjects()[0], split))


def test_a_wrong_path_says_what_was_expected_and_what_was_found(tmp_path):
    ceval_zip = zip_folder(write_ceval_exam(tmp_path / "ceval-exam"), tmp_path / "ceval-exam.zip")
    with pytest.raises(EvalDataError, match=r"expected MMLU.*found C-Eval CSVs \(dev/test/val\)") as error:
        open_benchmark("mmlu", ceval_zip)
    assert "\n" not in str(error.value)
    with pytest.raises(EvalDataError, match="does not exist; expected CMMLU"):
        open_benchmark("cmmlu", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(EvalDataError, match=r"expected C-Eval.*found 1 files, no \{dev,val,test\} CSVs \(notes.txt\)"):
        open_benchmark("ceval", tmp_path / "empty")
    only_dev = tmp_path / "only-dev"
    write_ceval_exam(only_dev)
    for f in (only_dev / "val").iterdir():
        f.unlink()
    with pytest.raises(EvalDataError, match="with a val split"):
        open_benchmark("ceval", only_dev)
    with pytest.raises(EvalDataError, match=r"no val file for history .* it has 2 subjects \(college_physics, logic\)"):
        evaluate_ceval(lambda ids: pytest.fail("scored"), None, tmp_path / "ceval-exam", subjects=["history"])


# ---- accuracy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["ceval", "cmmlu", "mmlu"])
def test_accuracy_per_subject_category_and_average(tmp_path, tokenizer, dataset):
    top = write_opencompass(tmp_path / "oc")
    perfect = evaluate_benchmark(favouring(tokenizer, oracle), tokenizer, dataset, top, shots=2, progress=False)
    assert perfect["overall_accuracy"] == 1.0 and perfect["categories"]["Average"]["accuracy"] == 1.0
    always_b = evaluate_benchmark(favouring(tokenizer, lambda t: "B"), tokenizer, dataset, top, shots=0, progress=False)
    bench = open_benchmark(dataset, top)
    expected = {s: sum(r["answer"] == "B" for r in bench.rows(s, bench.split)) / len(bench.rows(s, bench.split))
                for s in bench.subjects()}
    assert {s: v["accuracy"] for s, v in always_b["subjects"].items()} == pytest.approx(expected)
    assert always_b["average_accuracy"] == pytest.approx(sum(expected.values()) / 2)
    groups = {"ceval": {"STEM": "college_physics", "Humanities": "logic", "Hard": "college_physics"},
              "cmmlu": {"Other": "agronomy", "Humanities": "chinese_history", "China specific": "chinese_history"},
              "mmlu": {"STEM": "astronomy", "Humanities": "philosophy"}}[dataset]
    assert {c: v["accuracy"] for c, v in always_b["categories"].items() if c != "Average"} == \
        pytest.approx({c: expected[s] for c, s in groups.items()})


def test_gen_mode_reads_the_first_capital_of_a_greedy_continuation(tmp_path, tokenizer):
    folder = write_mmlu(tmp_path / "mmlu")
    calls = []

    def fn(x):
        calls.append(x.shape[1])
        return favouring(tokenizer, oracle)(x)

    result = evaluate_benchmark(fn, tokenizer, "mmlu", folder, mode="gen", shots=1, progress=False)
    assert result["overall_accuracy"] == 1.0 and result["mode"] == "gen"
    assert len(calls) == result["questions"] == 6  # the letter comes first, so one step per question
    assert result["predictions"][0]["output"].strip() in "ABCD"


def test_limit_subjects_and_an_interrupted_run_resumes(tmp_path, tokenizer):
    folder = write_ceval_exam(tmp_path / "ceval", n_val=4)
    journal = tmp_path / "ceval.jsonl"
    scored, stop_at = [], [3]

    def fn(x):
        scored.append(1)
        if len(scored) == stop_at[0]:
            raise KeyboardInterrupt
        return favouring(tokenizer, oracle)(x)

    with pytest.raises(KeyboardInterrupt):
        evaluate_benchmark(fn, tokenizer, "ceval", folder, results_path=journal, run_id="m", progress=False)
    assert len(journal.read_text().splitlines()) == 1 + 2  # the run key, then the two questions scored
    scored.clear()
    stop_at[0] = None
    resumed = evaluate_benchmark(fn, tokenizer, "ceval", folder, results_path=journal, run_id="m", progress=False)
    assert resumed["resumed"] == 2 and len(scored) == 8 - 2 and resumed["overall_accuracy"] == 1.0
    fresh = evaluate_benchmark(favouring(tokenizer, oracle), tokenizer, "ceval", folder, progress=False)
    assert resumed["subjects"] == fresh["subjects"]
    scored.clear()  # another model's run key: nothing is reused
    other = evaluate_benchmark(favouring(tokenizer, lambda t: "A"), tokenizer, "ceval", folder, subjects=["logic"],
                               limit=2, results_path=journal, run_id="other", progress=False)
    assert other["resumed"] == 0 and other["questions"] == 2 and list(other["subjects"]) == ["logic"]
    assert other["categories"]["Humanities"] == {"accuracy": other["overall_accuracy"], "subjects": 1, "of": 11}


def test_accuracy_table_has_a_delta_against_fp32_per_set():
    def result(avg, dataset="C-Eval (val)"):
        return {"dataset": dataset, "average_accuracy": avg,
                "categories": {"STEM": {"accuracy": avg - 0.1}, "Average": {"accuracy": avg}}}

    table = accuracy_table({"fp32 torch": result(0.5), "int8 torch": result(0.48), "int8 graph": result(0.53)},
                           categories=True)
    assert list(table.index) == ["fp32 torch", "int8 torch", "int8 graph"]
    assert table["C-Eval (val) Δ vs fp32 torch"].tolist() == pytest.approx([0.0, -2.0, 3.0])
    assert table.loc["int8 torch", "C-Eval (val) STEM %"] == pytest.approx(38.0)
    two = accuracy_table({"fp32 torch": {"ceval": result(0.5), "mmlu": result(0.3, "MMLU (test)")},
                          "fp16 graph": {"ceval": result(0.5), "mmlu": result(0.31, "MMLU (test)")}})
    assert two.loc["fp16 graph", "MMLU (test) Δ vs fp32 torch"] == pytest.approx(1.0)
    assert two.loc["fp16 graph", "C-Eval (val) Δ vs fp32 torch"] == pytest.approx(0.0)
    stand_in = accuracy_table({"fp32 torch": result(0.5, "not C-Eval: built-in stdlib-docstring multiple choice")})
    assert list(stand_in.columns) == ["not C-Eval avg %", "not C-Eval Δ vs fp32 torch"]


def test_builtin_set_is_labelled_not_ceval_and_loads(tmp_path, tokenizer):
    folder = write_builtin_mc_set(tmp_path / "mc", n_val=3)
    result = evaluate_ceval(favouring(tokenizer, lambda text: "A"), tokenizer, folder, progress=False)
    assert result["dataset"].startswith("not C-Eval")
    assert all(s.startswith("not_ceval_") for s in result["subjects"]) and result["questions"] == 9
    names = json.loads((folder / "subject_mapping.json").read_text(encoding="utf-8"))
    assert all("not C-Eval" in v[0] for v in names.values())
    assert "Python标准库math" in build_prompt("ceval", open_benchmark("ceval", folder).names["not_ceval_math"], [],
                                             {"question": "q", "A": 1, "B": 2, "C": 3, "D": 4})


# ---- perplexity ------------------------------------------------------------------------------------

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


# ---- command line ----------------------------------------------------------------------------------

def test_cli_checks_the_data_before_loading_any_model(tmp_path, monkeypatch, capsys):
    from qwen2lib.cli import inference, main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(inference, "load_backend", no_model)  # where the command looks them up
    monkeypatch.setattr(inference, "stage_backend", no_model)
    ceval_zip = zip_folder(write_ceval_exam(tmp_path / "ceval-exam"), tmp_path / "ceval-exam.zip")
    for argv, message in ((["mmlu", "--data", str(ceval_zip)], "expected MMLU"),
                          (["ceval", "--data", str(ceval_zip), "--subjects", "law"], "no val file for law"),
                          (["cmmlu"], "--data is required for cmmlu")):
        assert main(["eval", *argv, "--model", "tiny-random", "--workdir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_cli_eval_resumes_writes_json_and_tabulates(tmp_path, capsys):
    from qwen2lib.cli import main

    workdir = tmp_path / "run"
    ceval_zip = zip_folder(write_ceval_exam(tmp_path / "ceval-exam"), tmp_path / "ceval-exam.zip")
    argv = ["eval", "ceval", "--model", "tiny-random", "--workdir", str(workdir), "--data", str(ceval_zip),
            "--subjects", "logic", "--limit", "2", "--shots", "1", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "logic" in captured.out and "Humanities" in captured.out and "(1 of 11 subjects)" in captured.out
    saved = json.loads((workdir / "inference" / "ceval-torch-float32.json").read_text(encoding="utf-8"))
    assert saved["subjects"]["logic"]["total"] == 2 and saved["stage"] == "torch-float32"
    assert main(argv) == 0
    assert "resumed 2 scored questions" in capsys.readouterr().err
    assert main(["eval", "table", "--model", "tiny-random", "--workdir", str(workdir)]) == 0
    assert "C-Eval (val) Δ vs torch-float32" in capsys.readouterr().out

    text = tmp_path / "sample.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    assert main(["eval", "ppl", "--model", "tiny-random", "--workdir", str(workdir), "--text", str(text),
                 "--max-length", "64", "--stride", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    saved = json.loads((workdir / "inference" / "ppl-sample-torch-float32.json").read_text())
    assert saved["ppl"] > 1 and saved["tokens_scored"] == saved["tokens"] - 1
