"""qwen2_int8_block32.yaml: the int8 graph at llama.cpp Q8_0's granularity, rounded from the deploy package."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qwen2lib.compile.manifest import GraphManifest
from qwen2lib.compile.stage import config_path, ensure_compiled, load_weights
from qwen2lib.compile.config_schema import ConfigError, load_config
from qwen2lib.deploy.quantizer import quantize_per_block


def test_block32_graph_is_per_block_everywhere_and_closer_than_per_tensor(tmp_path):
    wd = tmp_path / "run"
    block = ensure_compiled("tiny-random", "auto", wd, config="qwen2_int8_block32", verbose=False)
    fast = ensure_compiled("tiny-random", "auto", wd, config="qwen2_int8", verbose=False)
    m = GraphManifest.read(block)
    assert "com.microsoft:DynamicQuantizeMatMul" not in m.op_histogram  # no one-scale-per-call matmul left
    layers = json.loads((wd / "patched" / "config.json").read_text())["num_hidden_layers"]
    assert m.op_histogram["com.microsoft:MatMulNBits"] == 4 * layers + 1  # qkv, o, gate|up, down; the head
    assert json.loads((block / "metrics.json").read_text())["int8_package"] == ""  # not notebook 03's package

    # the weights are the shared quantizer's per-32 rounding of the deploy package's fp32 ones
    graph = onnx.load(str(block / "model.onnx")).graph
    nodes = {n.name: n for n in graph.node}
    down = next(n for name, n in nodes.items() if "layers.0" in name and "down_proj" in name)
    assert {a.name: a.i for a in down.attribute}["block_size"] == 32
    init = {t.name: t for t in graph.initializer}
    packed = numpy_helper.to_array(init[down.input[1]])
    scales = numpy_helper.to_array(init[down.input[2]])
    q, s = quantize_per_block(load_weights(wd / "patched")["model.layers.0.mlp.down_proj.weight"], 32)
    np.testing.assert_array_equal(packed.reshape(q.shape[0], -1)[:, : q.shape[1]].astype(np.int16) - 128, q)
    np.testing.assert_allclose(scales.reshape(s.shape), s, rtol=1e-6)

    # Q8_0's granularity is the accurate int8 graph: closer to fp32 than one activation scale per call
    kld = {name: GraphManifest.read(g).fidelity["kld_mean"] for name, g in [("block32", block), ("fast", fast)]}
    assert 0 < kld["block32"] < kld["fast"], kld


def test_from_scheme_null_takes_no_calibration_rule_and_no_int4():
    with pytest.raises(ConfigError, match="auto reads the calibration statistics"):
        load_config(config_path("qwen2_int8_block32"), {"quantization.per_block_projections": "auto",
                                                        "quantization.activations": "int8_per_tensor",
                                                        "quantization.granularity": "per_channel"})
    with pytest.raises(ConfigError, match="precision int4 takes notebook 03's int4 package"):
        load_config(config_path("qwen2_int8_block32"), {"precision": "int4"})
