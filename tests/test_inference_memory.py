"""Every command that loads a model checks its memory first, from config.json alone, and names what it runs.

The checks use the formulas with a machine size passed in (``available=``, or ``footprint.available_bytes``
replaced): nothing large is allocated, and a refused run must not touch a shard.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qwen2lib import cli, pipeline
from qwen2lib.compile.manifest import GraphManifest
from qwen2lib.compile.runtime import PREFILL_CHUNK
from qwen2lib.errors import InsufficientMemoryError
from qwen2lib.model import footprint
from qwen2lib.model.registry import resolve

GiB = 1 << 30
MACHINE = 24 * GiB  # the machine the issue measured on


def sharded_32b(tmp_path: Path) -> Path:
    """A Qwen2.5-32B-shaped checkpoint folder: its config.json and a 16-shard index whose shards are absent, so
    reading any of them (or even checking them) fails with another message than the memory refusal."""
    folder = tmp_path / "Qwen2.5-32B-shaped"
    folder.mkdir()
    config = {**resolve("Qwen2.5-32B").config, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    shards = [f"model-{i:05d}-of-00016.safetensors" for i in range(1, 17)]
    index = {"metadata": {}, "weight_map": {f"model.layers.{i}.mlp.up_proj.weight": shards[i % 16] for i in range(64)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def machine_24gib(monkeypatch):
    monkeypatch.setattr(footprint, "available_bytes", lambda: MACHINE)

    def never(*args, **kwargs):
        raise AssertionError("a refused run reached the checkpoint")

    for name in ("checkpoint_dir", "load_model", "ensure_quantized", "_ensure_graph"):
        monkeypatch.setattr(pipeline, name, never)


# ---- the formulas ---------------------------------------------------------------------------------------

def test_a_32b_in_float32_is_refused_on_24_gib_with_the_estimate_and_what_fits(tmp_path):
    folder = sharded_32b(tmp_path)
    with pytest.raises(InsufficientMemoryError) as refused:
        pipeline.check_memory(str(folder), "fp32 torch", {"context": 4096}, available=MACHINE)
    line = str(refused.value)
    assert "\n" not in line
    assert re.search(r"Qwen2.5-32B-shaped in torch float32 needs ~1[23]\d GB resident; this machine has 26 GB "
                     r"available \(runtime .* \+ fp32 weights 131 GB \+ KV cache 2.1 GB for 1 x 4096 positions", line), line
    assert "run the int4 graph instead (~21 GB" in line and "random" not in line


def test_a_tiny_model_is_accepted_and_the_estimate_follows_precision_context_and_batch():
    tiny = pipeline.check_memory("tiny-random", "fp32 torch", available=MACHINE)
    assert tiny.resident_bytes < 1 * GiB
    config = resolve("Qwen2.5-7B").config
    fp32, bf16, int8, int4 = (footprint.inference_estimate(config, label).resident_bytes
                              for label in ("fp32 torch", "bf16 torch", "int8 graph", "int4 graph"))
    assert fp32 > bf16 > int8 > int4
    one = footprint.inference_estimate(config, "int8 graph", context=1024)
    eight = footprint.inference_estimate(config, "int8 graph", context=1024, batch=8)
    cache = footprint.kv_cache_bytes(config, 1024)
    assert eight.resident_bytes - one.resident_bytes >= 7 * cache  # the cache grows with the rows


def test_the_refusal_names_a_smaller_context_when_the_weights_fit():
    config = resolve("Qwen2.5-7B").config
    with pytest.raises(InsufficientMemoryError, match=r"KV cache \d+ GB for 8 x 131072 positions.*smaller context"):
        footprint.check_fits(config, "inference", "Qwen2.5-7B", "int4 graph", available=MACHINE, context=131072,
                             batch=8)


def test_the_graph_prefill_chunk_is_the_runtimes():
    assert footprint.GRAPH_PREFILL_CHUNK == PREFILL_CHUNK


# ---- every command, before any shard -------------------------------------------------------------------

COMMANDS = {
    "generate": ["generate", "--prompt", "hello", "--dtype", "float32"],
    "generate onnx": ["generate", "--prompt", "hello", "--backend", "onnx", "--precision", "int8"],
    "chat": ["chat"],
    "serve": ["serve", "--stage", "int8 graph", "--port", "0"],
    "serve torch": ["serve", "--stage", "int8 torch", "--port", "0"],
    "bench": ["bench", "--num-requests", "2"],
    "eval ppl": ["eval", "ppl", "--text", __file__],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_inference_command_refuses_in_one_line_before_loading(command, tmp_path, capsys, machine_24gib):
    folder = sharded_32b(tmp_path)
    argv = COMMANDS[command]
    where = 2 if argv[0] == "eval" else 1  # after the subcommand (eval's is two words)
    code = cli.main([*argv[:where], "--model", str(folder), "--workdir", str(tmp_path / "run"), *argv[where:]])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("qwen2lib ")]
    assert code == 2, (command, err)
    assert len(err) == 1 and re.search(r"error: Qwen2.5-32B-shaped .* needs ~\d+ GB resident; this machine has "
                                       r"26 GB available", err[0]), err
    assert not (tmp_path / "run").exists()  # nothing built for a run that cannot happen


# ---- what each command runs, said once ------------------------------------------------------------------

def test_graph_precision_reads_the_manifest():
    def manifest(precision, **quantization):  # the manifest keeps its compile config under "config"
        return GraphManifest(precision={"attention": "..."}, config={"precision": precision,
                                                                    "quantization": quantization})

    int8 = manifest("int8", granularity="per_channel", activations="int8_per_tensor")
    assert pipeline.graph_precision(int8) == "(int8 weights per channel, W8A8 dynamic; ~llama.cpp Q8_0)"
    block = manifest("int8", granularity="per_block", block_size=32, activations="int8_per_block")
    assert pipeline.graph_precision(block) == ("(int8 weights per block of 32, W8A8 dynamic per block; "
                                               "~llama.cpp Q8_0)")
    assert pipeline.graph_precision(manifest("fp16", activations="int8_per_block")) == "(fp16 weights; ~llama.cpp F16)"
    assert pipeline.graph_precision(GraphManifest()) == "(? weights; ~llama.cpp ?)"  # a bare .onnx file


def test_generate_names_the_checkpoint_and_its_precision_once(capsys):
    assert cli.main(["generate", "--model", "tiny-random", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    runs = [line for line in capsys.readouterr().err.splitlines() if " runs " in line]
    assert len(runs) == 1 and runs[0].startswith("[generate] runs "), runs
    assert runs[0].endswith("in torch float32 (transformers' Qwen2; ~llama.cpp F32)"), runs


def test_generate_on_a_graph_names_the_graph_folder_and_its_precision(tmp_path, capsys, monkeypatch):
    from qwen2lib.compile.stage import compile_model

    folder = "tiny-random"  # the real vocabulary: the prompt is text
    graph = compile_model("qwen2_fp32_standard", folder, workdir=tmp_path / "run", verbose=False)
    assert pipeline.backend_label("onnx", precision="int8", compiled=graph) == "fp32 graph"  # the folder's own
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["generate", "--model", folder, "--backend", "onnx", "--compiled", str(graph),
                     "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    runs = [line for line in capsys.readouterr().err.splitlines() if " runs " in line]
    assert runs == ["[generate] runs run/compiled/qwen2_fp32_standard (fp32 weights; ~llama.cpp F32)"], runs
