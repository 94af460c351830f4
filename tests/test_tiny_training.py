"""The embedded model's corpus and training recipe: exact cheap loss, determinism, a normal checkpoint."""
import json
import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen2lib.corpus import heldout_token_blocks, stdlib_corpus
from qwen2lib.train_tiny import exact_restricted_loss, train_tiny


def test_corpus_split_is_deterministic_disjoint_and_hashed():
    a, b = stdlib_corpus(seed=0), stdlib_corpus(seed=0)
    assert a == b and a.sha256 == b.sha256 and len(a.sha256) == 64
    assert not set(a.train_files) & set(a.heldout_files)
    assert list(a.train_files) == sorted(a.train_files) and len(a.heldout_files) >= 10
    assert stdlib_corpus(seed=1).heldout_files != a.heldout_files
    assert not any(f.startswith(("test/", "encodings/")) for f in a.train_files + a.heldout_files)


def test_exact_restricted_loss_equals_full_vocabulary_cross_entropy():
    g = torch.Generator().manual_seed(0)
    V, D, N = 50, 8, 64
    present = torch.tensor([1, 4, 7, 9, 20, 33, 41])
    table = torch.randn(V, D, generator=g)
    shared = torch.randn(D, generator=g)
    is_other = ~torch.isin(torch.arange(V), present)
    table[is_other] = shared  # the saved model: every non-present row equals the shared one
    slot_of = torch.full((V,), present.numel(), dtype=torch.long)
    slot_of[present] = torch.arange(present.numel())
    hidden, targets = torch.randn(N, D, generator=g), torch.randint(0, V, (N,), generator=g)
    full = F.cross_entropy(hidden @ table.T, targets)
    cheap = exact_restricted_loss(hidden, targets, table[present], shared, slot_of, V)
    torch.testing.assert_close(cheap, full, atol=1e-5, rtol=0)
    # and it is not vacuous: with distinct rows the shortcut is wrong
    table[is_other] = torch.randn(int(is_other.sum()), D, generator=g)
    assert abs(F.cross_entropy(hidden @ table.T, targets).item() - cheap.item()) > 1e-2


SHORT = dict(steps=6, train_tokens=12_000, block_len=32, batch_size=4, warmup_steps=1, heldout_blocks=4, n_present=512)


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
