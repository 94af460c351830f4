"""Multi-turn chat on any checkpoint with a chat template: ``qwen2lib chat`` and notebook 05's chat box.

A ``ChatSession`` keeps the conversation (an optional system prompt, then user and assistant turns) and
renders all of it with the tokenizer's own chat template on every turn, so the model sees exactly what an
OpenAI-style ``/v1/chat/completions`` request with the same messages would give it. Replies stream through
``generation.stream`` (the one generation loop); nothing here samples or decodes tokens itself.

    qwen2lib chat --model Qwen2.5-0.5B-Instruct --system "You answer in one sentence."
    you> /reset      forget the conversation (the system prompt stays)
    you> /exit       leave (so does end of input, Ctrl-D)
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from ..errors import PromptTooLongError, Qwen2LibError
from .generation import SamplingParams, encode_prompt, stop_token_ids, stream
from ..model.tokenizer import load_tokenizer

COMMANDS = {"/reset": "forget the conversation (the system prompt stays)", "/exit": "leave (so does Ctrl-D)"}


class NoChatTemplateError(Qwen2LibError, ValueError):
    pass


def use_chat_template(tokenizer, source: str | None):
    """Give ``tokenizer`` the chat template of ``source``: a .jinja file, or a model whose tokenizer has one.

    Lets a base checkpoint (like the embedded ``tiny``) chat in, say, Qwen2.5-Instruct's format.
    """
    if source:
        path = Path(source).expanduser()
        if path.is_file():
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        else:
            tokenizer.chat_template = load_tokenizer(source).chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError("this tokenizer has no chat template: use an -Instruct model or pass "
                                  "--chat-template MODEL_OR_FILE (e.g. --chat-template Qwen2.5-0.5B-Instruct)")
    return tokenizer


class ChatSession:
    """One conversation with a backend: ``send(text)`` streams the reply and records both turns."""

    def __init__(self, backend, tokenizer, system: str | None = None, params: SamplingParams | None = None):
        self.backend, self.tokenizer = backend, use_chat_template(tokenizer, None)
        self.system = system or None  # None: the template's own default system prompt, if it has one
        self.params = params or SamplingParams(max_new_tokens=256)
        self.history: list[dict] = []  # user and assistant turns, oldest first
        self.turns = 0  # replies generated, also since a reset: offsets a sampling seed so turns differ
        self.dropped = 0  # oldest exchanges dropped so far to fit the model's positions
        self.stops = stop_token_ids(tokenizer, getattr(backend, "config", None))

    @property
    def messages(self) -> list[dict]:
        """What the template renders: the system prompt (when given) and the history."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self, text: str) -> list[int]:
        """The whole conversation plus ``text`` as the next user turn, in the chat template, ready to generate.

        When it would not fit the model's positions with room for the reply, the oldest user/assistant
        exchanges are dropped (counted in ``dropped``); a single message too long on its own is refused.
        """
        room = self.backend.max_positions - self.params.max_new_tokens
        while True:
            messages = self.messages + [{"role": "user", "content": text}]
            ids = encode_prompt(self.tokenizer, messages, chat=True)
            if len(ids) <= room:
                return ids
            if not self.history:
                raise PromptTooLongError(
                    f"this message takes {len(ids)} tokens with the system prompt and max_new_tokens="
                    f"{self.params.max_new_tokens} leaves room for {room}: shorten it or ask for fewer new tokens")
            self.history = self.history[2:]
            self.dropped += 1

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to ``text`` delta by delta; the turn is recorded even if the caller stops early."""
        ids = self.prompt_ids(text)
        params = self.params
        if params.seed is not None:
            params = replace(params, seed=params.seed + self.turns)
        reply: list[str] = []
        try:
            for delta in stream(self.backend, self.tokenizer, ids, params, stop_ids=self.stops):
                reply.append(delta)
                yield delta
        finally:
            self.turns += 1
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(reply)}]

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """``send`` to the end: the whole reply (``on_text`` sees each delta as it arrives)."""
        parts = []
        for delta in self.send(text):
            parts.append(delta)
            if on_text is not None:
                on_text(delta)
        return "".join(parts)


# ---- notebook ---------------------------------------------------------------------------------

class ChatBox:
    """An ipywidgets chat box over a session: a transcript that fills as tokens arrive, a text field, Send, Reset.

    ``send(text)`` is what the Send button (or Enter) does, callable from a cell too, so a notebook run
    headless by papermill can script a turn instead of waiting for someone to type.
    """

    def __init__(self, session: ChatSession):
        # heavy and optional: only the notebook's chat box needs the widget stack, not the CLI that imports this module
        import ipywidgets as widgets

        self.session = session
        self.transcript = widgets.Textarea(value="", disabled=True, layout=widgets.Layout(width="100%", height="16em"))
        self.text = widgets.Text(placeholder="Message (Enter sends)", continuous_update=False,
                                 layout=widgets.Layout(flex="1"))
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.reset_button = widgets.Button(description="Reset")
        self.widget = widgets.VBox([self.transcript, widgets.HBox([self.text, self.send_button, self.reset_button])])
        # continuous_update=False: the value changes on Enter, which is the submit event of ipywidgets 8
        self.text.observe(lambda change: self._submit(), "value")
        self.send_button.on_click(lambda _: self._submit())
        self.reset_button.on_click(lambda _: self.reset())

    def _ipython_display_(self):
        from IPython.display import display  # optional: only a notebook displays the box

        display(self.widget)

    def _submit(self) -> None:
        text = self.text.value.strip()
        if text:
            self.text.value = ""  # fires the observer again, with nothing to send
            self.send(text)

    def send(self, text: str) -> str:
        """Append the user's turn, stream the reply into the transcript, return it."""
        self.transcript.value += f"you> {text}\nassistant> "
        self.send_button.disabled = self.text.disabled = True
        try:
            def show(delta: str) -> None:
                self.transcript.value += delta

            reply = self.session.ask(text, on_text=show)
        except PromptTooLongError as exc:
            reply = ""
            self.transcript.value += f"[chat] {exc}"
        finally:
            self.transcript.value += "\n"
            self.send_button.disabled = self.text.disabled = False
        return reply

    def reset(self) -> None:
        self.session.reset()
        self.transcript.value += "[chat] history cleared\n"


# ---- terminal ---------------------------------------------------------------------------------

def repl(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], None] | None = None) -> int:
    """Read lines until /exit or end of input; stream each reply. Ctrl-C stops a reply, not the chat."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("\n")
            return 0
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            session.reset()
            write("[chat] history cleared\n")
            continue
        if line.startswith("/") and line.split()[0] not in COMMANDS:
            write(f"[chat] unknown command {line.split()[0]}: " + ", ".join(f"{c} {h}" for c, h in COMMANDS.items()) + "\n")
            continue
        dropped = session.dropped
        write("assistant> ")
        try:
            session.ask(line, on_text=write)
        except KeyboardInterrupt:
            write(" [interrupted]")
        except PromptTooLongError as exc:
            write(f"[chat] {exc}")
        write("\n")
        if session.dropped > dropped:
            write(f"[chat] dropped the {session.dropped - dropped} oldest exchange(s) to fit "
                  f"{session.backend.max_positions} positions\n")
