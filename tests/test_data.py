import csv
import gzip
import json
import zipfile

import pytest
import torch

from qwen2lib.calibrate import data


@pytest.fixture(scope="module")
def tokenizer():
    from qwen2lib import load_tokenizer

    return load_tokenizer("tiny-random")


def write_c4(folder):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "c4-validation.00000-of-00008.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i in range(5):
            fh.write(json.dumps({"text": f"Document {i} about gardens and rivers.", "timestamp": "2019", "url": f"u{i}"}) + "\n")
    return path


def write_ceval(folder, with_test_split=True):
    for split in ("dev", "val") + (("test",) if with_test_split else ()):
        rows = [{"id": i, "question": f"{split} 问题 {i}?", "A": "甲", "B": "乙", "C": "丙", "D": "丁", "answer": "B",
                 "explanation": "因为"} for i in range(3)]
        (folder / split).mkdir(parents=True, exist_ok=True)
        with open(folder / split / f"computer_network_{split}.csv", "w", newline="", encoding="utf-8") as fh:
            columns = ["id", "question", "A", "B", "C", "D"] + (["answer", "explanation"] if split != "test" else [])
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return folder


def write_alpaca(folder):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "alpaca_data_cleaned.json"
    records = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
               {"instruction": "Translate.", "input": "bonjour", "output": "hello"}]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_c4_shard_file_and_folder(tmp_path):
    path = write_c4(tmp_path / "c4")
    for where in (path, tmp_path / "c4"):
        texts = data.load_calibration_texts("c4", where)
        assert texts.texts[3] == "Document 3 about gardens and rivers." and len(texts.texts) == 5
        assert texts.dataset == "c4" and not texts.fallback and "c4" in texts.label


HEAD = "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n"


def test_ceval_folder_zip_and_opencompass_layout_calibrate_on_dev_and_test_never_val(tmp_path):
    folder = write_ceval(tmp_path / "ceval-exam")
    texts = data.load_calibration_texts("ceval", folder)
    assert len(texts.texts) == 6 and not any("val 问题" in t for t in texts.texts)  # `eval ceval` scores val
    # the prompt `eval ceval` asks with, then the answer and its explanation
    assert texts.texts[0] == f"{HEAD}dev 问题 0?\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案: \nB 因为"
    assert texts.texts[3] == f"{HEAD}test 问题 0?\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案: \n"  # test has no answers
    archive = tmp_path / "ceval-exam.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in folder.rglob("*.csv"):
            z.write(f, f.relative_to(folder).as_posix())
    assert data.load_calibration_texts("ceval", archive).texts == texts.texts
    opencompass = tmp_path / "OpenCompassData-core"
    write_ceval(opencompass / "data" / "ceval" / "formal_ceval")
    assert data.load_calibration_texts("ceval", opencompass).texts == texts.texts
    with pytest.raises(data.CalibrationDataError, match="val split, which `eval ceval` scores"):
        data.load_calibration_texts("ceval", folder / "val" / "computer_network_val.csv")


def test_ceval_without_dev_or_test_is_refused(tmp_path, tokenizer):
    folder = write_ceval(tmp_path / "only-val", with_test_split=False)
    for f in (folder / "dev").iterdir():
        f.unlink()
    with pytest.raises(data.CalibrationDataError, match="holds only C-Eval's val split"):
        data.load_calibration_texts("ceval", folder)
    with pytest.raises(data.CalibrationDataError, match="expected C-Eval"):
        data.load_calibration_texts("ceval", write_alpaca(tmp_path / "a").parent)
    chat = data.load_calibration_texts("ceval", write_ceval(tmp_path / "full"), tokenizer=tokenizer, chat=True)
    assert "答案:<|im_end|>\n<|im_start|>assistant\nB 因为" in chat.texts[0]


def test_alpaca_plain_and_chat_template(tmp_path, tokenizer):
    path = write_alpaca(tmp_path / "alpaca")
    plain = data.load_calibration_texts("alpaca", path)
    assert plain.texts == ["Name a colour.\n\nBlue.", "Translate.\n\nbonjour\n\nhello"]
    chat = data.load_calibration_texts("alpaca", path, tokenizer=tokenizer, chat=True)
    assert "<|im_start|>user\nTranslate.\n\nbonjour<|im_end|>" in chat.texts[1]
    assert "<|im_start|>assistant\nhello" in chat.texts[1]


