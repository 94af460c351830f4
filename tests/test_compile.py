"""Notebook 04: YAML configs, the hand-built ONNX graphs, their parity/fidelity vs torch, the compile folder."""
from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qwen2lib.compile.manifest import GraphManifest
from qwen2lib.compile.stage import (CompileVerificationError, compile_model, config_path, ensure_compiled,
                                    load_weights, sha256_of)
from qwen2lib.compile.config_schema import CompileConfig, ConfigError, describe_schema, load_config
from qwen2lib.errors import MissingInputError, NumericalOverflowError, PromptTooLongError
from qwen2lib.model.model_config import Qwen2Args
from qwen2lib.deploy.quantizer import quantize_per_block, quantize_weight
from qwen2lib.compile.plan import GraphPlan, activation_outliers
from qwen2lib.compile.runtime import OnnxCausalLM, check_finite
from qwen2lib.compile.builder import build_graph, op_histogram
from qwen2lib.compile.ops import pack_matmul_nbits
from qwen2lib.compile.plan import PlanError
from qwen2lib.compile.verify import activation_ranges, fp16_plan

SHIPPED = ("qwen2_fp32", "qwen2_fp16", "qwen2_int8", "qwen2_int8_block32", "qwen2_int4", "qwen2_fp32_standard")


# ---- helpers ----------------------------------------------------------------------------------

def hf_model(folder):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def graph_for(folder, tmp_path, **plan):
    """Build, save and load a graph straight from the builder (no verification phase)."""
    args = Qwen2Args.from_config_dict(json.loads((Path(folder) / "config.json").read_text()))
    built = build_graph(args, load_weights(Path(folder)), GraphPlan(max_sequence_length=256, **plan))
    out = tmp_path / f"graph-{len(list(tmp_path.glob('graph-*')))}"
    built.save(out)
    onnx.checker.check_model(str(out / "model.onnx"))
    return OnnxCausalLM.load(out / "model.onnx"), built


def decode_vs_reference(lm, hf, prompt, steps=16):
    """max |dlogits| of graph prefill + cached greedy steps vs the reference's full forward on the same tokens."""
    logits, state = lm.prefill(prompt)
    seq = prompt[0].tolist()
    got = [logits[0]]
    for _ in range(steps):
        seq.append(int(logits[0, -1].argmax()))
        logits, state = lm.decode([[seq[-1]]], state)
        got.append(logits[0])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([seq])).logits[0].numpy()
    return float(np.abs(np.concatenate(got) - ref).max())


def small_config(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# ---- YAML configs -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    cfg = load_config(config_path(name))
    assert cfg.name == name
    assert cfg.precision == name.split("_")[1]
    assert cfg.graph.kv_cache_layout == "BNSH"


def test_unknown_key_is_named_with_its_line(tmp_path):
    path = small_config(tmp_path, """
        precision: int8
        graph:
          opset: 21
          insert_slcie: true
        """)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.key == "graph.insert_slcie" and exc.value.line == 4
    assert f"{path.resolve()}:4:" in str(exc.value) and "insert_slice" in str(exc.value)  # the suggestion


def test_wrong_type_is_named_with_its_line(tmp_path):
    path = small_config(tmp_path, """
        graph:
          opset: "21"
        """)
    with pytest.raises(ConfigError, match=r":2: graph.opset: expected int, got str") as exc:
        load_config(path)
    assert exc.value.line == 2
    path = small_config(tmp_path, "graph:\n  max_sequence_length: true\n")
    with pytest.raises(ConfigError, match="expected int, got bool"):
        load_config(path)  # YAML true is not a number
    path = small_config(tmp_path, "verify:\n  max_kld_mean: 1e-3\n")
    with pytest.raises(ConfigError, match=r"write 1.0e-4"):
        load_config(path)  # YAML 1.1 reads 1e-3 as text


def test_bad_choice_and_section_shape(tmp_path):
    with pytest.raises(ConfigError, match=r":1: precision: 'int2' is not one of fp32, fp16, int8, int4"):
        load_config(small_config(tmp_path, "precision: int2\n"))
    with pytest.raises(ConfigError, match=r"awq is an int4 package: precision int8 takes w8a16 or smoothquant"):
        load_config(small_config(tmp_path, "precision: int8\nquantization:\n  from_scheme: awq\n"))
    with pytest.raises(ConfigError, match="graph: must be a section"):
        load_config(small_config(tmp_path, "graph: contrib\n"))
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(small_config(tmp_path, "precision: fp32\nprecision: fp16\n"))


def test_missing_files_are_named_with_their_line(tmp_path):
    path = small_config(tmp_path, """
        precision: fp32
        source:
          checkpoint: no/such/folder
        """)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.key == "source.checkpoint" and exc.value.line == 3 and "does not exist" in str(exc.value)
    with pytest.raises(ConfigError, match=r":1: base: 'missing.yaml' does not exist"):
        load_config(small_config(tmp_path, "base: missing.yaml\n"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_rules_between_keys_point_at_the_offending_line(tmp_path):
    path = small_config(tmp_path, f"""
        base: {config_path('qwen2_int8').resolve()}
        graph:
          operator_set: standard
        """)
    with pytest.raises(ConfigError, match=r":3: graph.operator_set: precision int8 needs operator_set 'contrib'"):
        load_config(path)
    with pytest.raises(ConfigError, match="block_size: 48"):
        load_config({"precision": "int8", "quantization": {"block_size": 48}})


def test_base_inheritance_and_overrides():
    cfg = load_config(config_path("qwen2_int8"), {"graph.insert_slice": True})
    assert cfg.graph.operator_set == "contrib" and cfg.graph.insert_slice is True
    assert cfg.verify.prompt_tokens == load_config(config_path("qwen2_fp32")).verify.prompt_tokens
    keys = {row["key"] for row in describe_schema()}
    assert {"graph.dynamic_axes.batch", "quantization.granularity", "fp16.on_overflow"} <= keys


def test_the_dataclasses_are_the_schema():
    rows = {row["key"]: row for row in describe_schema()}
    defaults = CompileConfig()
    assert rows["graph.opset"]["default"] == defaults.graph.opset == 21 and rows["graph.opset"]["type"] == "int"
    assert rows["quantization.modules"]["default"] == list(defaults.quantization.modules)  # a YAML list, a tuple here
    assert rows["quantization.per_block_projections"]["type"] == "list | str"
    assert rows["precision"]["choices"] == ("fp32", "fp16", "int8", "int4") and rows["precision"]["meaning"]
    assert "origin" not in rows  # where it was loaded from is not a key
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.graph.opset = 17  # type: ignore[misc]


@pytest.mark.parametrize("name", SHIPPED)
def test_as_dict_is_the_recorded_config_and_loads_back(name):
    cfg = load_config(config_path(name))
    recorded = json.loads(json.dumps(cfg.as_dict()))  # what the stage key and manifest.json hold
    assert list(recorded) == ["name", "source", "precision", "quantization", "graph", "fp16", "runtime", "verify"]
    assert recorded["graph"]["dynamic_axes"] == {"batch": "dynamic", "sequence": "dynamic", "past_sequence": "dynamic"}
    assert isinstance(recorded["quantization"]["modules"], list)
    again = load_config({**recorded, "_source": cfg.origin})  # a manifest's config, reloaded
    assert again == cfg and again.origin is None and cfg.origin == str(config_path(name).resolve())
    changed = load_config(cfg, {"graph.opset": 19})  # a loaded config takes overrides too, checked again
    assert changed.graph.opset == 19 and changed.origin == cfg.origin and changed.verify == cfg.verify


def test_graph_rules_live_in_the_plan_and_yaml_errors_point_at_the_key(tmp_path):
    with pytest.raises(PlanError) as direct:
        GraphPlan(quantize=("mlp",), block_size=48)
    assert direct.value.field == "block_size"
    path = small_config(tmp_path, """
        precision: int8
        quantization:
          activations: int8_per_block
          block_size: 48
        """)
    with pytest.raises(ConfigError) as from_yaml:
        load_config(path)
    assert from_yaml.value.key == "quantization.block_size" and from_yaml.value.line == 4
    assert from_yaml.value.message == direct.value.message  # the same rule, written once
    with pytest.raises(ConfigError, match=r"--set: quantization.modules: \['mlp', 'mlp'\]: list each of"):
        load_config(config_path("qwen2_int8"), {"quantization.modules": ["mlp", "mlp"]})
    with pytest.raises(ConfigError, match=r":2: graph.opset: 16 is outside the supported 17-23"):
        load_config(small_config(tmp_path, "graph:\n  opset: 16\n"))


def test_calibration_statistics_decide_which_projections_stay_per_block():
    flat, spiky = torch.ones(64), torch.ones(64)
    spiky[5] = 4.0  # one channel 4x the median: one scale per call would leave the others 2 bits fewer
    stats = {}
    for i in range(2):
        for linear in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj"):
            stats[f"model.layers.{i}.{linear}.absmax"] = flat
        stats[f"model.layers.{i}.mlp.down_proj.absmax"] = spiky if i == 1 else flat  # the worst layer counts
    decided = activation_outliers(stats)
    assert decided["per_block_projections"] == ["down_proj"]
    assert decided["max_over_median"] == {"qkv_proj": 1.0, "o_proj": 1.0, "gate_up_proj": 1.0, "down_proj": 4.0}
    stats["model.layers.0.self_attn.o_proj.absmax"] = torch.full((64,), 3.9).index_fill(0, torch.tensor([0]), 15.0)
    assert activation_outliers(stats)["per_block_projections"] == ["down_proj"]  # 15 / 3.9 < 4


# ---- int8 packing -----------------------------------------------------------------------------

def test_per_channel_and_per_block_int8_error_bounds():
    torch.manual_seed(0)
    w = (torch.randn(24, 200) * torch.logspace(-2, 1, 24)[:, None]).numpy()  # rows of very different scale
    q, s = quantize_weight(w)
    assert q.dtype == np.int8 and s.shape == (24,) and np.abs(q).max() <= 127
    assert np.all(np.abs(q * s[:, None] - w) <= s[:, None] / 2 + 1e-7)  # round-to-nearest: half a step at most
    qb, sb = quantize_per_block(w, 64)
    assert sb.shape == (24, 4)
    assert np.all(np.abs(qb * np.repeat(sb, 64, 1)[:, :200] - w) <= np.repeat(sb, 64, 1)[:, :200] / 2 + 1e-7)
    packed, scales = pack_matmul_nbits(q, s, 64, "float32")
    assert packed.shape == (24, 4, 64) and scales.shape == (24, 4)
    restored = (packed.reshape(24, -1)[:, :200].astype(np.int16) - 128) * scales.repeat(64, 1)[:, :200]
    np.testing.assert_allclose(restored, q * s[:, None], rtol=0, atol=0)
    assert np.all(packed.reshape(24, -1)[:, 200:] == 128)  # padding dequantizes to zero


# ---- fp32 parity: both operator sets, several head layouts --------------------------------------

@pytest.mark.parametrize("operator_set", ["contrib", "standard"])
@pytest.mark.parametrize("heads,kv_heads,tied,rope", [
    (4, 2, True, None),  # the tiny shape: GQA with 2 query heads per KV head
    (4, 4, False, None),  # multi-head attention, untied head
    (8, 1, True, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),  # MQA + YaRN
    (6, 3, False, {"rope_type": "linear", "factor": 2.0}),
])
def test_fp32_graph_matches_transformers_over_prompt_and_cached_decode(make_checkpoint, tmp_path, operator_set,
                                                                       heads, kv_heads, tied, rope):
    rope_parameters = {"rope_type": "default", "rope_theta": 1e6} if rope is None else {"rope_theta": 1e6, **rope}
    folder = make_checkpoint(num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                             hidden_size=96 if heads == 6 else 64, rope_parameters=rope_parameters)
    lm, built = graph_for(folder, tmp_path, operator_set=operator_set)
    prompt = torch.randint(0, 320, (1, 11), generator=torch.Generator().manual_seed(1)).numpy()
    assert decode_vs_reference(lm, hf_model(folder), prompt, steps=16) <= 1e-4
    ops = op_histogram(built)
    if operator_set == "contrib":
        assert ops["com.microsoft:GroupQueryAttention"] == 2 and ops["com.microsoft:RotaryEmbedding"] == 4
    else:
        assert not any(op.startswith("com.microsoft") for op in ops)


@pytest.mark.parametrize("operator_set", ["contrib", "standard"])
def test_left_padded_batch_and_prompt_continuation(make_checkpoint, tmp_path, operator_set):
    """Rows of different lengths, left-padded, decode like each row alone; a prompt continued over
    a cache (T > 1 with a past) equals the uncached forward."""
    folder = make_checkpoint()
    hf = hf_model(folder)
    lm, _ = graph_for(folder, tmp_path, operator_set=operator_set)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (9, 4, 6)]
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    logits, state = lm.prefill(ids, mask)
    seqs = [list(r) for r in rows]
    for _ in range(5):
        nxt = logits[:, -1].argmax(-1)
        for s, t in zip(seqs, nxt):
            s.append(int(t))
        logits, state = lm.decode(nxt[:, None], state)
    with torch.no_grad():
        for b, s in enumerate(seqs):
            ref = hf(input_ids=torch.tensor([s])).logits[0, -1].numpy()
            assert np.abs(logits[b, -1] - ref).max() <= 1e-4, f"row {b}"
    # continue a prompt of 7 tokens with 5 more in one call, batch of 2
    ids2 = torch.randint(0, 320, (2, 12), generator=gen).numpy()
    _, state = lm.prefill(ids2[:, :7])
    logits, _ = lm.run(ids2[:, 7:], np.ones((2, 12), np.int64), past=state.past)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids2)).logits[:, 7:].numpy()
    assert np.abs(logits - ref).max() <= 1e-4


def test_contrib_decode_writes_the_cache_in_place_and_grows_it(make_checkpoint, tmp_path):
    """Shared past/present buffers give the logits of the copying path, across a buffer growth."""
    lm, _ = graph_for(make_checkpoint(), tmp_path, operator_set="contrib")
    ids = torch.randint(0, 320, (2, 5), generator=torch.Generator().manual_seed(3)).numpy()
    logits, state = lm.prefill(ids)
    past, mask = state.past, state.attention_mask
    capacities, same_buffers = set(), []
    for step in range(140):  # the first buffers hold 5 + 128 positions: one growth on the way
        nxt = logits[:, -1].argmax(-1)[:, None]
        previous = state.buffers if step else None
        logits, state = lm.decode(nxt, state)
        same_buffers.append(state.buffers is previous)
        capacities.add(state.capacity)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        copied, past = lm.run(nxt, mask, past=past)  # the copying path: fresh present arrays each step
        np.testing.assert_allclose(logits, copied, atol=1e-5, rtol=0)
    assert len(capacities) == 2 and min(capacities) == 5 + 128, capacities
    assert sum(same_buffers) == 138, "decode should reuse its buffers except when it allocates or grows them"
    for (k, v), (k_ref, v_ref) in zip(state.past, past):
        np.testing.assert_allclose(k, k_ref, atol=1e-6, rtol=0)
        np.testing.assert_allclose(v, v_ref, atol=1e-6, rtol=0)


