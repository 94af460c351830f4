"""Long context: Dual Chunk Attention and YaRN in the compiled graphs, generation, bench and eval, on tiny random
checkpoints (the deploy package's own DCA is tested in test_patching.py against the naive reference)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen2lib import deploy
from qwen2lib.compile.manifest import GraphManifest
from qwen2lib.compile.stage import compile_model, config_path, load_weights
from qwen2lib.compile.config_schema import ConfigError
from qwen2lib.compile.plan import GraphPlan
from qwen2lib.compile.runtime import OnnxCausalLM
from qwen2lib.compile.builder import build_graph, op_histogram
from qwen2lib.model.model_config import Qwen2Args

DCA = {"chunk_size": 12, "local_size": 4, "original_max_position_embeddings": 12}  # chunks of s = 8 positions


@pytest.fixture
def dca_package(make_checkpoint, tmp_path):
    folder = make_checkpoint(dual_chunk_attention_config=DCA)
    return deploy.build_deploy_package(folder, tmp_path / "package")


def package_graph(package: Path, tmp_path: Path, **plan) -> OnnxCausalLM:
    args = Qwen2Args.from_config_dict(json.loads((package / "config.json").read_text()))
    built = build_graph(args, load_weights(package), GraphPlan(max_sequence_length=256, dual_chunk=(12, 4), **plan))
    out = tmp_path / f"graph-{len(list(tmp_path.glob('graph-*')))}"
    built.save(out)
    assert op_histogram(built)["Where"] >= 2 * args.num_hidden_layers  # two part selections per layer
    return OnnxCausalLM.load(out / "model.onnx")


def graph_vs_package(lm: OnnxCausalLM, model, prompt: np.ndarray, steps: int) -> np.ndarray:
    """|dlogits| per position: graph prefill + cached greedy decode vs the package's uncached forward."""
    logits, state = lm.prefill(prompt)
    seq, got = prompt[0].tolist(), [logits[0]]
    for _ in range(steps):
        seq.append(int(logits[0, -1].argmax()))
        logits, state = lm.decode([[seq[-1]]], state)
        got.append(logits[0])
    with torch.no_grad():
        ref = model(torch.tensor([seq]), past_key_values=[]).logits[0].numpy()
    return np.abs(np.concatenate(got) - ref).max(-1)


@pytest.mark.parametrize("operator_set", ["contrib", "standard"])
def test_dual_chunk_graph_equals_the_package_in_prefill_and_decode(dca_package, tmp_path, operator_set):
    model = deploy.load_deploy_package(dca_package)
    lm = package_graph(dca_package, tmp_path, operator_set=operator_set)
    assert not lm.group_query_attention  # the cache is concatenated, never bound in place
    prompt = torch.randint(0, 320, (1, 21), generator=torch.Generator().manual_seed(1)).numpy()
    assert graph_vs_package(lm, model, prompt, steps=19).max() <= 1e-4  # 40 positions: five chunks


def test_dual_chunk_graph_left_padded_rows_decode_like_each_row_alone(dca_package, tmp_path):
    model = deploy.load_deploy_package(dca_package)
    lm = package_graph(dca_package, tmp_path, operator_set="contrib")
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (19, 6)]
    ids = np.array([[0] * (19 - len(r)) + r for r in rows])
    mask = np.array([[0] * (19 - len(r)) + [1] * len(r) for r in rows])
    logits, state = lm.prefill(ids, mask)
    for _ in range(9):
        nxt = logits[:, -1].argmax(-1)
        rows = [r + [int(t)] for r, t in zip(rows, nxt)]
        logits, state = lm.decode(nxt[:, None], state)
    with torch.no_grad():
        for b, row in enumerate(rows):
            ref = model(torch.tensor([row]), past_key_values=[]).logits[0, -1].numpy()
            assert np.abs(logits[b, -1] - ref).max() <= 1e-4, f"row {b}"


