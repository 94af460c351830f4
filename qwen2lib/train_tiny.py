"""Train the embedded ``tiny`` model once, offline, on the Python standard library's sources.

The cost at this size is the LM head: 151,936 vocabulary rows against a 128-wide body. The loss is
computed *exactly* over a much smaller softmax: the ``n_present`` most frequent training tokens keep
their own (tied) embedding rows, and every other row of the vocabulary shares one trained vector
``u``. With all those rows equal, the full-vocabulary partition function is

    Z = sum_{v in present} exp(h . e_v) + (V - n_present) * exp(h . u)

so the full 151,936-way cross-entropy is a (n_present + 1)-way one plus log(V - n_present) for
targets outside the present set. At save time the shared vector is written into every other row:
the checkpoint is a normal Qwen2 that transformers loads, and its full-vocabulary perplexity is
exactly the one trained here.
"""
from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .corpus import blocks, heldout_token_blocks, stdlib_corpus, token_stream
from .registry import TINY_CONFIG

RECIPE = dict(
    seed=0,
    train_tokens=2_400_000,  # tokenized from the train files (about the whole selection)
    block_len=256,
    batch_size=16,
    steps=500,
    lr=5e-3,
    warmup_steps=30,
    weight_decay=0.05,
    n_present=8192,  # rows trained individually; they cover ~96% of training tokens
    heldout_blocks=48,
    threads=2,  # fixed: the reduction order, and so the exact weights, depend on the thread count
)