def test_positions_past_the_graph_limit_are_refused(make_checkpoint, tmp_path):
    lm, _ = graph_for(make_checkpoint(), tmp_path)
    lm.max_positions = 8
    with pytest.raises(PromptTooLongError, match="past this graph's limit of 8"):
        lm.prefill(np.zeros((1, 9), np.int64))
    _, state = lm.prefill(np.zeros((1, 8), np.int64))  # positions 0..7 fit; the next token's does not
    with pytest.raises(PromptTooLongError, match="position 8 is past"):
        lm.decode([[1]], state)


def test_insert_slice_and_fixed_axes(make_checkpoint, tmp_path):
    folder = make_checkpoint()
    lm, built = graph_for(folder, tmp_path, insert_slice=True, batch=1)
    prompt = np.arange(3, 13)[None]
    logits, _ = lm.prefill(prompt)
    assert logits.shape == (1, 1, 320)
    with torch.no_grad():
        ref = hf_model(folder)(input_ids=torch.tensor(prompt)).logits
    assert np.abs(logits[0, -1] - ref[0, -1].numpy()).max() <= 1e-4
    # the fidelity callable walks a last-position graph through its cache
    assert torch.allclose(lm(torch.tensor(prompt)), ref, atol=1e-4)
    assert built.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


# ---- the compile: folder, manifest, reuse, atomicity, CLI ------------------------------------------

def test_manifest_is_one_typed_record_and_refuses_another_format(tmp_path):
    m = GraphManifest(operator_set="contrib", max_sequence_length=64, dual_chunk_attention={"chunk_size": 12,
                      "local_size": 4}, config={"precision": "int8", "runtime": {"threads": 2}})
    m.write(tmp_path)
    back = GraphManifest.read(tmp_path)
    assert back == m and back.runtime == {"threads": 2} and back.compiled_precision == "int8"
    assert back.graph_file == "model.onnx" and GraphManifest().runtime == {} and GraphManifest().compiled_precision is None
    data = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "weights_layout": "x"}))
    with pytest.raises(MissingInputError, match="unknown keys weights_layout.*compile it again"):
        GraphManifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "format": "qwen2lib-compiled/0"}))
    with pytest.raises(MissingInputError, match="format 'qwen2lib-compiled/0'"):
        GraphManifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(MissingInputError, match="not JSON"):
        GraphManifest.read(tmp_path)


def test_compile_writes_a_verified_folder_with_manifest(make_checkpoint, tmp_path):
    folder = make_checkpoint()
    out = compile_model(config_path("qwen2_fp32"), model=str(folder), workdir=tmp_path / "wd", verbose=False)
    assert out == tmp_path / "wd" / "compiled" / "qwen2_fp32"
    m = GraphManifest.read(out)
    names_in = [i["name"] for i in m.inputs]
    names_out = [o["name"] for o in m.outputs]
    assert names_in == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                        "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert names_out[:3] == ["logits", "present.0.key", "present.0.value"]
    assert m.inputs[3]["shape"] == ["batch", 2, "past_sequence", 16]  # (B, n_kv, P, hd)
    assert m.outputs[1]["shape"] == ["batch", 2, "total_sequence", 16]
    assert m.parity["max_abs_dlogits"] <= 1e-4 and m.parity["decode_steps"] == 16
    assert m.fidelity["top1_agreement"] == 1.0
    assert m.graph["opset_imports"] == {"ai.onnx": 21, "com.microsoft": 1}
    assert m.precision["attention"] == "fp32" and m.op_histogram["com.microsoft:GroupQueryAttention"] == 2
    for name, f in m.files.items():
        assert sha256_of(out / name) == f["sha256"], name
    assert "config.json" in m.files and json.loads((out / "metrics.json").read_text())["parity"] == m.parity
    onnx.checker.check_model(str(out / "model.onnx"))
    assert not list((tmp_path / "wd" / "compiled").glob(".*"))  # no temp folders left behind


