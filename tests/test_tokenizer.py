import unicodedata

import pytest

from qwen2lib.model import tokenizer as tk
from qwen2lib.model.tokenizer import load_tokenizer

TEXTS = [
    "Hello, world! The year 2024 has 366 days.",
    "你好，世界。通义千问是阿里云研发的大语言模型。",
    "こんにちは世界 — 日本語のテキスト",
    "Привет, мир! Ünïcödé café naïve façade",
    "مرحبا بالعالم",
    "emoji 🤖🚀👍🏽 and flags 🇨🇳",
    "def __init__(self, x: int = 42) -> None:\n    self.x = x  # comment\n\n\treturn",
    "if (a[i] != b[j]) { x += 0x1F; }\r\n",
    "   leading spaces, trailing spaces   ",
    "\n\n\nmany\n\n newlines \t\t tabs  \u00a0nbsp",
    "I'm sure they'll say it's John's; WE'VE, I'D",
    "1234567890 3.14159 1e-6 -0.5",
    "",
    " ",
    "<|endoftext|>",
]


@pytest.fixture(scope="module")
def qwen2():
    return load_tokenizer("Qwen2-1.5B")


@pytest.fixture(scope="module")
def reference():
    return tk.tiktoken_encoding("qwen2")


def test_ranks_file_is_the_real_one():
    ranks = tk.load_ranks()
    assert len(ranks) == 151643
    assert ranks[b"!"] == 0 and max(ranks.values()) == 151642


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_tiktoken(qwen2, reference, text):
    text = unicodedata.normalize("NFC", text)  # tiktoken does not normalise; the HF tokenizer applies NFC
    assert qwen2.encode(text) == reference.encode(text, allowed_special="all")
    assert qwen2.decode(qwen2.encode(text)) == text


def test_nfc_normalisation(qwen2):
    assert qwen2.encode("cafe\u0301") == qwen2.encode("caf\u00e9")


def test_long_mixed_document_equals_tiktoken(qwen2, reference):
    text = unicodedata.normalize("NFC", "\n".join(TEXTS * 20))
    assert qwen2.encode(text) == reference.encode(text, allowed_special="all")


@pytest.mark.parametrize(
    "model, n_control, last",
    [("Qwen2-0.5B", 3, "<|im_end|>"), ("Qwen2.5-7B-Instruct", 22, "<|file_sep|>")],
)
def test_control_tokens(model, n_control, last):
    tok = load_tokenizer(model)
    assert len(tok) == 151643 + n_control
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids(last) == 151643 + n_control - 1
    assert tok.encode("<|im_start|>user") == [151644, 872]


def test_eos_and_pad_follow_the_family():
    base, chat = load_tokenizer("Qwen2.5-1.5B"), load_tokenizer("Qwen2.5-1.5B-Instruct")
    assert base.eos_token == "<|endoftext|>" and chat.eos_token == "<|im_end|>"
    assert base.pad_token == chat.pad_token == "<|endoftext|>"
    assert base.bos_token is None


def test_chat_template_two_turns_is_chatml():
    conversation = [
        {"role": "user", "content": "What is GQA?"},
        {"role": "assistant", "content": "Grouped-query attention."},
        {"role": "user", "content": "Why?"},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is GQA?<|im_end|>\n"
        "<|im_start|>assistant\nGrouped-query attention.<|im_end|>\n"
        "<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    text = load_tokenizer("Qwen2-7B-Instruct").apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text == expected
    text25 = load_tokenizer("Qwen2.5-7B-Instruct").apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text25 == expected.replace("You are a helpful assistant.", tk.DEFAULT_SYSTEM_PROMPT["qwen2.5"])
    with_system = [{"role": "system", "content": "Be brief."}] + conversation[:1]
    assert load_tokenizer("Qwen2-7B-Instruct").apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is GQA?<|im_end|>\n"
    )


def test_built_tokenizer_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN2LIB_CACHE", str(tmp_path))
    first = load_tokenizer("Qwen2-0.5B")
    assert (tmp_path / "tokenizers" / "qwen2" / "tokenizer.json").is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached tokenizer was rebuilt")

    monkeypatch.setattr(tk, "build_tokenizer", no_rebuild)
    assert load_tokenizer("Qwen2-1.5B").encode("cache hit") == first.encode("cache hit")


def test_folder_tokenizer_files_win(make_checkpoint):
    folder = make_checkpoint()
    tok = load_tokenizer("Qwen2-0.5B")
    tok.chat_template = "{{ 'CUSTOM' }}"
    tok.save_pretrained(folder)
    loaded = load_tokenizer(folder)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "CUSTOM"