@pytest.mark.parametrize("dual_chunk", [None, (12, 4)])
def test_chunked_prefill_equals_the_whole_prompt(dca_package, tmp_path, dual_chunk):
    """A long prompt prefilled in pieces through the cache (bounded attention scratch) gives the logits and cache
    of one call, for GroupQueryAttention and for Dual Chunk Attention (pieces of 16 straddle its chunks of 8)."""
    args = Qwen2Args.from_config_dict(json.loads((dca_package / "config.json").read_text()))
    build_graph(args, load_weights(dca_package), GraphPlan(max_sequence_length=256, dual_chunk=dual_chunk)).save(tmp_path / "g")
    lm = OnnxCausalLM.load(tmp_path / "g" / "model.onnx")
    prompt = torch.randint(0, 320, (1, 45), generator=torch.Generator().manual_seed(2)).numpy()
    whole, whole_state = lm.prefill(prompt, chunk=0)
    calls, run = [], lm.run
    lm.run = lambda ids, *a, **k: calls.append(ids.shape[1]) or run(ids, *a, **k)
    pieces, pieces_state = lm.prefill(prompt, chunk=16)
    assert calls == [16, 16, 13]
    assert pieces.shape == whole.shape and np.abs(pieces - whole).max() <= 1e-4
    for (k0, v0), (k1, v1) in zip(whole_state.past, pieces_state.past):
        assert k1.shape == k0.shape and np.abs(k1 - k0).max() <= 1e-5 and np.abs(v1 - v0).max() <= 1e-5
    after_whole, _ = lm.decode([[7]], whole_state)
    after_pieces, _ = lm.decode([[7]], pieces_state)
    assert np.abs(after_pieces - after_whole).max() <= 1e-4


def test_int8_dual_chunk_graph_shares_the_attention_builder(dca_package, tmp_path):
    """int8 projections around the same DCA attention: within int8 rounding of the fp32 package, equal to the int8
    graph without DCA inside the first chunk (activations quantized per row block, so rows do not mix) and
    different after it, where DCA caps the distances."""
    model = deploy.load_deploy_package(dca_package)
    prompt = torch.randint(0, 320, (1, 21), generator=torch.Generator().manual_seed(1)).numpy()
    int8 = dict(operator_set="contrib", quantize=("attention", "mlp"))
    lm = package_graph(dca_package, tmp_path, **int8)
    assert graph_vs_package(lm, model, prompt, steps=11).max() <= 0.05
    args = Qwen2Args.from_config_dict(json.loads((dca_package / "config.json").read_text()))
    plain = build_graph(args, load_weights(dca_package), GraphPlan(max_sequence_length=256, **int8))
    plain.save(tmp_path / "plain")
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(4)).numpy()
    ours, theirs = lm.run(ids)[0][0], OnnxCausalLM.load(tmp_path / "plain" / "model.onnx").run(ids)[0][0]
    np.testing.assert_allclose(ours[:8], theirs[:8], atol=1e-5, rtol=0)
    assert np.abs(ours[13:] - theirs[13:]).max(-1).min() > 1e-4


def test_compile_follows_the_package_config_and_the_yaml_switch(make_checkpoint, tmp_path):
    folder = str(make_checkpoint(dual_chunk_attention_config=DCA))
    on = GraphManifest.read(compile_model(config_path("qwen2_fp32"), model=folder, workdir=tmp_path / "a", verbose=False))
    assert on.dual_chunk_attention == {"chunk_size": 12, "local_size": 4}
    assert "com.microsoft:GroupQueryAttention" not in on.op_histogram and on.parity["max_abs_dlogits"] <= 1e-4
    assert any("Dual Chunk Attention" in line for line in on.limits)
    off = GraphManifest.read(compile_model(config_path("qwen2_fp32"), model=folder, workdir=tmp_path / "b", verbose=False,
                                      overrides={"graph.dual_chunk_attention": False}))
    # verified against the package with DCA switched off too: equal, not merely close within one chunk
    assert off.dual_chunk_attention is None and off.op_histogram["com.microsoft:GroupQueryAttention"] == 2
    assert off.parity["max_abs_dlogits"] <= 1e-4


def test_compile_refuses_dual_chunk_it_cannot_verify(make_checkpoint, tmp_path):
    plain = str(make_checkpoint("plain"))
    with pytest.raises(ConfigError, match="no dual_chunk_attention_config"):
        compile_model(config_path("qwen2_fp32"), model=plain, workdir=tmp_path / "a", verbose=False,
                      overrides={"graph.dual_chunk_attention": True})
    dual = str(make_checkpoint("dual", dual_chunk_attention_config=DCA))
    with pytest.raises(ConfigError, match="source.package: patched"):
        compile_model(config_path("qwen2_fp32"), model=dual, workdir=tmp_path / "b", verbose=False,
                      overrides={"source.package": "checkpoint"})


# ---- settings: --dca / --yarn, honoured by every backend ---------------------------------------------