def test_ensure_compiled_reuses_only_an_identical_request(make_checkpoint, tmp_path):
    folder = str(make_checkpoint())
    wd = tmp_path / "wd"
    first = ensure_compiled(folder, "auto", wd, config="qwen2_fp32_standard", verbose=False)
    stamp = (first / "model.onnx").stat().st_mtime_ns
    assert ensure_compiled(folder, "auto", wd, config="qwen2_fp32_standard", verbose=False) == first
    assert (first / "model.onnx").stat().st_mtime_ns == stamp
    ensure_compiled(folder, "auto", wd, config="qwen2_fp32_standard", overrides={"graph.opset": 19}, verbose=False)
    assert (first / "model.onnx").stat().st_mtime_ns != stamp
    assert GraphManifest.read(first).graph["opset_imports"]["ai.onnx"] == 19
    # a retrained checkpoint (new weight file) is a different request too
    stamp = (first / "model.onnx").stat().st_mtime_ns
    weights_file = Path(folder) / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes())
    ensure_compiled(folder, "auto", wd, config="qwen2_fp32_standard", overrides={"graph.opset": 19}, verbose=False)
    assert (first / "model.onnx").stat().st_mtime_ns != stamp


def test_a_graph_missing_its_bounds_installs_nothing(make_checkpoint, tmp_path):
    folder = make_checkpoint()
    good = compile_model(config_path("qwen2_fp32"), model=str(folder), workdir=tmp_path, verbose=False)
    stamp = (good / "model.onnx").stat().st_mtime_ns
    with pytest.raises(CompileVerificationError, match=r"min_top1_agreement 1\.5"):
        compile_model(config_path("qwen2_fp32"), model=str(folder), workdir=tmp_path, verbose=False,
                      overrides={"verify.min_top1_agreement": 1.5})
    assert (good / "model.onnx").stat().st_mtime_ns == stamp  # the earlier good folder is untouched
    assert sorted(p.name for p in good.parent.iterdir()) == ["qwen2_fp32"]


def test_external_data_folder_runs_like_the_embedded_one(make_checkpoint, tmp_path):
    folder = make_checkpoint()
    out = compile_model(config_path("qwen2_fp32"), model=str(folder), workdir=tmp_path, verbose=False,
                        overrides={"graph.external_data": "always", "name": "ext"})
    m = GraphManifest.read(out)
    assert m.graph["external_data"] == "model.onnx.data" and "model.onnx.data" in m.files
    assert (out / "model.onnx").stat().st_size < 200_000  # the weights live in the data file
    assert m.parity["max_abs_dlogits"] <= 1e-4


