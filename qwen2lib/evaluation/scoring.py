"""The prompts of OpenCompass's PPL configs and the two ways of answering them: PPL and greedy generation.

Prompts, per set, for a base model with no meta template (the texts are the configs' own):

  ceval  ``ceval_ppl_578f8d``: HUMAN "以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n{question}\\n
         A. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案: ", BOT "{answer}"
  cmmlu  ``cmmlu_ppl_8b9c76``: HUMAN "以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n题目：{question}\\n
         A. {A}\\n...\\nD. {D}", BOT "答案是: {answer}"
  mmlu   ``mmlu_ppl_ac766d``: "The following are multiple choice questions (with answers) about  {subject}.\\n\\n",
         then each dev example "{question}\\nA. {A}\\n...\\nD. {D}\\nAnswer: {answer}\\n" followed by "\\n",
         then the question with "Answer: {candidate}"

The HUMAN/BOT configs have no meta template to render their roles, so OpenCompass joins every turn of the
in-context examples and of the question with a newline. ``prompt`` is the text up to the answer letter;
the candidate is ``prompt + letter``.

PPL: OpenCompass takes the mean loss over each whole candidate text; here only the tokens after the shared
prompt are scored. The four texts differ in the one-token letter only, so both pick the same option, and
scoring the continuation lets one forward pass over the shared prefix score all four.
Gen: greedy continuation of the same prompt (trailing spaces dropped, as a tokenizer would not end a
prompt on one) and the first capital letter of the output is the answer, as OpenCompass's
``first_capital_postprocess`` reads it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .datasets import CHOICES

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _options(row: dict) -> str:
    return "\n".join(f"{c}. {row[c]}" for c in CHOICES)


def _ceval_turns(name: str, row: dict) -> tuple[str, str]:
    return f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n{row['question']}\n{_options(row)}\n答案: ", ""


def _cmmlu_turns(name: str, row: dict) -> tuple[str, str]:
    return f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n题目：{row['question']}\n{_options(row)}", "答案是: "


def build_prompt(dataset: str, name: str, shots: Sequence[dict], row: dict) -> str:
    """The text before the candidate letter: ``shots`` solved dev examples, then ``row``."""
    if dataset == "mmlu":
        examples = "".join(f"{s['question']}\n{_options(s)}\nAnswer: {s['answer']}\n\n" for s in shots)
        return (f"The following are multiple choice questions (with answers) about  {name}.\n\n"
                f"{examples}{row['question']}\n{_options(row)}\nAnswer: ")
    turns = _ceval_turns if dataset == "ceval" else _cmmlu_turns
    pieces = []
    for shot in shots:
        human, bot = turns(name, shot)
        pieces += [human, bot + shot["answer"]]
    human, bot = turns(name, row)
    return "\n".join(pieces + [human]) + "\n" + bot


# ---- PPL ----------------------------------------------------------------------------------------

def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def continuation_ce(logits_fn: LogitsFn, context_ids: list[int], candidates: list[list[int]]) -> list[float]:
    """Mean cross-entropy of each candidate's tokens after the context.

    ``candidates`` are whole tokenisations (context + answer): the answer's first token can merge
    with the context's last, so a candidate's continuation starts where it stops agreeing with
    the context's own tokenisation.
    """
    starts = [max(1, _common_prefix(context_ids, c)) for c in candidates]
    if any(s >= len(c) for s, c in zip(starts, candidates)):
        raise ValueError("a candidate adds no tokens to the context")
    shared = min(_common_prefix(candidates[0], c) for c in candidates)
    first = min(starts) - 1  # logits before this row predict no continuation token: skip their softmax
    if all(len(c) == shared + 1 for c in candidates):
        # They differ in the last token only: one pass over the shared prefix scores all of them.
        logits = logits_fn(torch.tensor([candidates[0][:shared]]))[0, first:]  # (shared - first, V)
        rows = [F.log_softmax(logits.float(), -1)] * len(candidates)
    else:
        rows = [F.log_softmax(logits_fn(torch.tensor([c]))[0, first:].float(), -1) for c in candidates]
    scores = []
    for c, s, logp in zip(candidates, starts, rows):
        targets = torch.tensor(c[s:])
        scores.append(float(-logp[s - 1 - first:len(c) - 1 - first].gather(-1, targets[:, None]).mean()))
    return scores


@torch.no_grad()
def score_ppl(logits_fn: LogitsFn, tokenizer, prompt: str, choices: Sequence[str] = CHOICES) -> dict:
    """{"ce": [mean CE per choice], "prediction": the lowest-CE choice}."""
    context_ids = tokenizer.encode(prompt, add_special_tokens=False)
    candidates = [tokenizer.encode(prompt + c, add_special_tokens=False) for c in choices]
    ce = continuation_ce(logits_fn, context_ids, candidates)
    return {"ce": ce, "prediction": choices[min(range(len(ce)), key=ce.__getitem__)]}


# ---- gen ----------------------------------------------------------------------------------------

def first_capital(text: str) -> str | None:
    return next((ch for ch in text if ch.isupper()), None)


@torch.no_grad()
def score_gen(logits_fn: LogitsFn, tokenizer, prompt: str, max_new_tokens: int = 8, stop_ids=()) -> dict:
    """{"output": greedy continuation, "prediction": its first capital letter or None}.

    A plain loop over the ``ids -> logits`` callable, so every backend answers the same way; it stops
    at the first capital letter (the answer is decided) or an end token.
    """
    ids = tokenizer.encode(prompt.rstrip(" "), add_special_tokens=False)
    new: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        token = int(logits_fn(torch.tensor([ids + new]))[0, -1].float().argmax())
        if token in stop_ids:
            break
        new.append(token)
        text = tokenizer.decode(new)
        if first_capital(text):
            break
    return {"output": text, "prediction": first_capital(text)}