def test_parse_settings_and_refuse_what_cannot_run():
    from qwen2lib.model.long_context import LongContextError, apply_overrides, long_context_overrides

    config = {"max_position_embeddings": 256, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    ov = long_context_overrides("12,4", "4,64", config)
    assert ov["dual_chunk_attention_config"] == {"chunk_size": 12, "local_size": 4,
                                                 "original_max_position_embeddings": 12}
    # factor x original = max_position_embeddings: old and new transformers then read the same YaRN factor
    assert ov["max_position_embeddings"] == 256 == ov["rope_scaling"]["factor"] * 64
    merged = apply_overrides(config, ov)
    assert merged["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                         "original_max_position_embeddings": 64} and "rope_scaling" not in merged
    assert config["rope_parameters"]["rope_type"] == "default"  # a copy
    for dca, yarn, message in (("12", None, "expected 2 or 3"), ("8,8", None, "must be smaller"),
                               (None, "1.0", "FACTOR > 1"), (None, "x", "FACTOR is a number")):
        with pytest.raises(LongContextError, match=message):
            long_context_overrides(dca, yarn, config)
    with pytest.raises(LongContextError, match="already scales RoPE with 'linear'"):
        long_context_overrides(None, "4", {"max_position_embeddings": 256, "rope_scaling": {"type": "linear", "factor": 2}})
    with pytest.raises(LongContextError, match="sliding-window"):
        long_context_overrides("12,4", None, {"use_sliding_window": True})


def test_torch_backend_runs_dca_through_the_package_and_yarn_as_configured(make_checkpoint, tmp_path, capsys):
    from qwen2lib.pipeline import load_backend
    from qwen2lib.model.long_context import long_context_overrides
    from qwen2lib.scratch.model import Qwen2

    folder = make_checkpoint()
    config = json.loads((folder / "config.json").read_text())
    ids = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(5))
    plain = load_backend(str(folder), "torch", workdir=tmp_path).logits(ids)
    ov = long_context_overrides("12,4", "4,64", config)
    backend = load_backend(str(folder), "torch", workdir=tmp_path, long_context=ov)
    assert "Dual Chunk Attention (chunk_size 12, local_size 4); YaRN" in capsys.readouterr().err
    assert type(backend.model).__module__.startswith("transformers_modules")  # the deploy package, not upstream
    ours = backend.logits(ids)
    assert (ours - plain).abs().max() > 1e-3
    # the teaching model reads the same overridden config.json the same way: YaRN frequencies, factor and DCA
    teaching = Qwen2(Qwen2Args.from_config_dict({**config, **ov}))
    teaching.load_state_dict(Qwen2.from_checkpoint(folder).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours, teaching.eval()(ids), atol=1e-4, rtol=0)
    assert backend.max_positions == 256


def test_cli_refuses_settings_it_cannot_apply_in_one_line(capsys):
    from qwen2lib.cli import main

    assert main(["generate", "--model", "tiny-random", "--prompt", "x", "--dca", "8,9"]) == 2
    assert "--dca '8,9'" in capsys.readouterr().err
    assert main(["eval", "ppl", "--model", "tiny-random", "--text", __file__, "--stage", "fp32 graph",
                 "--yarn", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stage is built from the checkpoint's own config" in err[0]


def test_context_variants_share_one_set_of_weights_and_score_like_separate_models(make_checkpoint):
    from qwen2lib.model.long_context import apply_overrides
    from qwen2lib.scratch import context_study
    from qwen2lib.scratch.model import Qwen2

    folder = make_checkpoint()
    config = json.loads((folder / "config.json").read_text())
    overrides = context_study.method_overrides(config, 16, 64, 12, 4)
    variants = context_study.load_variants(folder, overrides)
    tensors = {t.data_ptr() for m in variants.values() for t in m.parameters()}  # storage, not Parameter objects
    one = {t.data_ptr() for t in next(iter(variants.values())).parameters()}
    assert len(variants) == 4 and tensors == one, "each variant copied the weights"
    ids = torch.randint(0, 300, (48,), generator=torch.Generator().manual_seed(0))
    base = Qwen2.from_checkpoint(folder).eval()
    for method, extra in overrides.items():
        alone = Qwen2(Qwen2Args.from_config_dict(apply_overrides(config, extra))).eval()
        alone.load_state_dict(base.state_dict())
        torch.testing.assert_close(context_study.token_nll(variants[method], ids), context_study.token_nll(alone, ids),
                                   rtol=0, atol=0, msg=method)
