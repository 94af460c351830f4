"""Real sizes: the estimate of what a stage needs, the refusal, and the streamed paths equal to the whole-model ones."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import tiny_hf_config
from qwen2lib.model import footprint
from qwen2lib.compile.stage import load_weights
from qwen2lib.deploy import build_deploy_package, load_deploy_package
from qwen2lib.deploy.quantized_package import MAX_SHARD_BYTES
from qwen2lib.errors import InsufficientMemoryError
from qwen2lib.compile.plan import GraphPlan
from qwen2lib.compile.runtime import OnnxCausalLM
from qwen2lib.compile.builder import build_graph
from qwen2lib.compile.reference import streamed_reference
from qwen2lib.evaluation.fidelity import logits_fn
from qwen2lib.deploy.layerwise import LayerwiseModel
from qwen2lib.model.model_config import Qwen2Args
from qwen2lib.model.random_weights import build_random_model, random_state_dict, write_random_checkpoint
from qwen2lib.model.registry import resolve
from qwen2lib.model.tensorio import INDEX_FILE, TensorReader


@pytest.mark.parametrize("name", ["Qwen2-0.5B", "Qwen2.5-3B", "Qwen2-7B", "Qwen2.5-72B"])
def test_parameter_count_is_the_models(name):
    """The formula's count equals the parameters of transformers' model of that config (built on meta: no memory)."""
    from transformers import Qwen2ForCausalLM

    spec = resolve(name)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(spec.hf_config())
    counted = sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once
    assert footprint.parameter_counts(spec.config)["total"] == counted


def test_a_stage_that_does_not_fit_is_refused_with_the_numbers():
    config = resolve("Qwen2.5-72B").config
    with pytest.raises(InsufficientMemoryError, match=r"Qwen2.5-72B int8 graph needs ~\d+ GB resident; this machine "
                                                      r"has 23 GB available"):
        footprint.check_fits(config, "inference", "Qwen2.5-72B", precision="int8", available=23 * 10**9)
    for stage in ("calibration", "quantized"):  # one layer at a time: 72B calibrates and quantizes in 23 GB
        fits = footprint.check_fits(config, stage, "Qwen2.5-72B", available=23 * 10**9)
        assert fits.resident_bytes < 23 * 10**9, stage
    assert footprint.SHARD_BYTES == MAX_SHARD_BYTES  # the estimate's shard is the one the package writes
    int8 = footprint.estimate(config, "inference", "int8").resident_bytes
    assert 70e9 < int8 < 90e9, int8  # ~1 byte a parameter plus its scales and the cache


def test_gptq_and_awq_are_checked_against_their_own_estimate(monkeypatch):
    """GPTQ and AWQ hold the calibration blocks and down_proj's input second moment (GPTQ its factors too): 72B's
    do not fit in 23 GB where its plain quantize does, 7B's do; the stage check picks the estimate by the scheme."""
    big, seven = resolve("Qwen2.5-72B").config, resolve("Qwen2.5-7B").config
    with pytest.raises(InsufficientMemoryError, match=r"Qwen2.5-72B GPTQ/AWQ quantize needs ~\d+ GB resident"):
        footprint.check_fits(big, "quantized gptq", "Qwen2.5-72B", available=23 * 10**9)
    assert footprint.check_fits(seven, "quantized gptq", "Qwen2.5-7B", available=23 * 10**9)
    monkeypatch.setattr(footprint, "available_bytes", lambda: 23 * 10**9)
    monkeypatch.setattr(footprint, "config_of_inputs", lambda inputs: dict(big))
    footprint.check_stage("quantized", {"scheme": "w4a16"}, {"patched": "x"})  # fits: no error
    for scheme in ("awq", "gptq"):
        with pytest.raises(InsufficientMemoryError, match="GPTQ/AWQ quantize"):
            footprint.check_stage("quantized", {"scheme": scheme}, {"patched": "x"})


