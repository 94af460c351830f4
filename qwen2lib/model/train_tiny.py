"""Train the embedded ``tiny`` model once, offline, on the Python standard library's sources.

This is the recipe that produced the weights shipped in ``qwen2lib/model/tiny_shipped/`` (``qwen2lib.model.tiny``
expands them on first use; nothing trains then). ``qwen2lib train-tiny --write-shipped`` reruns it in full and
rewrites that file; ``recipe_hash`` (the recipe, the architecture and this module's source) is recorded with it, and
a test fails when they no longer match, so a changed recipe cannot leave the old model in place unnoticed.

Why the loss is cheap and still exact
-------------------------------------
At this size the cost is the LM head: 151,936 vocabulary rows against a 128-wide body. Training
gives the ``n_own_rows`` most frequent training tokens their own (tied) embedding rows and splits
every other vocabulary id into *bands* (rarer and rarer training tokens, then the ids the training
text never contains, each split by what its tokens look like: ' Interactive' is a space+capitalised
id, '_mock' a punctuation+lowercase one); all ids of band k share one trained vector ``u_k``. With the rows of
a band equal, the full-vocabulary partition function is

    Z = sum_{own v} exp(h . e_v) + sum_k n_k * exp(h . u_k)

so the full 151,936-way cross-entropy is an (n_own_rows + K)-way one over "slots", with log(n_k)
added to band k's logit and, for a target in band k, log(n_k) added to its loss (the target is one
of n_k equal ids). At save time each band vector is copied into all of its rows: the checkpoint is
a normal Qwen2 that transformers loads, and its full-vocabulary perplexity is the one trained here.

Determinism: a fixed step budget (not the clock) ends training, the thread count is fixed, every
random draw comes from seeded generators, so two builds on one machine write the same bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers import Qwen2ForCausalLM, Qwen2Model

from .corpus import blocks, heldout_token_blocks, stdlib_corpus, token_stream
from .registry import TINY_CONFIG, resolve
from .tokenizer import load_tokenizer

# The experiments behind these choices, with their held-out perplexities: benchmarks/README.md ("The embedded model").
RECIPE = dict(
    steps=1100,  # fixed, not the clock: what fits the time budget on 2 cores, below the bar of perplexity 100
    batch_size=16,
    block_len=256,
    lr=2e-3,
    warmup_steps=30,
    decay_fraction=0.3,  # warm-up, constant, then linear decay to 0 over the last 30% of steps
    weight_decay=0.1,
    n_own_rows=4096,  # most frequent training tokens with their own embedding row
    band_edges=(8192, 16384),  # frequency ranks where the shared-row bands of the rarer training tokens end
    unseen_band="rarest",  # ids the training text lacks share the rarest band's row ("own": a band of their own)
    split_bands_by="surface",  # each band split by what its tokens look like (surface_classes); None: no split
    autocast="bfloat16",  # matmuls in bf16 on CPUs that have it (faster steps); "float32": none
    train_tokens=None,  # tokenize only this many (None: as many as the steps will read, at most all)
    max_train_files=None,  # use only the first N train files of the seeded order (tests)
    heldout_blocks=48,
    heldout_block_len=256,
    threads=2,  # fixed: the reduction order, and so the exact weights, depend on the thread count
)
# The card records this many first losses exactly: a short rerun of the recipe must reproduce them (the tests rerun
# the first few; all 25 make the card's first loss-curve point, a check of the record itself).
EARLY_LOSS_STEPS = 25


def recipe_hash(recipe: dict | None = None) -> str:
    """sha256 of what decides the weights besides the corpus text (the card records its sha256 apart): the recipe,
    the architecture and this module's source, so any edit here asks for a retrain of the shipped model."""
    recipe = RECIPE if recipe is None else recipe
    source = Path(__file__).read_text(encoding="utf-8")  # universal newlines: a CRLF checkout hashes the same
    text = json.dumps({"recipe": jsonable(recipe), "config": dict(TINY_CONFIG), "train_tiny.py": source},
                      sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def jsonable(recipe: dict) -> dict:
    """The recipe as JSON writes it (tuples as lists), for the card and the hash alike."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()}


def lr_at(step: int, recipe: dict) -> float:
    """Linear warm-up, constant, then linear decay to zero (short runs end lower than with cosine)."""
    steps, warmup = recipe["steps"], recipe["warmup_steps"]
    if step < warmup:
        return recipe["lr"] * (step + 1) / warmup
    decay_start = steps - int(recipe["decay_fraction"] * steps)
    if step < decay_start:
        return recipe["lr"]
    return recipe["lr"] * (steps - step) / max(1, steps - decay_start)


# ---- the vocabulary as slots -------------------------------------------------------------------------

def vocabulary_slots(train_stream: torch.Tensor, vocab_size: int, n_own_rows: int, band_edges=(),
                     unseen_band: str = "rarest", classes: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Map every vocabulary id to a slot: its own row, or the band it shares one row with.

    Training ids are ranked by count (ties by id); ranks below ``n_own_rows`` get slots 0..P-1 in id
    order, ranks in [n_own_rows, band_edges[0]), [band_edges[0], band_edges[1]), ... one band each,
    the remaining training ids one more, and ids absent from training the last band.
    ``classes`` (V,) splits every band further by class (``surface_classes``: what a token looks like);
    a part that no training token falls in joins its band's largest part, so every slot is some target.
    Returns slot_of (V,), the number P of own rows, and band_sizes (K,) with every band non-empty.
    """
    ids, counts = train_stream.unique(return_counts=True)  # ids sorted ascending
    ranked = ids[torch.sort(counts, descending=True, stable=True).indices]  # (S,) most frequent first
    own = ranked[:n_own_rows].sort().values
    slot_of = torch.full((vocab_size,), -1, dtype=torch.long)
    slot_of[own] = torch.arange(own.numel())
    edges = [e for e in band_edges if n_own_rows < e < ranked.numel()] + [ranked.numel()]
    bands, start = [], own.numel()
    for end in edges:
        if end > start:
            bands.append(ranked[start:end])
            start = end
    unseen = (slot_of == -1)
    unseen[ranked] = False
    unseen_ids = unseen.nonzero().flatten()
    if unseen_band == "rarest" and bands:
        # A band of ids no training target belongs to would learn probability ~0, and an unseen id in
        # held-out text would then cost ~20 nats. Sharing the rarest band's row prices it like a token
        # seen once or twice: the Good-Turing view that unseen mass is about the mass of the rarest.
        bands[-1] = torch.cat([bands[-1], unseen_ids])
    elif unseen_band in ("own", "rarest"):
        bands.append(unseen_ids)
    else:
        raise ValueError(f"unseen_band={unseen_band!r}: 'rarest' or 'own'")
    if classes is not None:
        seen = torch.zeros(vocab_size, dtype=torch.bool)
        seen[ids] = True
        bands = [part for band in bands if band.numel() for part in split_by_class(band, classes, seen)]
    band_sizes = []
    for k, members in enumerate(b for b in bands if b.numel()):
        slot_of[members] = own.numel() + k
        band_sizes.append(members.numel())
    assert (slot_of >= 0).all()
    return slot_of, own.numel(), torch.tensor(band_sizes, dtype=torch.long)


def split_by_class(band: torch.Tensor, classes: torch.Tensor, seen: torch.Tensor) -> list[torch.Tensor]:
    """A band's ids grouped by class, in class order; parts with no id ``seen`` (V,) in training join the largest."""
    parts = [band[classes[band] == c] for c in classes[band].unique().tolist()]
    kept = [part for part in parts if seen[part].any()]
    orphans = [part for part in parts if not seen[part].any()]
    if not kept:
        return [band]
    if orphans:
        largest = max(range(len(kept)), key=lambda i: kept[i].numel())
        kept[largest] = torch.cat([kept[largest], *orphans])
    return kept


# What a byte-level BPE token looks like: 'Ġ' is a leading space, 'Ċ' a newline, 'ĉ' a tab.
_SURFACE_BODIES = (("lower", r"[a-z]+"), ("capitalised", r"[A-Z][a-z]+"), ("upper", r"[A-Z]+"), ("digits", r"[0-9]+"))


def surface_class(token: str | None) -> str:
    """A coarse class of a token string: non-ASCII, or (leading space / punctuation / none) x letter shape."""
    if token is None or not all(33 <= ord(c) <= 126 or c in "ĠĊĉ" for c in token):
        return "non-ascii"
    lead = "space" if token[0] == "Ġ" else "punct" if not token[0].isalnum() else "none"
    body = token.lstrip("Ġ") if lead == "space" else token[1:] if lead == "punct" else token
    shape = next((name for name, pattern in _SURFACE_BODIES if re.fullmatch(pattern, body)), "mixed")
    return f"{lead}+{shape}"


def surface_classes(tokenizer, vocab_size: int) -> torch.Tensor:
    """(V,) class index of every vocabulary id (ids past the tokenizer's, i.e. padding rows, are non-ASCII).

    A band of rare tokens priced by class is a class-based language model's prior: an unseen
    ' Interactive' is then one of ~11k space+capitalised ids, not one of 135k ids of any script.
    """
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
    names = [surface_class(t) for t in tokens] + ["non-ascii"] * (vocab_size - len(tokens))
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return torch.tensor([index[n] for n in names], dtype=torch.long)


def slot_log_multiplicity(n_own_rows: int, band_sizes: torch.Tensor) -> torch.Tensor:
    """log(how many vocabulary ids each slot stands for): 0 for own rows, log(n_k) for band k. (P + K,)"""
    return torch.cat([torch.zeros(n_own_rows), band_sizes.double().log().float()])


def slot_cross_entropy(logits: torch.Tensor, target_slots: torch.Tensor, log_multiplicity: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """Exact full-vocabulary cross-entropy from slot logits, when every band's rows are equal.

    logits (N, P + K) = hidden @ slot_table.T; target_slots (N,); log_multiplicity (P + K,).
    """
    per_token = F.cross_entropy(logits + log_multiplicity, target_slots, reduction="none") + log_multiplicity[target_slots]
    return per_token.mean() if reduction == "mean" else per_token


def expand_to_vocabulary(slot_table: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """(P + K, D) slot rows -> (V, D) embedding: own rows in place, each band's vector in all its rows."""
    return slot_table[slot_of].clone()


# ---- evaluation ---------------------------------------------------------------------------------------

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


# ---- training -----------------------------------------------------------------------------------------

def bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere autocast would be slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

def train_slots(body, slot_table: torch.Tensor, train_slot_blocks: torch.Tensor, log_multiplicity: torch.Tensor,
                recipe: dict, *, seed: int, progress: bool, max_minutes: float, on_step=None,
                stop_after: int | None = None) -> dict:
    """AdamW on the body and the slot table; batches drawn from a seeded permutation of the blocks.
    ``stop_after``: end after that many steps, the schedule unchanged (the first steps of the full run, exactly)."""
    params = dict(body.named_parameters())
    decay = [p for n, p in params.items() if p.dim() >= 2]  # matrices and the table; not norms or biases
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe["lr"], betas=(0.9, 0.95), eps=1e-8,
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_slot_blocks.shape[0], generator=generator)
    position, losses, tokens_seen = 0, [], 0
    start = time.perf_counter()
    bar = tqdm(range(recipe["steps"]), desc="training tiny", disable=not progress, mininterval=1.0)
    autocast = contextlib.nullcontext()
    if recipe["autocast"] == "bfloat16" and bf16_is_fast():
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    elif recipe["autocast"] not in ("bfloat16", "float32"):
        raise ValueError(f"autocast={recipe['autocast']!r}: 'bfloat16' or 'float32'")
    body.train()
    for step in bar:
        if stop_after is not None and step >= stop_after:
            break
        if position + recipe["batch_size"] > order.numel():  # a new epoch: a fresh seeded permutation
            order, position = torch.randperm(train_slot_blocks.shape[0], generator=generator), 0
        batch = train_slot_blocks[order[position : position + recipe["batch_size"]]]  # (B, T + 1)
        position += recipe["batch_size"]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        with autocast:
            hidden = body(input_ids=batch[:, :-1]).last_hidden_state  # (B, T, D)
            logits = hidden.reshape(-1, hidden.shape[-1]) @ slot_table.T  # (B*T, P + K)
        loss = slot_cross_entropy(logits.float(), batch[:, 1:].reshape(-1), log_multiplicity)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(body.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        tokens_seen += batch[:, 1:].numel()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if on_step is not None:
            on_step(step, losses[-1])
        elapsed = time.perf_counter() - start
        if step == max(10, recipe["steps"] // 10) and elapsed / (step + 1) * recipe["steps"] > 60 * max_minutes:
            # a busy machine only makes it slower: say how long, never give up (the steps, not the clock, end it)
            left = elapsed / (step + 1) * (recipe["steps"] - step - 1) / 60
            print(f"[qwen2lib] training tiny: about {left:.0f} more minutes at this machine's current speed "
                  f"(sized for {max_minutes:g} on 2 idle cores); the step count, not the clock, ends it",
                  file=sys.stderr, flush=True)
    body.eval()
    return {"losses": losses, "tokens_seen": tokens_seen, "train_seconds": time.perf_counter() - start,
            "matmul_dtype": "bfloat16" if isinstance(autocast, torch.autocast) else "float32"}


def train_tiny(out_dir: Path, *, seed: int = 0, max_minutes: float = 7.0, progress: bool = True, **overrides) -> dict:
    """Train, save a transformers checkpoint + tokenizer + ``model_card.json`` into ``out_dir``; return the card.

    ``overrides`` change the recipe (``RECIPE``'s keys; tests use a few steps on a few files).
    ``max_minutes`` is what the recipe is sized for on 2 idle cores; when, a tenth of the way in, it projects
    to more, the time left is printed (a busy machine is slower, never a failure).
    """
    recipe = recipe_with(overrides)
    out_dir = Path(out_dir)
    wall_start = time.perf_counter()
    with training_threads(recipe):
        tokenizer = load_tokenizer("tiny")
        data = training_data(tokenizer, recipe, seed)
        config = resolve("tiny").hf_config()
        config._attn_implementation = "sdpa"
        slot_of, n_own, band_sizes = slots_of(tokenizer, data["train_stream"], config.vocab_size, recipe)
        body, slot_table, run = train_slot_model(slot_of, n_own, band_sizes, data["train_blocks"], recipe,
                                                 seed=seed, progress=progress, max_minutes=max_minutes)
        model = full_vocabulary_model(config, body, slot_table, slot_of)
        perplexity = heldout_perplexity(model, data["heldout"])
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        card = model_card(recipe, seed, data, run, n_own, band_sizes, perplexity, config.vocab_size,
                          build_seconds=round(time.perf_counter() - wall_start, 1))
        (out_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        return card


def early_losses(count: int = EARLY_LOSS_STEPS, *, seed: int = 0, **overrides) -> list[float]:
    """The recipe's first ``count`` training losses, as the full run has them: the same corpus, slots and
    batches, stopped early (nothing evaluated or saved). Compared with the card's ``early_train_losses``."""
    recipe = recipe_with(overrides)
    with training_threads(recipe):
        tokenizer = load_tokenizer("tiny")
        data = training_data(tokenizer, recipe, seed, heldout=False)
        slot_of, n_own, band_sizes = slots_of(tokenizer, data["train_stream"], resolve("tiny").hf_config().vocab_size,
                                              recipe)
        run = train_slot_model(slot_of, n_own, band_sizes, data["train_blocks"], recipe, seed=seed, progress=False,
                               max_minutes=float("inf"), stop_after=count)[2]
    return run["losses"]


@contextlib.contextmanager
def training_threads(recipe: dict):
    """The recipe's fixed thread count and deterministic kernels for the duration, then the caller's settings."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe["threads"])
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def recipe_with(overrides: dict) -> dict:
    """``RECIPE`` with ``overrides`` applied; an unknown key or value is refused before anything runs."""
    unknown = set(overrides) - set(RECIPE)
    if unknown:
        raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(RECIPE)}")
    recipe = {**RECIPE, **overrides}
    if recipe["split_bands_by"] not in ("surface", None):
        raise ValueError(f"split_bands_by={recipe['split_bands_by']!r}: 'surface' or None")
    return recipe


def training_data(tokenizer, recipe: dict, seed: int, heldout: bool = True) -> dict:
    """The corpus, its training tokens as a stream and as (M, T + 1) blocks, and the (H, T) held-out blocks
    (None when ``heldout`` is false)."""
    corpus = stdlib_corpus(seed=0)
    train_files = corpus.train_files[: recipe["max_train_files"]]
    needed = recipe["steps"] * recipe["batch_size"] * (recipe["block_len"] + 1)
    train_stream = token_stream(corpus, train_files, tokenizer, recipe["train_tokens"] or needed, seed=seed)  # (N,)
    train_blocks = blocks(train_stream, recipe["block_len"] + 1)  # (M, T + 1): inputs and shifted targets
    if train_blocks.shape[0] < recipe["batch_size"]:
        raise ValueError(f"{train_stream.numel()} training tokens make fewer than one batch of blocks")
    heldout = heldout_token_blocks(tokenizer, recipe["heldout_blocks"], recipe["heldout_block_len"]) if heldout \
        else None  # (H, T)
    return {"corpus": corpus, "train_stream": train_stream, "train_blocks": train_blocks, "heldout": heldout}


def slots_of(tokenizer, train_stream: torch.Tensor, vocab_size: int, recipe: dict):
    """``vocabulary_slots`` with the recipe's bands, split by surface class when it says so."""
    classes = surface_classes(tokenizer, vocab_size) if recipe["split_bands_by"] == "surface" else None
    return vocabulary_slots(train_stream, vocab_size, recipe["n_own_rows"], recipe["band_edges"],
                            recipe["unseen_band"], classes)


def train_slot_model(slot_of: torch.Tensor, n_own: int, band_sizes: torch.Tensor, train_blocks: torch.Tensor,
                     recipe: dict, *, seed: int, progress: bool, max_minutes: float, stop_after: int | None = None):
    """The same network with a small table, one row per slot instead of one per vocabulary id, trained.
    Returns the body, its (P + K, D) table (input embedding and LM head at once: tied) and ``train_slots``' record."""
    torch.manual_seed(seed)
    slot_config = resolve("tiny").hf_config()
    slot_config._attn_implementation = "sdpa"
    slot_config.vocab_size = n_own + len(band_sizes)
    body = Qwen2Model(slot_config)
    slot_table = body.embed_tokens.weight  # (P + K, D)
    run = train_slots(body, slot_table, slot_of[train_blocks], slot_log_multiplicity(n_own, band_sizes), recipe,
                      seed=seed, progress=progress, max_minutes=max_minutes, stop_after=stop_after)
    return body, slot_table, run


def full_vocabulary_model(config, body, slot_table: torch.Tensor, slot_of: torch.Tensor):
    """A normal transformers Qwen2 (eval) from the trained body: every band's vector copied into all its rows."""
    model = Qwen2ForCausalLM(config).eval()
    state = {f"model.{k}": v for k, v in body.state_dict().items() if k != "embed_tokens.weight"}
    state["model.embed_tokens.weight"] = expand_to_vocabulary(slot_table.detach(), slot_of)  # (V, D)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def model_card(recipe: dict, seed: int, data: dict, run: dict, n_own: int, band_sizes: torch.Tensor,
               perplexity: float, vocab_size: int, build_seconds: float) -> dict:
    """What ``model_card.json`` says of a build: config, corpus, recipe, the loss curve and held-out perplexity."""
    corpus, heldout, losses = data["corpus"], data["heldout"], run["losses"]
    tail = losses[-max(1, len(losses) // 20):]  # the last 5% of steps: one batch is a noisy estimate
    return {
        "name": "tiny",
        "config": dict(TINY_CONFIG),
        "corpus": corpus.summary(),
        "recipe": jsonable(recipe),
        "recipe_hash": recipe_hash(recipe),
        "seed": seed,
        "steps": recipe["steps"],
        "tokens_seen": run["tokens_seen"],
        "train_tokens_tokenized": int(data["train_stream"].numel()),
        "epochs": round(run["tokens_seen"] / max(1, data["train_blocks"][:, 1:].numel()), 3),
        "own_vocabulary_rows": n_own,
        "shared_row_bands": band_sizes.tolist(),
        "first_train_loss": losses[0],
        "early_train_losses": losses[:EARLY_LOSS_STEPS],  # exact: what a short rerun must reproduce
        "final_train_loss": sum(tail) / len(tail),
        "train_loss_curve": [round(sum(losses[i : i + 25]) / len(losses[i : i + 25]), 4) for i in range(0, len(losses), 25)],
        "heldout_perplexity": perplexity,
        "heldout_tokens": int(heldout[:, 1:].numel()),
        "heldout_description": f"{heldout.shape[0]} blocks of {heldout.shape[1]} tokens, evenly spaced through "
                               f"the {len(corpus.heldout_files)} held-out files; full {vocab_size:,}-way softmax",
        "train_seconds": round(run["train_seconds"], 1),
        "build_seconds": build_seconds,
        "threads": recipe["threads"],
        "matmul_dtype": run["matmul_dtype"],  # bf16 autocast where the CPU has native bf16; weights stay fp32
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }
