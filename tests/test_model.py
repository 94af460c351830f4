"""The from-scratch Qwen2 against transformers' Qwen2ForCausalLM (the numerical reference)."""
import pytest
import torch
from transformers import Qwen2ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from conftest import tiny_hf_config
from qwen2lib.scratch import rope
from qwen2lib.scratch.model import Qwen2, Qwen2Args, grouped_query_attention

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1_000_000.0}

CASES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa4-untied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
    "yarn": dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=YARN, max_position_embeddings=256),
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000.0}),
}


def pair(seed=0, **overrides):
    torch.manual_seed(seed)
    reference = Qwen2ForCausalLM(tiny_hf_config(**overrides)).eval()
    return reference, Qwen2.from_hf(reference).eval()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    reference, ours = pair(**CASES[case])
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["gqa2", "yarn", "mqa"])
def test_cached_decoding_equals_full_recomputation(case):
    _, ours = pair(**CASES[case])
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache()
        steps = [ours(ids[:, :9], cache)] + [ours(ids[:, t : t + 1], cache) for t in range(9, 40)]
    assert cache.seq_len == 40
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["gqa2", "gqa4-untied", "yarn"])
def test_greedy_generation_matches_transformers_generate(case):
    reference, ours = pair(seed=3, **CASES[case])
    prompt = torch.randint(2, 320, (1, 7), generator=torch.Generator().manual_seed(4))
    expected = reference.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None)
    assert torch.equal(ours.generate(prompt, 32), expected)


def test_dynamic_ntk_matches_transformers_past_max_position():
    reference, ours = pair(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10_000.0},
                           max_position_embeddings=32)
    ids = torch.randint(0, 320, (1, 80), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=0)


def test_sliding_window_layers_match_transformers():
    overrides = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, num_hidden_layers=3)
    reference, ours = pair(**overrides)
    reference.config._attn_implementation = "eager"
    assert [ours.model.layers[i].self_attn.window for i in range(3)] == [None, 8, 8]
    ids = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=0)
        no_window = Qwen2.from_hf(Qwen2ForCausalLM(tiny_hf_config(num_hidden_layers=3))).eval()
        no_window.load_state_dict(ours.state_dict())
        assert (no_window(ids) - ours(ids)).abs().max() > 1e-3, "the window changed nothing: the test is vacuous"


def test_left_padded_batch_equals_single_rows():
    _, ours = pair()
    short = torch.randint(2, 320, (1, 5), generator=torch.Generator().manual_seed(7))
    long = torch.randint(2, 320, (1, 9), generator=torch.Generator().manual_seed(8))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
    with torch.no_grad():
        cache = ours.new_cache()
        logits = ours(batch, cache, attention_mask=mask)
        torch.testing.assert_close(logits[0, 4:], ours(short)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1], ours(long)[0], atol=1e-5, rtol=0)
        step = ours(torch.tensor([[11], [12]]), cache, attention_mask=torch.cat([mask, torch.ones(2, 1).long()], 1))
        torch.testing.assert_close(step[0, -1], ours(torch.cat([short, torch.tensor([[11]])], 1))[0, -1], atol=1e-5, rtol=0)


def test_gqa_equals_multi_head_with_repeated_kv():
    g = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(2, 8, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    causal = torch.full((5, 5), float("-inf")).triu(1)[None, None]
    expected = torch.softmax(q @ k.repeat_interleave(4, 1).transpose(-1, -2) / 4 + causal, -1) @ v.repeat_interleave(4, 1)
    torch.testing.assert_close(grouped_query_attention(q, k, v, causal), expected, atol=1e-6, rtol=0)


def test_long_prompts_are_scored_a_block_of_queries_at_a_time(monkeypatch):
    from qwen2lib.scratch import model as model_module

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 8, 10, 16, generator=g), torch.randn(2, 2, 10, 16, generator=g), torch.randn(2, 2, 10, 16, generator=g)
    bias = torch.full((10, 10), float("-inf")).triu(1)[None, None].expand(2, 1, 10, 10)  # (B, 1, Tq, Tk)
    whole = grouped_query_attention(q, k, v, bias)
    monkeypatch.setattr(model_module, "QUERY_BLOCK", 3)  # 10 queries: blocks of 3, 3, 3, 1
    torch.testing.assert_close(grouped_query_attention(q, k, v, bias), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(grouped_query_attention(q, k, v, None), model_module.grouped_query_attention(
        q, k, v, torch.zeros(2, 1, 10, 10)), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        {"rope_type": "yarn", "factor": 4.0},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2},
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32768, "attention_factor": 1.5},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 4.0},
    ],
)
def test_rope_inverse_frequencies_match_transformers(params):
    config = tiny_hf_config(hidden_size=128, num_attention_heads=2, max_position_embeddings=131072,
                            rope_parameters={**params, "rope_theta": 1_000_000.0})
    expected, expected_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
    ours, scale = rope.inv_freq_from_scaling(64, 1_000_000.0, params, 131072)
    torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)
    assert scale == pytest.approx(expected_scale)


def test_yarn_attention_factor_formula():
    assert rope.yarn_attention_factor(4.0) == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    assert rope.yarn_attention_factor(1.0) == 1.0


def test_args_from_registry_and_config_round_trip():
    args = Qwen2Args.from_hf(tiny_hf_config(rope_parameters=YARN))
    assert args.rope_scaling["factor"] == 4.0 and args.rope_theta == 1_000_000.0
    assert args.kv_groups == 2 and args.head_dim == 16
    with pytest.raises(ValueError, match="multiple"):
        Qwen2Args(num_attention_heads=6, num_key_value_heads=4)


def test_loads_from_checkpoint_folder(make_checkpoint):
    folder = make_checkpoint(tie_word_embeddings=False)
    reference = Qwen2ForCausalLM.from_pretrained(folder).eval()
    ours = Qwen2.from_checkpoint(folder).eval()
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=0)


DCA = {"chunk_size": 16, "local_size": 4, "original_max_position_embeddings": 16}


def with_dca(model: Qwen2, config: dict | None) -> Qwen2:
    from dataclasses import replace

    twin = Qwen2(replace(model.args, dual_chunk_attention_config=config)).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_dual_chunk_attention_model_equals_plain_within_one_chunk():
    _, ours = pair()
    dca_model = with_dca(ours, DCA)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(11))  # 12 <= s = 16 - 4
    with torch.no_grad():
        torch.testing.assert_close(dca_model(ids), ours(ids), atol=1e-5, rtol=0)


def test_dual_chunk_attention_model_decode_equals_prefill_over_many_chunks():
    _, ours = pair()
    dca_model = with_dca(ours, DCA)
    ids = torch.randint(0, 320, (1, 45), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        full = dca_model(ids)
        cache = dca_model.new_cache()
        steps = [dca_model(ids[:, :20], cache)] + [dca_model(ids[:, t : t + 1], cache) for t in range(20, 45)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
        assert (full - ours(ids)).abs().max() > 1e-3, "past one chunk DCA must differ from plain attention"