def test_a_quantized_compile_past_memory_is_built_unverified_and_says_so():
    config = resolve("Qwen2.5-72B").config
    fits, why = footprint.verification_fits(config, "int8", available=23 * 10**9)
    assert not fits and why.startswith("verification skipped: loading the graph needs ~") and "23 GB" in why
    build = footprint.stage_estimates(config)["compiled unverified"]
    assert build.resident_bytes < 23 * 10**9  # 72B compiles here: weights are written as they are built
    assert footprint.verification_fits(resolve("Qwen2-0.5B").config, "int8", available=23 * 10**9)[0]
    # an export streams its writer and both sides of its verification: 72B verifies here, a small machine refuses
    assert footprint.check_fits(config, "exported", "Qwen2.5-72B", available=23 * 10**9).resident_bytes < 16 * 10**9
    with pytest.raises(InsufficientMemoryError, match=r"export needs ~\d+ GB .*verification"):
        footprint.check_fits(config, "exported", "Qwen2.5-72B", available=6 * 10**9)
    assert footprint.estimate(config, "exported unverified").resident_bytes < 8 * 10**9  # the writers stream


def test_compile_skips_only_the_verification_that_cannot_fit(tmp_path, monkeypatch):
    from qwen2lib.compile import stage as compile_module
    from qwen2lib.compile.stage import ensure_compiled

    why = "verification skipped: loading the graph needs ~99 GB resident and this machine has 1 GB available"
    monkeypatch.setattr(compile_module, "verification_fits", lambda config, precision: (False, why))
    graph = ensure_compiled("tiny-random", "auto", tmp_path / "run", config="qwen2_int8", verbose=False)
    metrics = json.loads((graph / "metrics.json").read_text())
    assert metrics["parity"] == metrics["fidelity"] == {"skipped": why}
    lm = OnnxCausalLM.load(graph)  # the graph itself is whole and runs
    logits, _ = lm.prefill(np.arange(3, 9)[None])
    assert np.isfinite(logits).all()
    fp32 = ensure_compiled("tiny-random", "auto", tmp_path / "run", config="qwen2_fp32", verbose=False)
    assert "skipped" not in json.loads((fp32 / "metrics.json").read_text())["fidelity"]  # fp32 is never unverified


def test_ensure_stage_refuses_before_building(tmp_path, monkeypatch):
    from qwen2lib.calibrate.stage import ensure_calibration

    monkeypatch.setattr(footprint, "available_bytes", lambda: 100 << 20)  # a machine with 100 MB free
    with pytest.raises(InsufficientMemoryError, match="calibration needs ~.* resident; this machine has 0.1 GB"):
        ensure_calibration("tiny-random", workdir=tmp_path, samples=2, seq_len=8, verbose=False, progress=False)
    assert not (tmp_path / "calibration").exists()


def test_random_checkpoint_is_streamed_seeded_and_sharded(tmp_path):
    """Written tensor by tensor in shards, it loads in transformers with exactly the seeded values; same seed, same
    bytes; another seed, other values."""
    from transformers import Qwen2ForCausalLM

    config = tiny_hf_config(num_hidden_layers=2, tie_word_embeddings=False)
    files = write_random_checkpoint(config, tmp_path / "a", seed=3, max_shard_bytes=40_000)
    assert files[-1].name == INDEX_FILE and len(files) > 2
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    expected = random_state_dict(config.to_dict(), seed=3, dtype=torch.bfloat16)
    state = model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor.float(), rtol=0, atol=0, msg=name)
    assert float(expected["model.layers.1.mlp.up_proj.weight"].float().std()) == pytest.approx(0.02, rel=0.1)
    again = write_random_checkpoint(tiny_hf_config(num_hidden_layers=2, tie_word_embeddings=False), tmp_path / "b",
                                    seed=3, max_shard_bytes=40_000)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in again]
    other = random_state_dict(config.to_dict(), seed=4)["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(other, expected["model.layers.0.self_attn.q_proj.weight"].float())
    small = build_random_model(resolve("tiny-random"), torch.float32, seed=0)  # the whole-model path: same values
    whole = random_state_dict(small.config.to_dict(), seed=0)
    torch.testing.assert_close(small.model.layers[2].mlp.down_proj.weight, whole["model.layers.2.mlp.down_proj.weight"])


@pytest.fixture
def package(make_checkpoint, tmp_path):
    return build_deploy_package(make_checkpoint(num_hidden_layers=3, tie_word_embeddings=False), tmp_path / "patched")


def test_streamed_reference_equals_the_whole_model(package):
    ids = torch.randint(0, 320, (3, 17), generator=torch.Generator().manual_seed(0))
    whole = logits_fn(load_deploy_package(package))(ids)
    streamed = streamed_reference(Path(package))(ids)
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-5)
    layerwise = LayerwiseModel(package)
    assert all(p.device.type == "meta" for p in layerwise.skeleton.parameters())  # nothing left loaded after a run


