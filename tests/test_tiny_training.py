"""The embedded model's corpus and training recipe: exact cheap loss, determinism, a normal checkpoint."""
import json
import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen2lib.model.corpus import heldout_token_blocks, stdlib_corpus
from qwen2lib.model.tokenizer import load_tokenizer
from qwen2lib.model.train_tiny import (expand_to_vocabulary, slot_cross_entropy, slot_log_multiplicity, surface_class,
                                       surface_classes, train_tiny, vocabulary_slots)


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


def test_short_training_is_deterministic_learns_and_saves_a_normal_checkpoint(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    card = train_tiny(first, progress=False, **SHORT)
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
