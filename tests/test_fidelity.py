import math

import pytest
import torch
import torch.nn.functional as F

from qwen2lib.errors import NumericalOverflowError
from qwen2lib.evaluation.fidelity import REPORT_KEYS, fidelity_report, fidelity_table, per_layer_sqnr, sqnr_db

g = torch.Generator().manual_seed(0)
LOGITS = torch.randn(3, 6, 11, generator=g, dtype=torch.float64)
BLOCKS = torch.randint(0, 11, (3, 6), generator=g)


def fixed(logits):
    return lambda ids: logits[: ids.shape[0]] if ids.shape[0] == logits.shape[0] else logits[: ids.shape[0]]


def test_identical_logits():
    report = fidelity_report(fixed(LOGITS), fixed(LOGITS), BLOCKS, batch_size=3)
    assert set(REPORT_KEYS) <= set(report)
    assert report["kld_mean"] == pytest.approx(0, abs=1e-12) and report["top1_agreement"] == 1
    assert report["ppl_ratio"] == pytest.approx(1) and report["max_abs_dlogits"] == 0 and report["tokens"] == 18


def test_kld_and_perplexity_equal_a_direct_computation():
    other = LOGITS + torch.randn(LOGITS.shape, generator=g, dtype=torch.float64)
    report = fidelity_report(fixed(LOGITS), fixed(other), BLOCKS, batch_size=3)
    p, q = F.log_softmax(LOGITS, -1), F.log_softmax(other, -1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert report["kld_mean"] == pytest.approx(kl.mean().item())
    assert report["kld_p99"] == pytest.approx(torch.quantile(kl.flatten(), 0.99).item())
    nll = -q[:, :-1].gather(-1, BLOCKS[:, 1:, None]).mean().item()
    assert report["ppl_candidate"] == pytest.approx(math.exp(nll))
    assert report["max_abs_dlogits"] == pytest.approx((LOGITS - other).abs().max().item())


def test_a_uniform_shift_changes_nothing_but_the_logits():
    report = fidelity_report(fixed(LOGITS), fixed(LOGITS + 3.0), BLOCKS, batch_size=2)
    assert report["kld_mean"] == pytest.approx(0, abs=1e-12) and report["max_abs_dlogits"] == pytest.approx(3.0)


def test_top1_agreement_counts_flipped_argmax():
    flipped = LOGITS.clone()
    flipped[0, :3] = -LOGITS[0, :3]  # 3 of 18 positions now have a different argmax
    report = fidelity_report(fixed(LOGITS), fixed(flipped), BLOCKS, batch_size=3)
    expected = (LOGITS.argmax(-1) == flipped.argmax(-1)).double().mean().item()
    assert report["top1_agreement"] == pytest.approx(expected) and expected < 1


def test_non_finite_candidate_is_an_error_not_a_number():
    broken = LOGITS.clone()
    broken[1, 2, 3] = float("inf")
    with pytest.raises(NumericalOverflowError):
        fidelity_report(fixed(LOGITS), fixed(broken), BLOCKS, batch_size=3)


def test_sqnr():
    x = torch.ones(100)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x + 0.1) == pytest.approx(20.0)


def test_per_layer_sqnr_on_models_and_table():
    from transformers import Qwen2ForCausalLM

    from conftest import tiny_hf_config

    torch.manual_seed(0)
    a = Qwen2ForCausalLM(tiny_hf_config()).eval()
    b = Qwen2ForCausalLM(tiny_hf_config()).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    sqnr = per_layer_sqnr(a, b, torch.randint(0, 320, (2, 8)))
    assert sqnr["layers.0"] == math.inf and 20 < sqnr["layers.1"] < math.inf
    table = fidelity_table({"x": fidelity_report(fixed(LOGITS), fixed(LOGITS), BLOCKS)})
    assert list(table.index) == ["x"] and "kld_mean" in table.columns
