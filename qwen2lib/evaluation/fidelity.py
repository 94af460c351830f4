"""The fidelity report: how far a candidate (quantized, compiled, fp16) is from the fp32 reference.

One function, reused by notebooks 03, 04 and 05. Both sides are plain callables
``ids (B, T) -> logits (B, T, V)``, so a torch model, a quantized model and an onnxruntime
session wrapper are compared the same way, on the same held-out token blocks.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..model.corpus import heldout_token_blocks
from ..errors import NumericalOverflowError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
REPORT_KEYS = ("max_abs_dlogits", "kld_mean", "kld_ci95", "kld_p99", "top1_agreement", "ppl_reference", "ppl_candidate",
               "ppl_ratio", "tokens")


def logits_fn(model) -> LogitsFn:
    """ids (B, T) -> fp32 logits (B, T, V) of a torch causal LM, no cache: the callable the fidelity report, the
    graphs' verification and the exports' checks compare."""

    @torch.no_grad()
    def run(ids) -> torch.Tensor:
        return model(input_ids=torch.as_tensor(ids), use_cache=False).logits.float()

    return run


def heldout_blocks(tokenizer, n_blocks: int = 8, seq_len: int = 128, seed: int = 0, text: str = "code") -> torch.Tensor:
    """(n_blocks, seq_len) token ids of held-out text: stdlib files the embedded model never trained on ("code"), or
    the READMEs of held-out installed packages ("prose", ``qwen2lib.model.corpus``)."""
    return heldout_token_blocks(tokenizer, n_blocks, seq_len, seed=seed, text=text)


@torch.no_grad()
def fidelity_report(reference: LogitsFn, candidate: LogitsFn, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """Compare two ids -> logits callables on (N, T) token blocks.

    kld_*: per-token KL(reference || candidate) in nats; top1_agreement: share of positions whose
    argmax agrees; ppl_*: next-token perplexity of the blocks themselves under each side. The float64 math runs
    one block at a time: at a 152k vocabulary a block's (T, V) in float64 is already tens of MB per copy.
    kld_ci95: the half-width of a 95% confidence interval of kld_mean, blocks as the sampling unit (tokens within a
    block are not independent); NaN with one block.
    """
    kl_parts, agree, nll_ref, nll_cand, max_abs, positions = [], 0, 0.0, 0.0, 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        ref_batch, cand_batch = reference(batch), candidate(batch)  # (B, T, V)
        if ref_batch.shape != cand_batch.shape:
            raise ValueError(f"reference logits {tuple(ref_batch.shape)} and candidate logits "
                             f"{tuple(cand_batch.shape)} differ in shape")
        if not torch.isfinite(cand_batch).all():
            raise NumericalOverflowError("the candidate's logits hold inf/NaN: an activation overflowed its dtype")
        for row in range(batch.shape[0]):
            ids, ref, cand = batch[row : row + 1], ref_batch[row : row + 1].double(), cand_batch[row : row + 1].double()
            logp_ref, logp_cand = F.log_softmax(ref, -1), F.log_softmax(cand, -1)
            kl_parts.append((logp_ref.exp() * (logp_ref - logp_cand)).sum(-1).flatten())  # (T,)
            agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
            targets = ids[:, 1:, None]
            nll_ref += float(-logp_ref[:, :-1].gather(-1, targets).sum())
            nll_cand += float(-logp_cand[:, :-1].gather(-1, targets).sum())
            max_abs = max(max_abs, float((ref - cand).abs().max()))
            positions += ids.numel()
            del ref, cand, logp_ref, logp_cand
    kl = torch.cat(kl_parts).clamp(min=0)  # tiny negatives are rounding
    per_block = torch.stack([part.clamp(min=0).mean() for part in kl_parts])  # (N,)
    ci95 = float(1.96 * per_block.std() / math.sqrt(len(per_block))) if len(per_block) > 1 else float("nan")
    predicted = blocks[:, 1:].numel()
    ppl_ref, ppl_cand = math.exp(nll_ref / predicted), math.exp(nll_cand / predicted)
    return {
        "max_abs_dlogits": max_abs,
        "kld_mean": float(kl.mean()),
        "kld_ci95": ci95,
        "kld_p99": float(torch.quantile(kl, 0.99)),
        "top1_agreement": agree / positions,
        "ppl_reference": ppl_ref,
        "ppl_candidate": ppl_cand,
        "ppl_ratio": ppl_cand / ppl_ref,
        "tokens": positions,
    }


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|ref|^2 / |ref - cand|^2), in dB (inf when equal)."""
    noise = (reference.double() - candidate.double()).pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(reference.double().pow(2).sum() / noise))


@torch.no_grad()
def per_layer_sqnr(reference_model, candidate_model, blocks: torch.Tensor) -> dict[str, float]:
    """SQNR of every decoder layer's output (the residual stream), candidate vs reference, in dB."""

    def capture(model):
        outputs, hooks = {}, []
        for i, layer in enumerate(model.model.layers):
            def hook(module, args, out, i=i):
                outputs[f"layers.{i}"] = (out[0] if isinstance(out, tuple) else out).detach().float()
            hooks.append(layer.register_forward_hook(hook))
        try:
            model(blocks)
        finally:
            for h in hooks:
                h.remove()
        return outputs

    ref, cand = capture(reference_model), capture(candidate_model)
    return {name: sqnr_db(ref[name], cand[name]) for name in ref}


def fidelity_table(reports: dict[str, dict]):
    """One row per candidate label, the report's keys as columns."""
    import pandas as pd  # heavy and optional: only this function needs it

    return pd.DataFrame.from_dict({label: {k: r.get(k) for k in REPORT_KEYS} for label, r in reports.items()}, orient="index")


def plot_sqnr(sqnr: dict[str, dict[str, float]], ax=None, title: str = "per-layer SQNR vs fp32"):
    """Line per candidate: SQNR (dB) of each decoder layer's output; higher is closer to the reference."""
    import matplotlib.pyplot as plt  # heavy and optional: only this function needs it

    ax = ax or plt.subplots(figsize=(8, 3.2))[1]
    for label, values in sqnr.items():
        ax.plot(range(len(values)), list(values.values()), marker="o", label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(title)
    ax.legend()
    return ax
