"""Multiple-choice accuracy the OpenCompass way: C-Eval, CMMLU and MMLU from their published files.

``datasets``: which set a path holds and its rows; ``subjects``: subject tables and category averages;
``scoring``: the configs' prompts, PPL and gen answering; ``runner``: resumable scoring and the stage table.
``qwen2lib.evaluation.accuracy`` holds the command line, perplexity and the offline stand-in.
"""
from .datasets import DATASETS, EvalDataError, open_benchmark
from .runner import accuracy_table, evaluate_benchmark

__all__ = ["DATASETS", "EvalDataError", "accuracy_table", "evaluate_benchmark", "open_benchmark"]
