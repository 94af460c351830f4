"""The embedded model's corpus and training recipe: exact cheap loss, determinism, a normal checkpoint; the shipped
compact file: it expands into the checkpoint its card describes, and it is the one the current recipe makes."""
import json
import math
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen2lib.cli import main as cli_main
from qwen2lib.model.corpus import heldout_token_blocks, stdlib_corpus
from qwen2lib.model.tiny import (CARD_FILE, SHIPPED_DIR, WEIGHTS_FILE, build_tiny, check_perplexity, compact_state,
                                 expand_state, shipped_card)
from qwen2lib.model.tiny_shipping import ship_checkpoint
from qwen2lib.model.tokenizer import load_tokenizer
from qwen2lib.model.train_tiny import (EARLY_LOSS_STEPS, bf16_is_fast, early_losses, expand_to_vocabulary,
                                       recipe_hash, recipe_with, slot_cross_entropy, slot_log_multiplicity,
                                       surface_class, surface_classes, train_tiny, vocabulary_slots)

ROOT = Path(__file__).resolve().parent.parent


def test_corpus_split_is_deterministic_disjoint_and_hashed():
    a, b = stdlib_corpus(seed=0), stdlib_corpus(seed=0)
    assert a == b and a.sha256 == b.sha256 and len(a.sha256) == 64
    assert not set(a.train_files) & set(a.heldout_files)
    assert list(a.train_files) == sorted(a.train_files) and len(a.heldout_files) >= 10
    assert stdlib_corpus(seed=1).heldout_files != a.heldout_files
    assert not any(f.startswith(("test/", "encodings/")) for f in a.train_files + a.heldout_files)


def test_slot_loss_equals_full_vocabulary_cross_entropy_of_the_expanded_table():
    g = torch.Generator().manual_seed(0)
    V, D, N = 60, 8, 200
    # a training stream over ids 0..39 with skewed counts; ids 40..59 never occur (unseen)
    stream = torch.multinomial(1.0 / torch.arange(1, 41, dtype=torch.float), 2000, replacement=True, generator=g)
    for unseen_band in ("rarest", "own"):
        slot_of, n_own, band_sizes = vocabulary_slots(stream, V, n_own_rows=10, band_edges=(20,), unseen_band=unseen_band)
        assert n_own == 10 and int(band_sizes.sum()) == V - 10 and (band_sizes > 0).all()
        assert slot_of.unique().numel() == n_own + len(band_sizes)
        table = torch.randn(n_own + len(band_sizes), D, generator=g)  # (P + K, D)
        full_table = expand_to_vocabulary(table, slot_of)  # (V, D): what the saved checkpoint holds
        hidden, targets = torch.randn(N, D, generator=g), torch.randint(0, V, (N,), generator=g)
        full = F.cross_entropy(hidden @ full_table.T, targets)
        cheap = slot_cross_entropy(hidden @ table.T, slot_of[targets], slot_log_multiplicity(n_own, band_sizes))
        torch.testing.assert_close(cheap, full, atol=1e-5, rtol=0)
        # not vacuous: with distinct rows inside a band the shortcut is wrong
        full_table[slot_of >= n_own] = torch.randn(int((slot_of >= n_own).sum()), D, generator=g)
        assert abs(F.cross_entropy(hidden @ full_table.T, targets).item() - cheap.item()) > 1e-2
    # unseen ids share the rarest seen band by default, so held-out text never meets a zero-probability band
    slot_of, _, _ = vocabulary_slots(stream, V, n_own_rows=10, band_edges=(20,))
    assert slot_of[59] == slot_of[stream.bincount(minlength=V)[:40].argmin()]


def test_bands_split_by_class_stay_exact_and_every_part_has_training_tokens():
    g = torch.Generator().manual_seed(1)
    V, D, N = 60, 8, 200
    stream = torch.multinomial(1.0 / torch.arange(1, 41, dtype=torch.float), 2000, replacement=True, generator=g)
    classes = torch.arange(V) % 3
    classes[45:] = 3  # a class only unseen ids have: it must not get a slot no training target ever hits
    slot_of, n_own, band_sizes = vocabulary_slots(stream, V, n_own_rows=10, band_edges=(20,), classes=classes)
    unsplit = vocabulary_slots(stream, V, n_own_rows=10, band_edges=(20,))[2]
    assert len(band_sizes) > len(unsplit) and int(band_sizes.sum()) == V - 10
    seen_slots = set(slot_of[stream].tolist())
    assert all(n_own + k in seen_slots for k in range(len(band_sizes))), "a band part no training token belongs to"
    for slot in range(n_own, n_own + len(band_sizes)):  # parts of seen ids are pure in class
        members = (slot_of == slot).nonzero().flatten()
        seen_members = members[stream.bincount(minlength=V)[members] > 0]
        assert classes[seen_members].unique().numel() == 1
    table = torch.randn(n_own + len(band_sizes), D, generator=g)
    hidden, targets = torch.randn(N, D, generator=g), torch.randint(0, V, (N,), generator=g)
    full = F.cross_entropy(hidden @ expand_to_vocabulary(table, slot_of).T, targets)
    cheap = slot_cross_entropy(hidden @ table.T, slot_of[targets], slot_log_multiplicity(n_own, band_sizes))
    torch.testing.assert_close(cheap, full, atol=1e-5, rtol=0)


