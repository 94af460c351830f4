"""How a compiled graph is checked before it is installed: against the torch model it was built from.

``decode_parity`` compares the graph's prefill and cached decode steps with the reference run without a cache on
the same tokens; ``fidelity`` is the fidelity report (``qwen2lib.evaluation.fidelity``) of the graph on held-out text;
``check_bounds`` names the bounds of a config's ``verify`` section a graph misses. Before an fp16 graph is built,
``activation_ranges`` and ``fp16_plan`` find what fp16 could not hold. Each takes the reference and the tokens as
arguments; where they come from (the deploy package streamed or loaded, held-out text) is ``reference.py``.
"""
from __future__ import annotations

import numpy as np
import torch

from .config_schema import VerifyConfig
from ..errors import NumericalOverflowError
from ..evaluation.fidelity import fidelity_report
from .plan import FP16_MAX
from .runtime import OnnxCausalLM, check_finite


def decode_parity(reference, lm: OnnxCausalLM, prompt: torch.Tensor, steps: int) -> dict:
    """Graph prefill + ``steps`` cached greedy decode steps vs the reference on the same tokens (no cache).

    Returns max |dlogits| over the prompt positions, over the decode steps and overall, per position,
    and the share of greedy tokens that agree.
    """
    logits, state = lm.prefill(prompt.numpy())
    check_finite(logits, state.past, "prefill")
    seq = prompt[0].tolist()
    first = len(seq) - logits.shape[1]
    rows = {first + t: logits[0, t] for t in range(logits.shape[1])}
    for _ in range(steps):
        seq.append(int(np.argmax(logits[0, -1])))
        logits, state = lm.decode([[seq[-1]]], state)
        check_finite(logits, state.past, f"decode step at position {len(seq) - 1}")
        rows[len(seq) - 1] = logits[0, -1]
    ref = reference(torch.tensor([seq]))[0].numpy()  # (N, V)
    P = prompt.shape[1]
    diff = {pos: float(np.abs(row - ref[pos]).max()) for pos, row in rows.items()}
    prompt_d = [d for p, d in diff.items() if p < P]
    decode_d = [d for p, d in diff.items() if p >= P]
    agree = sum(int(np.argmax(rows[p]) == np.argmax(ref[p])) for p in rows if p >= P - 1)
    return {"max_abs_dlogits": max(diff.values()), "max_abs_dlogits_prompt": max(prompt_d),
            "max_abs_dlogits_decode": max(decode_d) if decode_d else None, "prompt_tokens": P, "decode_steps": steps,
            "greedy_agreement": agree / sum(1 for p in rows if p >= P - 1),
            "per_position": [diff[p] for p in sorted(diff)]}  # max |dlogits| at each compared position


def fidelity(reference, candidate, blocks: torch.Tensor) -> dict:
    """The fidelity report (``qwen2lib.evaluation.fidelity``) of a candidate ids -> logits callable; a candidate
    that emits inf/NaN raises NumericalOverflowError instead of producing NaN figures."""
    unchecked = candidate

    def candidate(ids):
        out = unchecked(ids)
        if not torch.isfinite(out).all():
            raise NumericalOverflowError("the compiled graph's logits on the held-out blocks hold inf/NaN: an "
                                         "activation overflowed its dtype")
        return out

    report = fidelity_report(reference, candidate, blocks)
    report = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    return {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in report.items()
            if not isinstance(v, (torch.Tensor, np.ndarray, list))}


# ---- fp16 range probe --------------------------------------------------------------------------