def test_cli_compiles_and_reports_bad_configs_in_one_line(make_checkpoint, tmp_path, capsys):
    from qwen2lib.cli import main

    folder = make_checkpoint()
    rc = main(["compile", "qwen2_fp32_standard", "--model", str(folder), "--workdir", str(tmp_path / "wd"),
               "--set", "graph.insert_slice=true"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(7/8) verify vs torch" in out and '"max_abs_dlogits"' in out
    assert GraphManifest.read(tmp_path / "wd" / "compiled" / "qwen2_fp32_standard").insert_slice is True
    bad = small_config(tmp_path, "precision: fp32\nruntime:\n  threads: two\n")
    assert main(["compile", str(bad), "--model", str(folder), "--workdir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cfg.yaml:3: runtime.threads: expected int" in err[0]


# ---- fp16 and int8: fidelity bounds, overflow ------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2_fp16", "qwen2_int8"])
def test_fp16_and_int8_graphs_meet_the_shipped_fidelity_bounds(make_checkpoint, tmp_path, name):
    folder = make_checkpoint(num_hidden_layers=3)
    # int8 from the raw checkpoint (this toy checkpoint has no tokenizer to calibrate with): the shared quantizer
    overrides = ({"source.package": "checkpoint", "quantization.per_block_projections": ["down_proj"]}
                 if name == "qwen2_int8" else {})
    out = compile_model(config_path(name), model=str(folder), workdir=tmp_path, verbose=False,
                        overrides=overrides)  # raises if not
    m = GraphManifest.read(out)
    bounds = load_config(config_path(name)).verify
    fid = m.fidelity
    assert fid["kld_mean"] <= bounds.max_kld_mean and fid["top1_agreement"] >= bounds.min_top1_agreement
    assert fid["ppl_ratio"] <= bounds.max_ppl_ratio
    assert fid["kld_mean"] > 0  # really a different precision, not the fp32 graph
    if name == "qwen2_int8":
        # q|k|v, o and gate|up quantize their activations per call; down_proj (the SwiGLU product, outlier
        # channels) per block in MatMulNBits, like the head
        assert m.op_histogram["com.microsoft:DynamicQuantizeMatMul"] == 3 * 3
        assert m.op_histogram["com.microsoft:MatMulNBits"] == 3 + 1
        assert m.precision["mlp"].startswith("int8 per-channel") and "down_proj: MatMulNBits" in m.precision["mlp"]
        assert m.op_histogram["com.microsoft:GatherBlockQuantized"] == 1
        assert m.precision["lm_head"].endswith("(tied: shares embed_tokens)")
        uint8_tables = [t for t in onnx.load(str(out / "model.onnx")).graph.initializer
                        if t.data_type == onnx.TensorProto.UINT8 and t.dims[0] == 320]
        assert len(uint8_tables) == 1  # the tied embedding and LM head are one int8 table
        assert m.inputs[3]["dtype"] == "float32"
    else:
        assert m.inputs[3]["dtype"] == "float16" and m.outputs[0]["dtype"] == "float32"
        assert m.fp16_probe["kept_in_fp32"] == []


def test_int8_graph_reuses_notebook03_weights_and_scales(make_checkpoint, tmp_path):
    """A quantized package (int8 weights + per-channel scales) gives the same graph as quantizing here."""
    from safetensors.numpy import save_file

    folder = make_checkpoint()
    weights = load_weights(folder)
    package = tmp_path / "quantized"
    package.mkdir()
    tensors = {}
    for name, w in weights.items():
        if name.endswith("_proj.weight"):
            q, s = quantize_weight(w)
            tensors[name], tensors[name.replace(".weight", ".weight_scale")] = q, s
    save_file(tensors, str(package / "model.safetensors"))
    here = compile_model(config_path("qwen2_int8"), model=str(folder), workdir=tmp_path / "a", verbose=False,
                         overrides={"source.package": "checkpoint", "quantization.per_block_projections": []})
    reused = compile_model(config_path("qwen2_int8"), model=str(folder), workdir=tmp_path / "b", verbose=False,
                           overrides={"quantization.package": str(package), "quantization.per_block_projections": []})
    assert "notebook 03 package" in GraphManifest.read(reused).source["int8_weights"]
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(3))
    a, b = OnnxCausalLM.load(here)(ids), OnnxCausalLM.load(reused)(ids)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_package_reader_reads_what_the_quantizer_writes_and_refuses_the_rest(tmp_path):
    from safetensors.torch import save_file

    from qwen2lib.deploy.quantizer import Int4Linear, Int8Linear, QuantizationError
    from qwen2lib.quantize.package_reader import SCALE, ZERO_POINT, Int4Weight, read_quantized_package

    linear = torch.nn.Linear(64, 8, bias=False)
    tensors = {f"a.{k}": v for k, v in Int8Linear.from_linear(linear).state_dict().items()}
    tensors |= {f"b.{k}": v for k, v in Int4Linear.from_linear(linear, group_size=32).state_dict().items()}
    tensors["norm.weight"] = torch.ones(64)
    assert set(tensors) == {"a.weight", f"a.{SCALE}", "b.weight", f"b.{SCALE}", f"b.{ZERO_POINT}", "norm.weight"}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"group_size": 32}}))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    floats, quantized = read_quantized_package(tmp_path)
    assert list(floats) == ["norm.weight"] and sorted(quantized) == ["a.weight", "b.weight"]
    q, scale = quantized["a.weight"]
    assert q.dtype == np.int8 and scale.shape == (8, 1)
    np.testing.assert_allclose(q * scale, linear.weight.detach().numpy(), atol=float(scale.max()) / 2 + 1e-7)
    int4 = quantized["b.weight"]
    assert isinstance(int4, Int4Weight) and int4.q.shape == (8, 64) and int4.group_size == 32
    save_file({"a.weight": tensors["a.weight"], "a.scales": tensors[f"a.{SCALE}"]}, str(tmp_path / "model.safetensors"))
    with pytest.raises(QuantizationError, match="a.weight is not an X.weight with its X.weight_scale"):
        read_quantized_package(tmp_path)