def test_surface_classes_of_the_real_tokenizer():
    assert surface_class("ĠInteractive") == "space+capitalised"
    assert surface_class("_mock") == "punct+lower" and surface_class("(uuid") == "punct+lower"
    assert surface_class("uuid") == "none+lower" and surface_class("ĠPATCH") == "space+upper"
    assert surface_class("Ġ42") == "space+digits" and surface_class("__);") == "punct+mixed"
    assert surface_class("ä½łå¥½") == "non-ascii" and surface_class(None) == "non-ascii"
    tokenizer = load_tokenizer("tiny")
    classes = surface_classes(tokenizer, 151936)  # (V,)
    assert classes.shape == (151936,) and classes.unique().numel() >= 10
    space_lower = classes[tokenizer.convert_tokens_to_ids("Ġthe")]
    assert classes[tokenizer.convert_tokens_to_ids("Ġself")] == space_lower != classes[tokenizer.convert_tokens_to_ids("self")]
    assert classes[-1] == classes[tokenizer.convert_tokens_to_ids("ä½ł")]  # padding rows count as non-ASCII


SHORT = dict(steps=6, train_tokens=12_000, block_len=32, batch_size=4, warmup_steps=1, heldout_blocks=4,
             heldout_block_len=32, n_own_rows=512, band_edges=(1024,))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A checkpoint of the recipe shortened to seconds, and its card (trained once for this module)."""
    folder = tmp_path_factory.mktemp("short") / "a"
    folder.mkdir()
    return folder, train_tiny(folder, progress=False, **SHORT)


def test_short_training_is_deterministic_learns_and_saves_a_normal_checkpoint(short_run, tmp_path):
    first, card = short_run
    second = tmp_path / "b"
    second.mkdir()
    train_tiny(second, progress=False, **SHORT)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert card["final_train_loss"] < card["first_train_loss"] < math.log(151936) + 1
    assert json.loads((first / "model_card.json").read_text())["corpus"]["sha256"] == stdlib_corpus().sha256
    for key in ("config", "corpus", "steps", "tokens_seen", "final_train_loss", "heldout_perplexity", "seed", "versions"):
        assert key in card
    model = AutoModelForCausalLM.from_pretrained(first)
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert model.config.vocab_size == 151936 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    heldout = heldout_token_blocks(tokenizer, 4, 32)
    with torch.no_grad():
        logits = model(heldout).logits[:, :-1]
    ppl = math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), heldout[:, 1:].reshape(-1)).item())
    assert math.isclose(ppl, card["heldout_perplexity"], rel_tol=1e-4), "the card's perplexity is not the saved model's"


# ---- the shipped compact file ------------------------------------------------------------------------------

def test_a_short_rerun_reproduces_the_early_losses_a_run_records(short_run):
    _, card = short_run
    assert len(card["early_train_losses"]) == min(EARLY_LOSS_STEPS, SHORT["steps"])
    assert early_losses(3, **SHORT) == card["early_train_losses"][:3]  # same machine, same threads: exact


def test_compact_form_expands_into_exactly_the_trained_checkpoint(short_run, tmp_path):
    trained, _ = short_run
    shipped, out = tmp_path / "shipped", tmp_path / "expanded"
    out.mkdir()
    card = ship_checkpoint(trained, shipped)
    assert card["recipe_hash"] == recipe_hash(recipe_with(SHORT)) and card["shipped"]["distinct_embedding_rows"] < 2000
    with safe_open(shipped / WEIGHTS_FILE, "pt") as fh:
        assert fh.metadata()["recipe_hash"] == card["recipe_hash"] and "model.embed_tokens.weight" not in fh.keys()
    build_tiny(out, folder=shipped)
    want, got = load_file(trained / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (out / "config.json").read_bytes() == (trained / "config.json").read_bytes()
    assert json.loads((out / CARD_FILE).read_text()) == card
    assert AutoTokenizer.from_pretrained(out)("def f():")["input_ids"] == load_tokenizer("tiny")("def f():")["input_ids"]
    ids = torch.tensor(card["expansion_check"]["token_ids"])
    assert math.isclose(check_perplexity(out, ids), card["expansion_check"]["perplexity"], rel_tol=1e-5)
    # a damaged file (or a Git LFS pointer in its place) is refused before anything is written
    (shipped / WEIGHTS_FILE).write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match="not the file"):
        build_tiny(tmp_path, folder=shipped)


def test_compaction_refuses_an_embedding_without_shared_rows():
    state = {"model.embed_tokens.weight": torch.randn(40000, 4), "model.norm.weight": torch.ones(4)}
    with pytest.raises(ValueError, match="distinct embedding rows"):
        compact_state(state)
    state["model.embed_tokens.weight"] = torch.randn(7, 4)[torch.randint(0, 7, (100,))]
    compact = compact_state(state)
    assert compact["slot_table"].shape == (7, 4) and compact["slot_of"].dtype == torch.int16
    assert torch.equal(expand_state(compact)["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_the_shipped_tiny_is_the_one_the_current_recipe_trains():
    card = shipped_card()
    assert card["recipe_hash"] == recipe_hash(), (
        "qwen2lib/model/train_tiny.py (its RECIPE or its code) or the tiny architecture changed since the shipped "
        f"tiny in {SHIPPED_DIR} was trained: retrain it, `qwen2lib train-tiny --write-shipped` (minutes; see README), "
        "and commit the rewritten files")
    with safe_open(SHIPPED_DIR / WEIGHTS_FILE, "pt") as fh:
        assert fh.metadata()["recipe_hash"] == card["recipe_hash"]
    assert card["heldout_perplexity"] <= 100 and card["steps"] == card["recipe"]["steps"]
    # the record is consistent with itself: the exact early losses make the loss curve's first point
    early = card["early_train_losses"]
    assert len(early) == EARLY_LOSS_STEPS and card["train_loss_curve"][0] == round(sum(early) / len(early), 4)


def test_the_recipe_still_starts_as_the_shipped_model_did():
    """The first steps of the recipe, rerun, give the losses the shipped run recorded: the corpus, its tokenization,
    the slots and the batch order are still what made the file (the recipe hash covers only the recipe and code)."""
    card = shipped_card()
    if card["corpus"]["sha256"] != stdlib_corpus().sha256:
        pytest.skip(f"this Python's standard library ({stdlib_corpus().description[:40]}...) is not the corpus the "
                    f"shipped tiny was trained on (Python {card['corpus']['python']})")
    steps = 3
    losses = early_losses(steps)
    # fp32 on another CPU differs in the last bits; bf16 autocast (a CPU with native bf16) follows another path
    same_math = card["matmul_dtype"] == ("bfloat16" if bf16_is_fast() else "float32")
    assert losses == pytest.approx(card["early_train_losses"][:steps], abs=1e-3 if same_math else 5e-2)


def test_the_shipped_tiny_expands_into_the_model_its_card_describes(tmp_path):
    card = shipped_card()
    assert card["shipped"]["bytes"] == (SHIPPED_DIR / WEIGHTS_FILE).stat().st_size < 10 * 2**20, "keep the file small"
    build_tiny(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.vocab_size == 151936 and model.config.tie_word_embeddings
    assert model.model.embed_tokens.weight.unique(dim=0).shape[0] == card["shipped"]["distinct_embedding_rows"]
    ids = torch.tensor(card["expansion_check"]["token_ids"])
    assert math.isclose(check_perplexity(tmp_path, ids), card["expansion_check"]["perplexity"], rel_tol=1e-4)


def test_the_shipped_files_are_packaged_and_not_ignored_by_git():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "tiny_shipped/*" in data["qwen2lib.model"]
    names = sorted(p.name for p in SHIPPED_DIR.iterdir() if not p.name.startswith("."))
    assert names == sorted([WEIGHTS_FILE, CARD_FILE, "config.json", "generation_config.json"])
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", *[str(SHIPPED_DIR / n) for n in names]], cwd=ROOT,
                                 capture_output=True, text=True)
        assert ignored.returncode == 1, f"git ignores {ignored.stdout.split()}: the shipped tiny would not be committed"


def test_train_tiny_command_needs_a_destination(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train-tiny"])
    assert exit_info.value.code == 2 and "--write-shipped" in capsys.readouterr().err