@torch.no_grad()
def activation_ranges(hf_model, blocks: torch.Tensor) -> dict[str, float]:
    """Largest |activation| of every tensor fp16 would hold, on the probe text, in the fp32 reference.

    Keys: ``embed_tokens``, ``layers.{i}.residual`` (the stream after block i), ``layers.{i}.{q,k,v,o}_proj``,
    ``layers.{i}.{gate,up,down}_proj``, ``layers.{i}.act`` (input of down_proj), ``lm_head``.
    """
    ranges: dict[str, float] = {}
    hooks = []

    def record(key):
        def hook(_module, inputs, output):
            t = output[0] if isinstance(output, tuple) else output
            ranges[key] = max(ranges.get(key, 0.0), float(t.detach().abs().max()))
        return hook

    def record_input(key):
        def hook(_module, inputs):
            ranges[key] = max(ranges.get(key, 0.0), float(inputs[0].detach().abs().max()))
        return hook

    base = hf_model.model
    hooks.append(base.embed_tokens.register_forward_hook(record("embed_tokens")))
    for i, layer in enumerate(base.layers):
        hooks.append(layer.register_forward_hook(record(f"layers.{i}.residual")))
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hooks.append(getattr(layer.self_attn, n).register_forward_hook(record(f"layers.{i}.{n}")))
        for n in ("gate_proj", "up_proj", "down_proj"):
            hooks.append(getattr(layer.mlp, n).register_forward_hook(record(f"layers.{i}.{n}")))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(record_input(f"layers.{i}.act")))
        # the residual after attention (before the MLP adds to it) is the post-attention norm's input
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(record_input(f"layers.{i}.residual_mid")))
    hooks.append(hf_model.lm_head.register_forward_hook(record("lm_head")))
    try:
        hf_model(input_ids=blocks, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return ranges


def fp16_plan(ranges: dict[str, float], headroom: float, on_overflow: str) -> tuple[frozenset, dict]:
    """Which parts must run in fp32 for an fp16 graph; raises NumericalOverflowError when asked to, or
    when the part cannot be kept (queries/keys/values feed the fp16 attention and KV cache)."""
    limit = FP16_MAX / headroom
    over = {k: v for k, v in ranges.items() if v > limit}
    keep, fatal = set(), []
    for key in over:
        parts = key.split(".")
        if key == "embed_tokens" or parts[-1] in ("residual", "residual_mid"):
            keep.add("residual")
        elif key == "lm_head":
            keep.add("lm_head")
        elif parts[-1] == "o_proj":
            keep.update({f"layers.{parts[1]}.attention", "residual"})
        elif parts[-1] in ("q_proj", "k_proj", "v_proj"):
            fatal.append(key)
        else:  # gate/up/down/act
            keep.update({f"layers.{parts[1]}.mlp", "residual"})
    listing = ", ".join(f"{k} reaches {v:.3g}" for k, v in sorted(over.items(), key=lambda kv: -kv[1]))
    if fatal:
        raise NumericalOverflowError(
            f"fp16 cannot hold {', '.join(fatal)} (largest |activation| > 65504/{headroom:g} on the probe text: "
            f"{listing}); these feed the fp16 attention and KV cache. Compile with qwen2_fp32.yaml or qwen2_int8.yaml")
    if over and on_overflow == "error":
        raise NumericalOverflowError(
            f"fp16 would overflow: {listing} (limit 65504/{headroom:g} = {limit:.0f}; bf16-trained checkpoints "
            "often exceed fp16's range). Set fp16.on_overflow: keep_fp32 to run those parts in fp32, "
            "or compile with qwen2_fp32.yaml")
    report = {"limit": limit, "largest": dict(sorted(ranges.items(), key=lambda kv: -kv[1])[:8]),
              "over_limit": over, "kept_in_fp32": sorted(keep)}
    return frozenset(keep), report


def check_bounds(bounds: VerifyConfig, parity: dict, fid: dict, random_weights: bool = False) -> list[str]:
    """Bounds of a config's ``verify`` section that the graph misses.

    Random weights (``weights=random``) keep only the parity bound (an fp32 graph must still equal its reference):
    their near-flat logits make which token wins a coin toss, and an untrained model amplifies rounding layer after
    layer until a quantized model's logits say nothing of its quality (a 7B W8A16 package measures KLD 0.015 against
    the int8 configs' 0.01, a 4-bit one loses top-1 entirely), so KLD, top-1 agreement and perplexity are reported,
    not bounded. Non-finite logits fail whatever the weights (``check_finite``)."""
    failures = []
    # written as "not <=" so that a NaN figure fails its bound
    if bounds.max_abs_dlogits is not None and not parity["max_abs_dlogits"] <= bounds.max_abs_dlogits:
        failures.append(f"parity max |dlogits| {parity['max_abs_dlogits']:.3g} > verify.max_abs_dlogits "
                        f"{bounds.max_abs_dlogits:g}")
    if random_weights:
        return failures
    if bounds.max_kld_mean is not None and not fid["kld_mean"] <= bounds.max_kld_mean:
        failures.append(f"kld_mean {fid['kld_mean']:.3g} > verify.max_kld_mean {bounds.max_kld_mean:g}")
    if bounds.min_top1_agreement is not None and not fid["top1_agreement"] >= bounds.min_top1_agreement:
        failures.append(f"top1_agreement {fid['top1_agreement']:.4f} < verify.min_top1_agreement "
                        f"{bounds.min_top1_agreement:g}")
    if bounds.max_ppl_ratio is not None and not fid["ppl_ratio"] <= bounds.max_ppl_ratio:
        failures.append(f"ppl_ratio {fid['ppl_ratio']:.4f} > verify.max_ppl_ratio {bounds.max_ppl_ratio:g}")
    return failures