def int4_package(folder, out, scheme):
    """A quantized int4 package of a checkpoint (the quantizer's tensors and config) and its torch model."""
    from safetensors.torch import save_file

    from transformers import AutoModelForCausalLM

    from qwen2lib.calibrate.stage import collect_activation_stats
    from qwen2lib.deploy import build_deploy_package, schemes
    from qwen2lib.deploy.quantized_package import state_dict_for_saving

    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(1))
    if scheme in schemes.LAYERWISE_SCHEMES:  # calibrated layer by layer: the deploy package's model runs them
        model = AutoModelForCausalLM.from_pretrained(build_deploy_package(folder, out.parent / "patched"),
                                                     trust_remote_code=True).eval()
    else:
        model = hf_model(folder)
    stats = {**collect_activation_stats(model, ids, progress=False), schemes.CALIBRATION_IDS: ids}
    schemes.quantize_model(model, scheme, stats=stats, group_size=32)
    out.mkdir()
    save_file(state_dict_for_saving(model), str(out / "model.safetensors"))
    config = json.loads((Path(folder) / "config.json").read_text())
    config["quantization_config"] = model.config.quantization_config
    (out / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("scheme", ["w4a16", "awq"])
def test_int4_graph_equals_the_torch_int4_model(make_checkpoint, tmp_path, scheme):
    """MatMulNBits bits=4 with float activations computes what the package's Int4Linear modules compute; with
    int8 per-block activations (the shipped config) it stays close."""
    folder = make_checkpoint()
    model = int4_package(folder, tmp_path / "pkg", scheme)
    unbounded = {"verify.max_kld_mean": None, "verify.min_top1_agreement": None, "verify.max_ppl_ratio": None,
                 "quantization.package": str(tmp_path / "pkg")}
    exact = compile_model(config_path("qwen2_int4"), model=str(folder), workdir=tmp_path / "a", verbose=False,
                          overrides={**unbounded, "quantization.activations": "float",
                                     "quantization.modules": ["attention", "mlp"]})  # the torch head stays float
    manifest = GraphManifest.read(exact)
    assert manifest.precision["mlp"].startswith("int4 asymmetric, group 32")
    assert manifest.op_histogram["com.microsoft:MatMulNBits"] == 2 * 4  # q|k|v, o, gate|up, down x 2 layers
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids).logits
    torch.testing.assert_close(OnnxCausalLM.load(exact)(ids), reference, rtol=0, atol=2e-4)
    shipped = compile_model(config_path("qwen2_int4"), model=str(folder), workdir=tmp_path / "b", verbose=False,
                            overrides=unbounded)
    assert "int8" in GraphManifest.read(shipped).precision["lm_head"]
    logits = OnnxCausalLM.load(shipped)(ids)
    kld = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                     reduction="none").sum(-1).mean()
    assert 0 < float(kld) < 1e-2, float(kld)


def _overflowing_checkpoint(make_checkpoint):
    """A checkpoint whose layer-0 MLP writes ~1e5 into one residual channel, as bf16-trained models can:
    fine in fp32 (the norms rescale it), inf in fp16."""
    from safetensors.torch import load_file, save_file

    folder = make_checkpoint(num_hidden_layers=2)
    path = folder / "model.safetensors"
    state = load_file(path)
    mlp = "model.layers.0.mlp"
    state[f"{mlp}.gate_proj.weight"][7] *= 300  # one hidden unit fires ~50x harder ...
    state[f"{mlp}.up_proj.weight"][7] *= 300
    state[f"{mlp}.down_proj.weight"][5, 7] = 100.0  # ... and writes ~1e5 into residual channel 5
    save_file(state, str(path), metadata={"format": "pt"})
    return folder


def test_fp16_overflow_is_detected_and_kept_in_fp32_or_refused(make_checkpoint, tmp_path):
    folder = _overflowing_checkpoint(make_checkpoint)
    hf = hf_model(folder)
    blocks = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    ranges = activation_ranges(hf, blocks)
    assert ranges["layers.0.down_proj"] > 65504 and ranges["layers.0.residual"] > 65504
    # 1) the detector: an fp16 graph that ignores the probe really emits inf/NaN, and it is caught
    args = Qwen2Args.from_config_dict(json.loads((folder / "config.json").read_text()))
    raw = build_graph(args, load_weights(folder), GraphPlan(dtype="float16", max_sequence_length=64))
    raw.save(tmp_path / "raw")
    logits, state = OnnxCausalLM.load(tmp_path / "raw" / "model.onnx").prefill(blocks[:1].numpy())
    with pytest.raises(NumericalOverflowError, match="inf/NaN"):
        check_finite(logits, state.past, "fp16 graph")
    # 2) on_overflow: error names what overflowed
    with pytest.raises(NumericalOverflowError, match=r"layers\.0\.down_proj reaches .*on_overflow: keep_fp32"):
        compile_model(config_path("qwen2_fp16"), model=str(folder), workdir=tmp_path, verbose=False,
                      overrides={"fp16.on_overflow": "error"})
    # 3) keep_fp32: the residual stream and layer 0's MLP run in fp32, the rest in fp16, and it is faithful
    out = compile_model(config_path("qwen2_fp16"), model=str(folder), workdir=tmp_path, verbose=False)
    m = GraphManifest.read(out)
    assert m.fp16_probe["kept_in_fp32"] == ["layers.0.mlp", "residual"]
    assert m.precision["attention"] == "fp16" and "layers [0] kept in fp32" in m.precision["mlp"]
    assert m.fidelity["top1_agreement"] >= 0.95 and np.isfinite(m.fidelity["kld_mean"])


def test_fp16_cannot_keep_queries_keys_values_so_it_refuses():
    ranges = {"layers.1.k_proj": 2e5, "layers.0.residual": 10.0}
    with pytest.raises(NumericalOverflowError, match=r"layers\.1\.k_proj.*KV cache"):
        fp16_plan(ranges, headroom=4.0, on_overflow="keep_fp32")
    keep, report = fp16_plan({"lm_head": 3e4, "layers.0.o_proj": 1.0}, headroom=4.0, on_overflow="keep_fp32")
    assert keep == {"lm_head"} and report["over_limit"] == {"lm_head": 3e4}


