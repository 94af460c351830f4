"""qwen2lib chat and notebook 05's chat box: multi-turn history in the Qwen2.5 chat template, streamed replies."""
import subprocess
import sys

import pytest

from qwen2lib.serve.chat import ChatBox, ChatSession, NoChatTemplateError, use_chat_template
from qwen2lib.errors import PromptTooLongError
from qwen2lib.serve.generation import SamplingParams, TorchBackend, encode_prompt, generate
from qwen2lib.pipeline import load_backend
from qwen2lib.model.tokenizer import load_tokenizer

QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def backend():
    return load_backend("tiny-random")


@pytest.fixture
def tokenizer():
    """The embedded model's tokenizer speaking Qwen2.5-Instruct's chat template (fresh: tests change it)."""
    return use_chat_template(load_tokenizer("tiny-random"), "Qwen2.5-0.5B-Instruct")


def chatml(*turns):
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns) + "<|im_start|>assistant\n"


def test_qwen25_template_is_the_one_used(tokenizer):
    assert tokenizer.chat_template == load_tokenizer("Qwen2.5-0.5B-Instruct").chat_template
    assert tokenizer.chat_template != load_tokenizer("tiny-random").chat_template, "tiny's own is Qwen2's"


def test_every_turn_renders_the_whole_history_in_the_template(backend, tokenizer):
    session = ChatSession(backend, tokenizer, params=SamplingParams(max_new_tokens=6))
    first = session.ask("What is 2 + 2?")
    second = session.ask("And times 3?")
    assert session.history == [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": first},
                               {"role": "user", "content": "And times 3?"}, {"role": "assistant", "content": second}]
    expected = chatml(("system", QWEN25_SYSTEM), ("user", "What is 2 + 2?"), ("assistant", first),
                      ("user", "And times 3?"), ("assistant", second), ("user", "Bye"))
    assert tokenizer.decode(session.prompt_ids("Bye")) == expected


def test_a_system_prompt_replaces_the_templates_default(backend, tokenizer):
    session = ChatSession(backend, tokenizer, system="Answer in one word.", params=SamplingParams(max_new_tokens=4))
    session.ask("Hi")
    text = tokenizer.decode(session.prompt_ids("Again"))
    assert text.startswith(chatml(("system", "Answer in one word."), ("user", "Hi"))[:-len("<|im_start|>assistant\n")])
    assert QWEN25_SYSTEM not in text


def test_replies_stream_and_are_what_the_generation_loop_gives(backend, tokenizer):
    session = ChatSession(backend, tokenizer, params=SamplingParams(max_new_tokens=12))
    deltas = list(session.send("Write a haiku."))
    assert len(deltas) > 1, "the reply must arrive in pieces, not at once"
    reference = generate(backend, tokenizer, [{"role": "user", "content": "Write a haiku."}],
                         SamplingParams(max_new_tokens=12))
    assert "".join(deltas) == reference.text and reference.text


def test_reset_forgets_the_history_but_keeps_the_system_prompt(backend, tokenizer):
    session = ChatSession(backend, tokenizer, system="Be brief.", params=SamplingParams(max_new_tokens=4))
    session.ask("One")
    session.reset()
    assert session.history == []
    assert session.prompt_ids("Two") == encode_prompt(
        tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two"}], chat=True)


def test_oldest_exchanges_are_dropped_to_fit_and_one_long_message_is_refused(backend, tokenizer):
    short = TorchBackend(backend.model, max_positions=96)
    session = ChatSession(short, tokenizer, params=SamplingParams(max_new_tokens=8))
    for word in ("alpha", "beta", "gamma", "delta"):
        session.ask(f"{word} " * 12)
    assert session.dropped >= 1
    assert len(session.prompt_ids("last")) <= 96 - 8
    assert session.history[-1]["role"] == "assistant" and session.history[-2]["content"] == "delta " * 12
    with pytest.raises(PromptTooLongError, match="shorten it"):
        session.prompt_ids("word " * 200)


def test_a_tokenizer_without_template_is_refused_with_the_fix(backend):
    tok = load_tokenizer("tiny-random")
    tok.chat_template = None
    with pytest.raises(NoChatTemplateError, match="--chat-template"):
        ChatSession(backend, tok)


def test_chat_box_streams_into_its_transcript_and_resets(backend, tokenizer):
    box = ChatBox(ChatSession(backend, tokenizer, params=SamplingParams(max_new_tokens=6)))
    reply = box.send("Hello")
    assert reply and box.transcript.value == f"you> Hello\nassistant> {reply}\n"
    box.text.value = "Typed and Enter"  # what the browser sends on Enter (continuous_update=False)
    assert box.text.value == "" and len(box.session.history) == 4
    assert "you> Typed and Enter\nassistant> " in box.transcript.value
    box.reset_button.click()
    assert box.session.history == [] and box.transcript.value.endswith("[chat] history cleared\n")


def test_cli_chat_multi_turn_reset_and_exit_through_stdin(backend, tokenizer):
    lines = ["What is 2 + 2?", "And times 3?", "/reset", "What is 2 + 2?", "/exit", "never sent"]
    run = subprocess.run([sys.executable, "-m", "qwen2lib.cli", "chat", "--model", "tiny-random", "--max-new-tokens", "6",
                          "--chat-template", "Qwen2.5-0.5B-Instruct"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    replies = [part.split("\nyou> ")[0] for part in run.stdout.split("assistant> ")[1:]]
    assert len(replies) == 3, run.stdout  # /exit stops before "never sent"
    assert "[chat] history cleared" in run.stdout

    session = ChatSession(backend, tokenizer, params=SamplingParams(max_new_tokens=6))
    expected = [session.ask("What is 2 + 2?"), session.ask("And times 3?")]
    session.reset()
    expected.append(session.ask("What is 2 + 2?"))
    assert replies == expected
    assert replies[2] == replies[0], "after /reset the same question starts from an empty history"


def test_cli_chat_refuses_bad_sampling_in_one_line_before_loading():
    run = subprocess.run([sys.executable, "-m", "qwen2lib.cli", "chat", "--model", "tiny-random", "--temperature", "-1"],
                         input="", capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "qwen2lib chat: error: temperature=-1.0: use 0 for greedy or a positive value to sample"]
