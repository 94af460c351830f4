import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import absmax_stats, tiny_hf_config
from qwen2lib.quantize import stage as q
from qwen2lib.deploy import quantizer as qz, schemes


def seeded_model(seed: int = 0):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_hf_config()).eval()


def test_per_channel_rounding_error_is_at_most_half_a_step():
    w = torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different ranges
    w[5] = 0  # an all-zero row keeps a finite scale
    wq, scale = qz.quantize_weight(w)
    assert wq.dtype == torch.int8 and scale.shape == (48,) and int(wq.abs().max()) == 127
    err = (q.dequantize_weight(wq, scale) - w).abs()  # (N, K)
    assert torch.all(err <= scale[:, None] / 2 + 1e-7), float((err - scale[:, None] / 2).max())
    assert torch.all(wq[5] == 0)


def test_w8a16_linear_equals_dequantized_reference_matmul():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=True)
    int8 = qz.Int8Linear.from_linear(lin, "bf16")
    x = torch.randn(2, 7, 64)
    reference = F.linear(x.bfloat16().float(), q.dequantize_weight(int8.weight, int8.weight_scale)) + lin.bias
    # bf16 activations and a bf16 kernel output: agreement to bf16 precision
    torch.testing.assert_close(int8(x), reference, rtol=2e-2, atol=2e-2)
    assert int8(x).shape == (2, 7, 96) and int8.weight.dtype == torch.int8


@pytest.mark.parametrize("in_features", [40, 64])  # 40: not a multiple of 16, which the int8 kernel cannot take
@pytest.mark.parametrize("rows", [1, 5, qz.INT8PACK_MAX_ROWS + 1])  # decode rows -> int8 kernel, prefill -> bf16 GEMM
def test_w8a16_every_kernel_path_equals_the_dequantized_reference(in_features, rows):
    torch.manual_seed(rows)
    lin = nn.Linear(in_features, 24, bias=False)
    int8 = qz.Int8Linear.from_linear(lin, "bf16")
    x = torch.randn(rows, in_features)
    reference = F.linear(x.bfloat16().float(), int8.weight.float()) * int8.weight_scale  # fp32 of the same inputs
    out = int8(x)
    # the only difference allowed: the bf16 rounding of the kernel's output (relative 2^-8)
    torch.testing.assert_close(out, reference, rtol=2**-8, atol=2**-8 * float(reference.abs().max()))


def test_w8a8_linear_is_exact_int32_matmul_rescaled():
    torch.manual_seed(1)
    lin = nn.Linear(64, 40, bias=False)
    int8 = qz.Int8Linear.from_linear(lin, "int8")
    x = torch.randn(5, 64)
    xq, xs = qz.quantize_per_token(x)
    acc = qz.int8_matmul(xq, int8.weight)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.double(), xq.double() @ int8.weight.double().t())  # exact, not approximate
    torch.testing.assert_close(int8(x), acc.float() * xs * int8.weight_scale)
    assert (int8(x) - lin(x)).abs().max() < 0.05 * lin(x).abs().max()


def test_smoothquant_folding_leaves_fp32_outputs_unchanged():
    model = seeded_model()
    ids = torch.randint(0, 320, (2, 12))
    stats = absmax_stats(model, ids)
    stats["model.layers.0.self_attn.q_proj.absmax"][3] *= 50  # an outlier channel, as real models have
    with torch.no_grad():
        before = model(ids).logits
    factors = schemes.smooth_model(model, stats, alpha=0.5)
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() <= 1e-5
    s = factors["layers.0.input_layernorm"]
    assert not torch.allclose(s, torch.ones_like(s))  # it did move something


def test_quantize_model_schemes_skip_and_config():
    model = seeded_model()
    ids = torch.randint(0, 320, (2, 12))
    stats = absmax_stats(model, ids)
    with torch.no_grad():
        reference = model(ids).logits
    w8a8 = q.quantize_model(seeded_model(), "smoothquant", stats=stats, alpha=0.5)
    modules = w8a8.config.quantization_config["modules"]
    assert modules["model.layers.0.self_attn.q_proj"] == "w8a8" and modules["model.layers.1.mlp.up_proj"] == "w8a8"
    assert modules["model.layers.0.self_attn.o_proj"] == "w8a16" and modules["model.layers.0.mlp.down_proj"] == "w8a16"
    assert isinstance(w8a8.lm_head, nn.Linear) and "lm_head" not in modules
    w8a16 = q.quantize_model(seeded_model(), "w8a16", skip=("lm_head", "*.down_proj"))
    assert isinstance(w8a16.model.layers[0].mlp.down_proj, nn.Linear)
    with torch.no_grad():
        for m in (w8a8, w8a16):
            out = m(ids).logits
            assert 0 < (out - reference).abs().max() < 0.1 * reference.abs().max()
    with pytest.raises(q.QuantizationError, match="calibrate"):
        q.quantize_model(seeded_model(), "smoothquant")
    with pytest.raises(q.QuantizationError, match="w8a16"):
        q.quantize_model(seeded_model(), "int4")


def calibration_stats(model, ids, scheme):
    """What the calibration stage gives a scheme: the statistics, and the blocks themselves (GPTQ runs them)."""
    from qwen2lib.calibrate.stage import collect_activation_stats

    if scheme not in schemes.CALIBRATED_SCHEMES:
        return None
    return {**collect_activation_stats(model, ids, progress=False), schemes.CALIBRATION_IDS: ids}


@pytest.fixture(scope="module")
def deploy_package(tmp_path_factory):
    from qwen2lib.deploy import build_deploy_package

    root = tmp_path_factory.mktemp("quant")
    seeded_model().save_pretrained(root / "checkpoint")
    return build_deploy_package(root / "checkpoint", root / "patched")


@pytest.mark.parametrize("scheme", q.SCHEMES)
def test_save_and_reload_through_trust_remote_code_is_identical(deploy_package, tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(deploy_package, trust_remote_code=True).eval()
    ids = torch.randint(0, 320, (1, 10))
    stats = calibration_stats(model, ids, scheme)
    fp32_memory = q.memory_bytes(model)
    int4 = scheme in q.INT4_SCHEMES
    model.quantize(scheme, stats=stats, **({"group_size": 32} if int4 else {}))  # the patched class's entry point
    out = model.save_quantized(tmp_path / "pkg")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["scheme"] == scheme
    from safetensors.torch import load_file

    tensors = load_file(out / q.WEIGHTS_FILE)
    up = tensors["model.layers.0.mlp.up_proj.weight"]  # (128, 64) in float
    if int4:  # two 4-bit values a byte; a scale and a zero point per group of 32 inputs
        assert up.dtype == torch.uint8 and up.shape == (128, 32)
        assert tensors["model.layers.0.mlp.up_proj.weight_zero_point"].shape == (128, 2)
    else:
        assert up.dtype == torch.int8 and tensors["model.layers.0.mlp.up_proj.weight_scale"].shape == (128,)
    is_quantized = q.is_int4_linear if int4 else q.is_int8_linear
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert is_quantized(reloaded.model.layers[1].self_attn.k_proj)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert q.memory_bytes(reloaded) < fp32_memory
    assert q.disk_bytes(out) < q.disk_bytes(deploy_package)
    assert is_quantized(q.load_quantized(out).model.layers[0].mlp.gate_proj)


@pytest.mark.parametrize("scheme", q.SCHEMES)
@pytest.mark.parametrize("tied, skip", [(True, ("lm_head",)), (False, ())])  # untied: the head quantized too
def test_quantize_checkpoint_streams_the_same_package_as_quantize_then_save(tmp_path, scheme, tied, skip):
    """The package's layer-by-layer entry point writes the very tensors and config of the in-memory path, in
    shards when asked (a 40 kB shard limit forces several), and the package reloads from them."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    from qwen2lib.deploy import build_deploy_package

    torch.manual_seed(3)
    Qwen2ForCausalLM(tiny_hf_config(tie_word_embeddings=tied)).eval().save_pretrained(tmp_path / "ckpt")
    package = build_deploy_package(tmp_path / "ckpt", tmp_path / "patched")
    model = AutoModelForCausalLM.from_pretrained(package, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    stats = calibration_stats(model, ids, scheme)
    settings = dict(stats=stats, skip=skip, **({"group_size": 32} if scheme in q.INT4_SCHEMES else {}))
    whole = model.quantize(scheme, **settings).save_quantized(tmp_path / "whole")
    streamed = type(model).quantize_checkpoint(package, tmp_path / "streamed", scheme, max_shard_bytes=40_000,
                                               **settings)
    shards = sorted(streamed.glob("*.safetensors"))
    assert len(shards) > 2 and (streamed / "model.safetensors.index.json").is_file()
    expected = load_file(whole / q.WEIGHTS_FILE)
    got = {}
    for shard in shards:
        got.update(load_file(shard))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert json.loads((streamed / "config.json").read_text()) == json.loads((whole / "config.json").read_text())
    assert sorted(p.name for p in streamed.glob("*.py")) == sorted(p.name for p in whole.glob("*.py"))
    reloaded = q.load_quantized(streamed)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ---- int4 -------------------------------------------------------------------------------------


def test_int4_rounding_error_is_at_most_half_a_step_and_packs_losslessly():
    w = torch.randn(24, 100) * torch.logspace(-3, 1, 24)[:, None]  # 100 inputs: the last group of 32 is partial
    w[5] = 0  # an all-zero row keeps a finite scale
    w[6] = w[6].abs()  # all-positive rows keep zero inside the range
    q4, scale, zero = qz.quantize_int4(w, 32)
    assert q4.dtype == torch.uint8 and int(q4.max()) <= 15 and scale.shape == zero.shape == (24, 4)
    step = scale.repeat_interleave(32, dim=1)[:, :100]
    err = (qz.dequantize_int4(q4, scale, zero, 32) - w).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5)), float((err / step).max())
    assert torch.all(qz.dequantize_int4(q4, scale, zero, 32)[5] == 0)
    assert torch.equal(qz.unpack_int4(qz.pack_int4(q4), 100), q4)
    assert qz.pack_int4(q4).shape == (24, 50)
    lin = nn.Linear(100, 24)
    module = qz.Int4Linear.from_linear(lin, 32)
    x = torch.randn(3, 100)
    torch.testing.assert_close(module(x), F.linear(x, module.dequantized(), lin.bias))
    with pytest.raises(q.QuantizationError, match="power of two"):
        qz.Int4Linear.from_linear(lin, 48)


def outlier_layer(seed: int = 0, K: int = 256, N: int = 96):
    """A Linear's weight and inputs whose channels 0..3 are ~20x larger than the rest, as in real LLM activations."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    x = torch.randn(4096, K, generator=g)
    x[:, :4] *= 20
    return w, x


def output_error(w, w_hat, x) -> float:
    return float((x @ (w_hat - w).t()).square().mean())


def awq_rounded(w, h, group_size):
    """AWQ on one Linear: scales searched against H, clipping against H's blocks of the scaled input, W back in the
    input's units."""
    s = schemes.awq_factors([w], h, group_size)
    scaled_h = h / (s[:, None] * s[None, :])
    return qz.dequantize_int4(*qz.quantize_int4(w * s, group_size, scaled_h), group_size) / s, s


def test_awq_scaling_and_clipping_beat_round_to_nearest_on_outlier_channels():
    w, x = outlier_layer()
    h = x.T @ x / x.shape[0]
    rtn = qz.dequantize_int4(*qz.quantize_int4(w, 64), 64)
    awq, s = awq_rounded(w, h, 64)
    assert float(s[:4].min()) > float(s[4:].max())  # the loud channels are scaled up before rounding
    clipped_only = qz.dequantize_int4(*qz.quantize_int4(w, 64, h), 64)
    assert output_error(w, clipped_only, x) <= output_error(w, rtn, x)
    assert output_error(w, awq, x) < 0.6 * output_error(w, rtn, x), (output_error(w, awq, x), output_error(w, rtn, x))
    # the search's error is the output error itself: tr(dW H dW^T) = sum over tokens and rows / tokens
    torch.testing.assert_close(schemes.output_error(w, awq, h), output_error(w, awq, x) * w.shape[0], rtol=1e-3,
                               atol=0)


def test_block_clipping_weighs_correlations_inside_a_group():
    """Inputs mixed within each group of 32 (and not across): the output error is the sum of the groups' errors,
    which the block form weighs exactly and the diagonal only approximately."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.02
    mix = torch.block_diag(*[torch.eye(32) + 0.5 * torch.randn(32, 32, generator=g) for _ in range(4)])
    x = torch.randn(4096, 128, generator=g) @ mix
    h = x.T @ x / x.shape[0]
    diagonal = qz.dequantize_int4(*qz.quantize_int4(w, 32, torch.diagonal(h)), 32)
    block = qz.dequantize_int4(*qz.quantize_int4(w, 32, h), 32)
    assert not torch.equal(block, diagonal)
    assert output_error(w, block, x) <= output_error(w, diagonal, x) * (1 + 1e-5)
    with torch.no_grad():  # a diagonal H is the (K,) form
        d = torch.diag(torch.diagonal(h))
    assert all(torch.equal(a, b) for a, b in zip(qz.quantize_int4(w, 32, d), qz.quantize_int4(w, 32, torch.diagonal(h))))


def test_awq_exponent_search_on_a_row_sample_is_as_good_as_the_full_search(monkeypatch):
    w, x = outlier_layer(N=4096)
    h = x.T @ x / x.shape[0]
    assert schemes.AWQ_SEARCH_ROWS < 4096
    sampled = schemes.awq_factors([w[:2048], w[2048:]], h, 64)  # 4096 rows > AWQ_SEARCH_ROWS: a strided sample
    monkeypatch.setattr(schemes, "AWQ_SEARCH_ROWS", 1 << 20)
    full = schemes.awq_factors([w[:2048], w[2048:]], h, 64)

    def error(s):
        return schemes.output_error(w, qz.dequantize_int4(*qz.quantize_int4(w * s, 64), 64) / s, h)

    assert error(sampled) <= 1.02 * error(full), (error(sampled), error(full))
    assert error(sampled) < 0.8 * error(torch.ones(256))  # and far from round-to-nearest


def test_kv_shared_rms_gives_the_query_heads_of_one_kv_head_one_scale():
    meansq = torch.arange(1.0, 13.0)  # 4 query heads x head_dim 3, 2 kv heads: heads 0, 1 read kv 0
    rms = schemes.kv_shared_rms(meansq, kv_heads=2, head_dim=3)
    expected = torch.tensor([2.5, 3.5, 4.5] * 2 + [8.5, 9.5, 10.5] * 2).sqrt()
    torch.testing.assert_close(rms, expected)


@torch.no_grad()
def test_awq_folding_leaves_fp32_outputs_unchanged(deploy_package):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(deploy_package, trust_remote_code=True).eval()
    ids = torch.randint(0, 320, (4, 12), generator=torch.Generator().manual_seed(2))
    base = model.model
    run = schemes.CalibrationRun(base, model.config, base.rotary_emb, base.embed_tokens(ids))
    layer = base.layers[0]
    sources = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    moments = schemes.InputMoments(layer, sources)
    run.run(layer, 0, advance=False)
    hessians = moments.remove()
    v_before, o_before = layer.self_attn.v_proj.weight.clone(), layer.self_attn.o_proj.weight.clone()
    before = model(ids).logits
    scaled = schemes.awq_fold(layer, hessians, 32)
    after = model(ids).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    assert set(scaled) == set(sources)
    assert not torch.equal(layer.self_attn.o_proj.weight, o_before)  # o_proj got its scales, v_proj their inverse
    assert not torch.equal(layer.self_attn.v_proj.weight, v_before)


def correlated_layer(seed: int = 0, K: int = 200, N: int = 48):
    """A weight and inputs whose channels are mixed (as a layer's inputs are): GPTQ's error spreading has
    something to work with; a few loud channels as well."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    x = torch.randn(4096, K, generator=g) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g) / K**0.5)
    x[:, :4] *= 10
    return w, x


def test_gptq_blocked_equals_the_column_by_column_reference():
    w, x = correlated_layer()  # K = 200: the last group of 32 is partial, the blocks of 64 cut through groups' runs
    h = x.T @ x / x.shape[0]
    h[7, :] = h[:, 7] = 0  # an input no calibration token used
    fast = qz.gptq_int4(w, h, 32, block=64)
    reference = qz.gptq_int4_reference(w, h, 32)
    assert fast[0].dtype == torch.uint8 and fast[1].shape == fast[2].shape == (48, 7)
    assert (fast[0].float() - reference[0].float()).abs().max() <= 1  # float order may flip a tie
    assert (fast[0] != reference[0]).float().mean() < 1e-3
    torch.testing.assert_close(fast[1], reference[1])
    assert torch.all(qz.dequantize_int4(*fast, 32)[:, 7] == 0)  # an unused input's weight rounds to zero


def test_gptq_with_uncorrelated_inputs_is_clipped_round_to_nearest():
    w, _ = correlated_layer()
    h = torch.diag(torch.rand(200) + 0.5)  # no input predicts another: no error to spread
    gptq = qz.gptq_int4(w, h, 32)
    rtn = qz.quantize_int4(w, 32, torch.diagonal(h))
    assert all(torch.equal(a, b) for a, b in zip(gptq, rtn))


def test_gptq_beats_round_to_nearest_and_awq_on_correlated_inputs():
    w, x = correlated_layer(K=256, N=96)
    h = x.T @ x / x.shape[0]
    rtn = qz.dequantize_int4(*qz.quantize_int4(w, 64), 64)
    awq, _ = awq_rounded(w, h, 64)
    gptq = qz.dequantize_int4(*qz.gptq_int4(w, h, 64), 64)
    errors = {k: output_error(w, v, x) for k, v in (("rtn", rtn), ("awq", awq), ("gptq", gptq))}
    assert errors["gptq"] < 0.7 * errors["rtn"] and errors["gptq"] < errors["awq"], errors


@pytest.mark.parametrize("scheme", schemes.LAYERWISE_SCHEMES)
def test_layerwise_schemes_need_the_calibration_blocks_and_the_deploy_packages_model(deploy_package, scheme):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(deploy_package, trust_remote_code=True).eval()
    ids = torch.randint(0, 320, (2, 12))
    stats = calibration_stats(model, ids, scheme)
    del stats[schemes.CALIBRATION_IDS]  # statistics saved before the blocks were
    with pytest.raises(q.QuantizationError, match="recalibrate"):
        q.quantize_model(model, scheme, stats=stats, group_size=32)
    with pytest.raises(q.QuantizationError, match="deploy package"):  # stock transformers: no causal_mask_for
        q.quantize_model(seeded_model(), scheme, stats=calibration_stats(model, ids, scheme), group_size=32)


@torch.no_grad()
def test_layerwise_packages_are_closer_to_fp32_than_round_to_nearest(deploy_package):
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(deploy_package, trust_remote_code=True).eval()

    g = torch.Generator().manual_seed(1)
    calib, heldout = torch.randint(0, 320, (16, 32), generator=g), torch.randint(0, 320, (4, 32), generator=g)
    reference = load()(heldout).logits.log_softmax(-1)
    kld = {}
    for scheme in ("w4a16", "awq", "gptq"):
        model = load()
        model.quantize(scheme, stats=calibration_stats(model, calib, scheme), group_size=32)
        kld[scheme] = float(F.kl_div(model(heldout).logits.log_softmax(-1), reference, log_target=True,
                                     reduction="none").sum(-1).mean())
    assert 0 < kld["gptq"] < 0.9 * kld["w4a16"] and 0 < kld["awq"] < kld["w4a16"], kld


def test_ensure_quantized_writes_package_and_fidelity_metrics_then_reuses(tmp_path):
    from qwen2lib.artifacts import read_metrics
    from qwen2lib.evaluation.fidelity import REPORT_KEYS

    kwargs = dict(seed=0, heldout_blocks=2, heldout_len=16, calibration={"samples": 2, "seq_len": 16, "progress": False})
    out = q.ensure_quantized("tiny-random", "auto", tmp_path, scheme="smoothquant", alpha=0.6, **kwargs)
    assert out == tmp_path / "quantized" / "smoothquant"
    metrics = read_metrics(out)
    assert set(REPORT_KEYS) <= set(metrics["fidelity"]) and metrics["fidelity"]["tokens"] == 32
    assert metrics["fidelity"]["kld_mean"] > 0 and metrics["quantization_config"]["alpha"] == 0.6
    assert (tmp_path / "calibration" / "stats.safetensors").is_file()  # built on the way
    assert set(metrics["sqnr_db"]) == {f"layers.{i}" for i in range(4)}
    sizes = metrics["sizes"]
    assert sizes["smoothquant"]["linear_bytes"] < 0.3 * sizes["fp32"]["linear_bytes"]
    assert list(q.size_table(sizes).index) == ["fp32", "smoothquant"]
    stamp = (out / "metrics.json").stat().st_mtime_ns
    assert q.ensure_quantized("tiny-random", "auto", tmp_path, scheme="smoothquant", alpha=0.6, **kwargs) == out
    assert (out / "metrics.json").stat().st_mtime_ns == stamp


def test_cli_quantize_w8a16_and_bad_scheme(tmp_path, capsys):
    from qwen2lib.cli import main

    assert main(["quantize", "--model", "tiny-random", "--workdir", str(tmp_path), "--scheme", "w8a16",
                 "--heldout-blocks", "1", "--heldout-len", "16"]) == 0
    assert "kld_mean" in capsys.readouterr().out
    assert (tmp_path / "quantized" / "w8a16" / q.WEIGHTS_FILE).is_file()
    with pytest.raises(SystemExit):
        main(["quantize", "--model", "tiny-random", "--scheme", "int4"])


def test_reload_keeps_fp32_scales_of_a_bf16_checkpoint(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qwen2lib.deploy import build_deploy_package

    seeded_model().to(torch.bfloat16).save_pretrained(tmp_path / "checkpoint")  # config.json says bfloat16
    package = build_deploy_package(tmp_path / "checkpoint", tmp_path / "patched")
    model = AutoModelForCausalLM.from_pretrained(package, trust_remote_code=True, dtype=torch.float32).eval()
    streamed = type(model).quantize_checkpoint(package, tmp_path / "streamed", "w8a16")
    q.quantize_model(model, "w8a16")
    saved = model.save_quantized(tmp_path / "pkg")
    written = {folder.name: load_file(folder / q.WEIGHTS_FILE) for folder in (saved, streamed)}
    for tensors in written.values():  # the embedding as the checkpoint holds it (bf16), the scales in fp32
        assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
        assert tensors["model.norm.weight"].dtype == tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.float32
    assert written["pkg"].keys() == written["streamed"].keys()
    assert all(torch.equal(t, written["streamed"][n]) for n, t in written["pkg"].items())
    reloaded = q.load_quantized(saved)  # no dtype given: "auto"
    assert reloaded.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
    assert reloaded.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, 320, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