def test_a_yaml_names_its_checkpoint_relative_to_itself(make_checkpoint, tmp_path, monkeypatch):
    folder = make_checkpoint("ckpt")
    path = small_config(tmp_path, f"""
        base: {config_path('qwen2_fp32_standard').resolve()}
        source:
          checkpoint: ckpt
        """)
    monkeypatch.chdir(folder)  # somewhere else: the path must not depend on the working directory
    cfg = load_config(path)
    assert cfg.source.checkpoint == str(folder.resolve())
    out = compile_model(path, workdir=tmp_path / "wd", verbose=False)  # no model argument: the YAML's checkpoint
    assert GraphManifest.read(out).source["model"] == str(folder.resolve())
    package = Path(GraphManifest.read(out).source["folder"])
    assert json.loads((package / "metrics.json").read_text())["checkpoint"] == str(folder.resolve())


def test_int8_per_tensor_activations_use_dynamic_quantize_matmul(make_checkpoint, tmp_path):
    folder = make_checkpoint(tie_word_embeddings=False)
    out = compile_model(config_path("qwen2_int8"), model=str(folder), workdir=tmp_path, verbose=False,
                        overrides={"quantization.activations": "int8_per_tensor", "source.package": "checkpoint",
                                   "quantization.per_block_projections": [],
                                   # random weights saved as a checkpoint: near-tied logits flip the argmax
                                   # (0.89 measured on prose), so top-1 is bounded loosely; KLD keeps its bound
                                   "verify.min_top1_agreement": 0.8})  # raises if under the bounds
    m = GraphManifest.read(out)
    assert m.op_histogram["com.microsoft:DynamicQuantizeMatMul"] == 2 * 4
    assert m.op_histogram["com.microsoft:MatMulNBits"] == 1  # the head (an untied one here)
    assert "MatMulNBits" in m.precision["lm_head"] and "(tied" not in m.precision["lm_head"]
    with pytest.raises(ConfigError, match="per-channel weight scales only"):
        load_config(config_path("qwen2_int8"), {"quantization.activations": "int8_per_tensor",
                                                "quantization.granularity": "per_block"})
    with pytest.raises(ConfigError, match=r"per_block_projections: \['mlp'\]: list each of qkv_proj"):
        load_config(config_path("qwen2_int8"), {"quantization.per_block_projections": ["mlp"]})
    with pytest.raises(ConfigError, match="int8_per_tensor only"):
        load_config(config_path("qwen2_int8"), {"quantization.activations": "int8_per_block"})
    with pytest.raises(ConfigError, match="auto reads the calibration statistics"):
        load_config(config_path("qwen2_int8"), {"source.package": "checkpoint"})


def test_random_weights_keep_only_the_parity_bound():
    from qwen2lib.compile.verify import check_bounds

    bounds = load_config(config_path("qwen2_int8")).verify
    parity = {"max_abs_dlogits": 0.1}
    flat = {"kld_mean": 1e-4, "top1_agreement": 0.6, "ppl_ratio": 1.001}  # near-ties flip the argmax
    assert check_bounds(bounds, parity, flat, random_weights=True) == []
    assert check_bounds(bounds, parity, flat, random_weights=False) == [
        "top1_agreement 0.6000 < verify.min_top1_agreement 0.9"]
    amplified = {"kld_mean": 0.75, "top1_agreement": 0.004, "ppl_ratio": 0.95}  # 4-bit of an untrained 7B (measured)
    assert check_bounds(bounds, parity, amplified, random_weights=True) == []
    assert len(check_bounds(bounds, parity, amplified, random_weights=False)) == 2
    nan = {"kld_mean": float("nan"), "top1_agreement": 1.0, "ppl_ratio": float("nan")}
    assert len(check_bounds(bounds, parity, nan)) == 2  # NaN figures fail, they do not slip through
    fp32 = load_config(config_path("qwen2_fp32")).verify  # exactness is weight-independent: parity still bound
    assert check_bounds(fp32, {"max_abs_dlogits": 0.1}, flat, random_weights=True) == [
        "parity max |dlogits| 0.1 > verify.max_abs_dlogits 0.0001"]


def test_fidelity_refuses_non_finite_candidate_logits():
    from qwen2lib.compile.verify import fidelity

    blocks = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    reference = lambda ids: torch.randn(*ids.shape, 50, generator=torch.Generator().manual_seed(1))  # noqa: E731
    broken = lambda ids: torch.full((*ids.shape, 50), float("nan"))  # noqa: E731
    with pytest.raises(NumericalOverflowError, match="inf/NaN"):
        fidelity(reference, broken, blocks)
    assert fidelity(reference, reference, blocks)["kld_mean"] == pytest.approx(0.0, abs=1e-12)