def _lr_at(step: int, recipe: dict) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < recipe["warmup_steps"]:
        return recipe["lr"] * (step + 1) / recipe["warmup_steps"]
    progress = (step - recipe["warmup_steps"]) / max(1, recipe["steps"] - recipe["warmup_steps"])
    return recipe["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def exact_restricted_loss(hidden: torch.Tensor, targets: torch.Tensor, present_rows: torch.Tensor,
                          shared_row: torch.Tensor, slot_of: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary cross-entropy when every row outside ``present_rows`` equals ``shared_row``.

    hidden (N, D); targets (N,) vocabulary ids; present_rows (P, D); shared_row (D,);
    slot_of (V,) maps a vocabulary id to its present slot, or P for "any other token".
    """
    n_other = vocab_size - present_rows.shape[0]
    logits = torch.cat([hidden @ present_rows.T, (hidden @ shared_row)[:, None] + math.log(n_other)], dim=1)  # (N, P+1)
    slots = slot_of[targets]
    penalty = (slots == present_rows.shape[0]).float() * math.log(n_other)  # the target is one of n_other equals
    return (F.cross_entropy(logits, slots, reduction="none") + penalty).mean()


@torch.no_grad()
def heldout_perplexity(model, heldout: torch.Tensor, batch: int = 8) -> float:
    """Full 151,936-way perplexity of a transformers causal LM on (N, T) held-out blocks."""
    total, count = 0.0, 0
    for start in range(0, heldout.shape[0], batch):
        ids = heldout[start : start + batch]
        logits = model(ids).logits[:, :-1].float()  # (B, T-1, V)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def train_tiny(out_dir: Path, *, progress: bool = True, max_minutes: float = 20.0, **overrides) -> dict:
    """Train, save a transformers checkpoint + tokenizer + ``model_card.json`` into ``out_dir``; return the card.

    ``overrides`` change the recipe (tests use a few steps on a few files). A fixed step budget, not
    the clock, ends training, so two builds on one machine give the same weights; ``max_minutes``
    only aborts a machine far slower than planned.
    """
    import tokenizers
    import transformers
    from tqdm.auto import tqdm
    from transformers import Qwen2ForCausalLM

    from .registry import resolve
    from .tokenizer import load_tokenizer

    recipe = {**RECIPE, **overrides}
    unknown = set(overrides) - set(RECIPE)
    if unknown:
        raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(RECIPE)}")
    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe["threads"])
    torch.manual_seed(recipe["seed"])
    try:
        tokenizer = load_tokenizer("tiny")
        corpus = stdlib_corpus(seed=0)
        train_stream = token_stream(corpus, corpus.train_files, tokenizer, recipe["train_tokens"], seed=recipe["seed"])
        train_blocks = blocks(train_stream, recipe["block_len"] + 1)  # +1: inputs and shifted targets
        heldout = heldout_token_blocks(tokenizer, recipe["heldout_blocks"], recipe["block_len"])

        config = resolve("tiny").hf_config()
        V = config.vocab_size
        ids, counts = train_stream.unique(return_counts=True)
        present = ids[counts.argsort(descending=True, stable=True)][: recipe["n_present"]].sort().values  # (P,)
        P = present.numel()
        slot_of = torch.full((V,), P, dtype=torch.long)  # vocabulary id -> its own slot, or P (the shared row)
        slot_of[present] = torch.arange(P)
        # Train a twin whose vocabulary is the P slots plus the shared row: the same network, a small table.
        small_config = resolve("tiny").hf_config()
        small_config.vocab_size = P + 1
        small = Qwen2ForCausalLM(small_config)  # seeded init
        small.config._attn_implementation = "sdpa"
        table = small.model.embed_tokens.weight  # (P + 1, D); tied with the LM head
        decay = [p for n, p in small.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in small.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe["lr"], betas=(0.9, 0.95),
        )
        slot_blocks = slot_of[train_blocks]  # inputs of other ids read the shared row, as they will once saved
        generator = torch.Generator().manual_seed(recipe["seed"])
        start, loss_value, tokens_seen = time.perf_counter(), float("nan"), 0
        bar = tqdm(range(recipe["steps"]), desc="training tiny", disable=not progress)
        small.train()
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, recipe)
            rows = torch.randint(0, train_blocks.shape[0], (recipe["batch_size"],), generator=generator)
            hidden = small.model(input_ids=slot_blocks[rows, :-1]).last_hidden_state  # (B, T, D)
            loss = exact_restricted_loss(hidden.reshape(-1, hidden.shape[-1]), train_blocks[rows, 1:].reshape(-1),
                                         table[:P], table[P], slot_of, V)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(small.parameters(), 1.0)
            optimizer.step()
            loss_value, tokens_seen = loss.item(), tokens_seen + rows.numel() * recipe["block_len"]
            if step == 0:
                first_loss = loss_value
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if time.perf_counter() - start > max_minutes * 60:
                raise RuntimeError(
                    f"training tiny took over {max_minutes} minutes at step {step}/{recipe['steps']}: this machine is far "
                    "slower than planned; set QWEN2LIB_CACHE to a folder with a prebuilt tiny model or use 'tiny-random'"
                )
        train_seconds = time.perf_counter() - start
        # Expand to the full vocabulary: each present id gets its slot's row, every other id the shared row.
        model = Qwen2ForCausalLM(config).eval()
        state = {k: v for k, v in small.state_dict().items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}
        state["model.embed_tokens.weight"] = table.detach()[slot_of].clone()  # (V, D)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.tie_weights()
        perplexity = heldout_perplexity(model, heldout)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        card = {
            "name": "tiny",
            "config": {k: v for k, v in TINY_CONFIG.items()},
            "corpus": corpus.summary(),
            "recipe": recipe,
            "steps": recipe["steps"],
            "tokens_seen": tokens_seen,
            "train_tokens_available": int(train_stream.numel()),
            "present_vocabulary_rows": P,
            "first_train_loss": first_loss,
            "final_train_loss": loss_value,
            "heldout_perplexity": perplexity,
            "heldout_tokens": int(heldout[:, 1:].numel()),
            "train_seconds": round(train_seconds, 1),
            "seed": recipe["seed"],
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        }
        (out_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        return card
    finally:
        torch.set_num_threads(threads)