def test_wrong_layouts_and_missing_paths_are_clear_errors(tmp_path):
    write_alpaca(tmp_path / "a")
    with pytest.raises(data.CalibrationDataError, match="text"):
        data.load_calibration_texts("c4", tmp_path / "a" / "alpaca_data_cleaned.json")
    with pytest.raises(data.CalibrationDataError, match="does not exist"):
        data.load_calibration_texts("c4", tmp_path / "nowhere")
    with pytest.raises(data.CalibrationDataError, match="choose one of"):
        data.load_calibration_texts("wikitext")


def test_offline_without_files_falls_back_to_builtin_and_says_so(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(data.CalibrationDataError, match="--data-path"):
        data.load_calibration_texts("c4", fallback=False)
    texts = data.load_calibration_texts("c4", fallback=True)
    assert texts.fallback and texts.dataset == "builtin" and "offline fallback" in texts.label
    assert "standing in for unavailable c4" in texts.label and "Falling back" in capsys.readouterr().out
    from qwen2lib.model.corpus import stdlib_corpus

    corpus = stdlib_corpus()
    train = [corpus.read(f) for f in corpus.train_files]
    assert texts.texts == [t for t in train if t.strip()]  # the (non-empty) train files, in order
    assert not set(texts.texts) & {corpus.read(f) for f in corpus.heldout_files}  # never held-out text


def test_sampling_is_deterministic_n_by_l(tokenizer):
    texts = [f"text number {i} " * (i + 3) for i in range(20)]
    a = data.sample_token_blocks(texts, tokenizer, 4, 16, seed=0)
    assert a.shape == (4, 16) and a.dtype == torch.long
    assert torch.equal(a, data.sample_token_blocks(texts, tokenizer, 4, 16, seed=0))
    assert not torch.equal(a, data.sample_token_blocks(texts, tokenizer, 4, 16, seed=1))
    with pytest.raises(data.CalibrationDataError, match="fewer than"):
        data.sample_token_blocks(texts[:1], tokenizer, 64, 64)


def test_the_prose_corpus_is_the_installed_packages_readmes_split_by_package():
    from qwen2lib.model.corpus import prose_corpus

    corpus = prose_corpus()
    assert len(corpus.train_files) > 3 * len(corpus.heldout_files) > 0
    package = lambda f: f.split("-")[0]  # noqa: E731
    assert not {package(f) for f in corpus.train_files} & {package(f) for f in corpus.heldout_files}
    assert not any(f.startswith("qwen2lib-") for f in corpus.files)  # our own README changes with every edit
    text = corpus.read(corpus.heldout_files[0])
    assert len(text) >= 2000 and "Metadata-Version" not in text  # the README, not the headers
    assert prose_corpus().sha256 == corpus.sha256


def test_a_trained_checkpoint_calibrates_and_verifies_on_prose_and_tiny_on_code(make_checkpoint):
    from qwen2lib.calibrate.stage import default_request
    from qwen2lib.quantize.stage import default_settings

    folder = str(make_checkpoint())
    assert default_request("tiny", "auto")["dataset"] == "builtin"
    assert default_request(folder, "random")["dataset"] == "builtin"  # random weights learned nothing
    trained = default_request(folder, "auto")
    assert trained["dataset"] == "prose" and trained["samples"] * trained["seq_len"] > 16 * 128
    assert default_settings("tiny", "auto")["heldout_text"] == "code"
    assert default_settings(folder, "auto")["heldout_text"] == "prose"


def test_prose_calibration_texts_and_held_out_blocks_never_overlap(tokenizer):
    from qwen2lib.model.corpus import heldout_token_blocks, prose_corpus

    texts = data.load_calibration_texts("prose")
    assert texts.dataset == "prose" and not texts.fallback and "READMEs" in texts.label
    corpus = prose_corpus()
    held_out = {corpus.read(f) for f in corpus.heldout_files}
    assert not held_out & set(texts.texts)
    assert heldout_token_blocks(tokenizer, 4, 32, text="prose").shape == (4, 32)
    with pytest.raises(ValueError, match="held-out text is one of"):
        heldout_token_blocks(tokenizer, 4, 32, text="poetry")