def test_streamed_fidelity_equals_the_whole_models_report(package, tmp_path):
    """Notebook 03's report, both sides streamed layer by layer, is the report of the two whole models."""
    from qwen2lib.quantize import stage as q
    from qwen2lib.evaluation.fidelity import fidelity_report, per_layer_sqnr

    reference = load_deploy_package(package, torch.float32)
    type(reference).quantize_checkpoint(package, tmp_path / "int8", "w8a16")
    candidate = q.load_quantized(tmp_path / "int8")
    blocks = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(1))
    report, sqnr = q.streamed_fidelity(LayerwiseModel(package),
                                       LayerwiseModel(tmp_path / "int8", verify=q.verify_quantized_code), blocks)
    whole = fidelity_report(logits_fn(reference), logits_fn(candidate), blocks, batch_size=1)
    assert report.keys() == whole.keys() and 0 < whole["kld_mean"]
    for key, value in whole.items():
        assert report[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    whole_sqnr = per_layer_sqnr(reference, candidate, blocks[:1])
    assert sqnr.keys() == whole_sqnr.keys()
    for name, value in whole_sqnr.items():
        assert sqnr[name] == pytest.approx(value, abs=0.05), name


@pytest.mark.parametrize("plan", [{}, {"quantize": ("embed_tokens", "attention", "mlp", "lm_head")}])
def test_streamed_graph_equals_the_in_memory_one(make_checkpoint, tmp_path, plan):
    """Initializers written to the data file as they are made: the same graph, inline or external."""
    folder = make_checkpoint(num_hidden_layers=2)
    args = Qwen2Args.from_config_dict(json.loads((folder / "config.json").read_text()))
    graph_plan = GraphPlan(max_sequence_length=64, **plan)
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for label, external in (("memory", True), ("streamed", True), ("streamed_inline", False)):
        out = tmp_path / label
        built = build_graph(args, load_weights(folder), graph_plan, out_dir=None if label == "memory" else out)
        files = built.save(out, external)
        assert [f.name for f in files] == (["model.onnx", "model.onnx.data"] if external else ["model.onnx"])
        onnx.checker.check_model(str(out / "model.onnx"))
        outputs[label] = OnnxCausalLM.load(out / "model.onnx")(ids)
    assert (tmp_path / "memory" / "model.onnx.data").read_bytes() == (tmp_path / "streamed" / "model.onnx.data").read_bytes()
    assert not (tmp_path / "streamed_inline" / "model.onnx.data").exists()
    for label in ("streamed", "streamed_inline"):
        np.testing.assert_array_equal(outputs[label], outputs["memory"])


def test_tensor_reader_reads_rows_and_blocks(make_checkpoint):
    reader = TensorReader(make_checkpoint())
    table = reader["model.embed_tokens.weight"]
    ids = torch.tensor([[5, 3, 5], [319, 0, 3]])
    torch.testing.assert_close(reader.rows("model.embed_tokens.weight", ids), table[ids].float())
    blocks = torch.cat([rows for _, rows in reader.row_blocks("model.embed_tokens.weight", 100)])
    torch.testing.assert_close(blocks, table.float())
