"""Proof that a deploy package computes what upstream transformers computes, and what ``insert_slice`` saves."""
from __future__ import annotations

import os
import statistics
import time

import pandas as pd
import torch
from transformers import DynamicCache, Qwen2ForCausalLM

from ..model.loading import parse_dtype
from .package import load_deploy_package, record_metrics


def load_reference(checkpoint_dir: str | os.PathLike, dtype: str | torch.dtype = torch.float32,
                   attention: str = "eager"):
    """Upstream ``Qwen2ForCausalLM`` from the checkpoint folder."""
    model = Qwen2ForCausalLM.from_pretrained(
        str(checkpoint_dir), local_files_only=True, dtype=parse_dtype(dtype), attn_implementation=attention
    )
    return model.eval()


def as_batch(prompt_ids) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty 1D or (1, T) sequence of token ids, not shape {tuple(ids.shape)}")
    return ids


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def compare_prompt_logits(patched, reference, prompt: torch.Tensor) -> dict:
    ours = patched(prompt, past_key_values=[]).logits
    theirs = reference(prompt, use_cache=False).logits
    figures = {"last_position_logits_max_abs_diff": max_abs_diff(ours[:, -1], theirs[:, -1]),
               "reference_logits_absmax": theirs.float().abs().max().item()}
    if ours.shape == theirs.shape:  # insert_slice off: every position
        figures["prompt_logits_max_abs_diff"] = max_abs_diff(ours, theirs)
    return figures


def compare_cached_decode(patched, reference, prompt: torch.Tensor, decode_steps: int) -> dict:
    """Greedy decode with upstream's DynamicCache and the package's explicit tensors, same tokens fed to both."""
    theirs = reference(prompt, cache=DynamicCache(config=reference.config), use_cache=True)
    ours = patched(prompt, past_key_values=[])
    worst = 0.0
    for _ in range(decode_steps):
        next_token = theirs.logits[:, -1:].argmax(-1)  # the reference chooses, so one tie cannot fork the paths
        theirs = reference(next_token, cache=theirs.cache, use_cache=True)
        ours = patched(next_token, past_key_values=ours.presents)
        worst = max(worst, max_abs_diff(ours.logits[:, -1], theirs.logits[:, -1]))
    return {"decode_logits_max_abs_diff": worst}


def compare_generate(patched, reference, prompt: torch.Tensor, decode_steps: int) -> dict:
    """HF generate() (DynamicCache path) on both: the same greedy tokens."""
    settings = dict(max_new_tokens=decode_steps, do_sample=False, attention_mask=torch.ones_like(prompt))
    ours = patched.generate(prompt, **settings)
    theirs = reference.generate(prompt, **settings)
    return {
        "generate_tokens_equal": bool(torch.equal(ours, theirs)),
        "generated_tokens": int(theirs.shape[1] - prompt.shape[1]),
    }


def prove_package(
    package_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    prompt_ids,
    decode_steps: int = 16,
    *,
    dtype: str | torch.dtype = "float32",
    reference_attention: str = "eager",
    tolerance: float = 1e-5,
    record: bool = True,
) -> dict:
    """Compare the package with upstream ``Qwen2ForCausalLM`` on the same checkpoint.

    Logits over the prompt (only the last position when the package has insert_slice on), then
    ``decode_steps`` cached greedy steps (upstream DynamicCache vs the package's explicit tensors),
    then ``generate``. Returns max abs differences, passed when each is within ``bound`` = ``tolerance`` x the
    reference logits' largest magnitude (at least 1); with ``record`` they go into the package's metrics.json
    under "proof". The reference runs eager attention by default, the same algorithm, so any difference
    comes from the patches and not from a kernel choice.
    """
    prompt = as_batch(prompt_ids)
    patched = load_deploy_package(package_dir, dtype)
    reference = load_reference(checkpoint_dir, dtype, reference_attention)
    with torch.inference_mode():
        proof = {
            "dtype": str(parse_dtype(dtype)).removeprefix("torch."),
            "reference_attention": reference_attention,
            "insert_slice": bool(getattr(patched.config, "insert_slice", False)),
            "prompt_tokens": int(prompt.shape[1]),
            "decode_steps": decode_steps,
            **compare_prompt_logits(patched, reference, prompt),
            **compare_cached_decode(patched, reference, prompt, decode_steps),
            **compare_generate(patched, reference, prompt, decode_steps),
        }
    differences = [v for k, v in proof.items() if k.endswith("_max_abs_diff")]
    # the same algorithm in another summation order (one row of the head instead of T, a cached step) leaves
    # rounding that grows with the logits' size, so the bound is relative to it; a patch bug moves logits by units
    proof["tolerance"] = tolerance
    proof["bound"] = tolerance * max(1.0, proof["reference_logits_absmax"])
    proof["passed"] = max(differences) <= proof["bound"] and proof["generate_tokens_equal"]
    if record:
        record_metrics(package_dir, "proof", proof)
    return proof


# ---- insert_slice: what it saves -------------------------------------------------------------


def lm_head_flops(tokens: int, hidden_size: int, vocab_size: int) -> int:
    # one multiply and one add per weight per token
    return 2 * tokens * hidden_size * vocab_size


def time_prefill(model, prompt: torch.Tensor, repeats: int) -> float:
    """Median seconds of one explicit-cache prefill (after one warm-up call)."""
    with torch.inference_mode():
        model(prompt, past_key_values=[])
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(prompt, past_key_values=[])
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_insert_slice(
    package_dir: str | os.PathLike,
    prompt_tokens: int = 512,
    *,
    repeats: int = 3,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    record: bool = True,
) -> dict:
    """Prefill time and lm_head FLOPs for a ``prompt_tokens`` prompt with insert_slice off and on.

    lm_head FLOPs: 2 * T * hidden * vocab without the slice, 2 * hidden * vocab with it. The same loaded
    model is timed both ways (config.insert_slice is read at call time), on seeded random token ids.
    """
    model = load_deploy_package(package_dir, dtype)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    prompt = torch.randint(vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    seconds = {}
    for insert_slice in (False, True):
        model.config.insert_slice = insert_slice
        seconds[insert_slice] = time_prefill(model, prompt, repeats)
    figures = {
        "prompt_tokens": prompt_tokens,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "torch_threads": torch.get_num_threads(),
        "prefill_ms_without_slice": 1000 * seconds[False],
        "prefill_ms_with_slice": 1000 * seconds[True],
        "prefill_speedup": seconds[False] / seconds[True],
        "lm_head_flops_without_slice": lm_head_flops(prompt_tokens, hidden, vocab),
        "lm_head_flops_with_slice": lm_head_flops(1, hidden, vocab),
    }
    if record:
        record_metrics(package_dir, "insert_slice", figures)
    return figures


def insert_slice_table(figures: dict):
    """The measure_insert_slice figures as a two-row pandas DataFrame."""
    rows = []
    for label, suffix in (("off", "without_slice"), ("on", "with_slice")):
        rows.append({
            "insert_slice": label,
            "prompt tokens": figures["prompt_tokens"],
            "logit rows": figures["prompt_tokens"] if label == "off" else 1,
            "lm_head GFLOPs": figures[f"lm_head_flops_{suffix}"] / 1e9,
            "prefill ms": figures[f"prefill_ms_{suffix}"],
        })
    return pd.DataFrame(rows)


