"""The stage graph: each stage built from its predecessor's folder, rebuilt when its inputs or code change."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen2lib import pipeline
from qwen2lib.stages import reuse as stages
from qwen2lib.artifacts import read_metrics
from qwen2lib.calibrate.stage import ensure_calibration, load_stats
from qwen2lib.compile.manifest import GraphManifest
from qwen2lib.compile.plan import activation_outliers
from qwen2lib.compile.stage import ensure_compiled
from qwen2lib.compile.runtime import OnnxCausalLM
from qwen2lib.deploy import ensure_patched
from qwen2lib.quantize.stage import ensure_quantized

MODEL = "tiny-random"  # the real tokenizer, so every calibration set reads; seconds per stage
SMALL = {"samples": 4, "seq_len": 32}
HELDOUT = {"heldout_blocks": 1, "heldout_len": 16}


def identity(folder: Path) -> str:
    return read_metrics(folder)["stage"]["identity"]


def write_c4_shard(folder: Path) -> Path:
    """A c4 shard in its published form: gzip'd JSON lines with text, timestamp and url."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "c4-train.00000-of-01024.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i in range(40):
            record = {"text": f"Document {i}: the quick brown fox jumps over the lazy dog near river {i}. " * 6,
                      "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}
            fh.write(json.dumps(record) + "\n")
    return path


def test_a_second_run_with_nothing_changed_rebuilds_nothing(tmp_path, capsys):
    wd = tmp_path / "run"
    first = ensure_quantized(MODEL, "auto", wd, calibration=SMALL, **HELDOUT)
    before = {s: identity(p) for s, p in (("patched", wd / "patched"), ("calibration", wd / "calibration"),
                                          ("quantized", first))}
    stamp = (first / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert ensure_quantized(MODEL, "auto", wd, **HELDOUT) == first
    err = capsys.readouterr().err
    assert "building" not in err and "[quantized] reusing" in err, err
    assert (first / "metrics.json").stat().st_mtime_ns == stamp
    assert before == {s: identity(p) for s, p in (("patched", wd / "patched"), ("calibration", wd / "calibration"),
                                                  ("quantized", first))}
    # every stage names its inputs' identities: the quantized package traces back to the checkpoint
    record = read_metrics(first)["stage"]
    assert record["inputs"]["patched"]["identity"] == before["patched"]
    assert record["inputs"]["calibration"]["identity"] == before["calibration"]
    patched_inputs = read_metrics(wd / "patched")["stage"]["inputs"]
    assert patched_inputs["checkpoint"]["identity"].startswith("ckpt-")


def test_02_with_c4_then_03_quantizes_with_c4_statistics(tmp_path, capsys):
    wd = tmp_path / "run"
    shard = write_c4_shard(tmp_path / "c4")
    calibration = ensure_calibration(MODEL, "auto", wd, dataset="c4", data_path=shard, **SMALL)
    assert read_metrics(calibration)["dataset_name"] == "c4"
    capsys.readouterr()
    out = ensure_quantized(MODEL, "auto", wd, scheme="smoothquant", **HELDOUT)  # no dataset given: 02's statistics
    err = capsys.readouterr().err
    assert "calibration statistics of c4" in err and "[calibration] reusing" in err, err
    metrics = read_metrics(out)
    assert metrics["stage"]["key"]["request"]["calibration"]["dataset"] == "c4"
    assert metrics["stage"]["inputs"]["calibration"]["identity"] == identity(calibration)
    assert "c4" in metrics["calibration_data"]
    # deleting calibration/ makes 03 rebuild it with the same request (not the default data set)
    shutil.rmtree(calibration)
    assert ensure_quantized(MODEL, "auto", wd, scheme="smoothquant", **HELDOUT) == out
    assert read_metrics(calibration)["dataset_name"] == "c4"
    # another data set only when asked for, and then everything after calibration rebuilds
    ensure_quantized(MODEL, "auto", wd, scheme="smoothquant", calibration={"dataset": "builtin", **SMALL}, **HELDOUT)
    assert read_metrics(calibration)["dataset_name"] == "builtin"
    assert read_metrics(out)["stage"]["key"]["request"]["calibration"]["dataset"] == "builtin"


def test_cli_quantize_takes_the_calibration_parameters(tmp_path, capsys):
    from qwen2lib.cli import main

    wd = tmp_path / "run"
    shard = write_c4_shard(tmp_path / "c4")
    assert main(["quantize", "--model", MODEL, "--workdir", str(wd), "--dataset", "c4", "--data-path", str(shard),
                 "--samples", "4", "--seq-len", "32", "--heldout-blocks", "1", "--heldout-len", "16"]) == 0
    assert read_metrics(wd / "calibration")["dataset_name"] == "c4"
    assert read_metrics(wd / "quantized" / "w8a16")["stage"]["key"]["request"]["calibration"]["samples"] == 4
    assert main(["quantize", "--model", MODEL, "--workdir", str(wd), "--alpha", "5", "--scheme", "smoothquant"]) == 2
    assert "alpha=5.0" in capsys.readouterr().err
    assert not (wd / "quantized" / "smoothquant").exists()


def _copy_of_the_library_with(tmp_path: Path, file: str, line: str) -> Path:
    copy = tmp_path / "checkout-copy"
    shutil.copytree(stages.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / file, "a", encoding="utf-8") as fh:
        fh.write(line)
    return copy


def test_a_changed_patch_source_rebuilds_patched_and_everything_after_it(make_checkpoint, tmp_path, monkeypatch,
                                                                          capsys):
    folder, wd = str(make_checkpoint()), tmp_path / "run"
    graph = ensure_compiled(folder, "auto", wd, config="qwen2_fp32_standard", verbose=False)
    before = identity(wd / "patched"), identity(graph)
    capsys.readouterr()
    monkeypatch.setattr(stages, "PACKAGE_DIR", _copy_of_the_library_with(
        tmp_path, "deploy/patches/p4_explicit_kv_cache.py", "# edited\n"))
    ensure_compiled(folder, "auto", wd, config="qwen2_fp32_standard", verbose=True)
    err = capsys.readouterr().err
    assert "[patched] rebuilding, code changed: deploy/patches/p4_explicit_kv_cache.py" in err, err
    # the graph rebuilds too: its input (the package) changed, and the compile code imports the deploy package, so
    # the edited file is in its own closure as well (either reason may be named first)
    assert "[compiled] rebuilding" in err and "[compiled] reusing" not in err, err
    assert identity(wd / "patched") != before[0] and identity(graph) != before[1]


def test_a_changed_graph_builder_rebuilds_the_graph_only(make_checkpoint, tmp_path, monkeypatch, capsys):
    folder, wd = str(make_checkpoint()), tmp_path / "run"
    graph = ensure_compiled(folder, "auto", wd, config="qwen2_fp32", verbose=False)
    patched, before = identity(wd / "patched"), identity(graph)
    monkeypatch.setattr(stages, "PACKAGE_DIR", _copy_of_the_library_with(tmp_path, "compile/builder.py", "# edited\n"))
    capsys.readouterr()
    ensure_compiled(folder, "auto", wd, config="qwen2_fp32", verbose=True)
    err = capsys.readouterr().err
    assert "[patched] reusing" in err and "[compiled] rebuilding, code changed: compile/builder.py" in err, err
    assert identity(wd / "patched") == patched and identity(graph) != before


def test_a_package_built_with_insert_slice_compiles_to_last_position_logits(make_checkpoint, tmp_path):
    folder, wd = str(make_checkpoint()), tmp_path / "run"
    ensure_patched(folder, "auto", wd, insert_slice=True)
    graph = ensure_compiled(folder, "auto", wd, config="qwen2_fp32", verbose=False)
    assert GraphManifest.read(graph).insert_slice is True
    ids = np.random.default_rng(0).integers(2, 320, (2, 7))
    logits, _ = OnnxCausalLM.load(graph).prefill(ids)
    assert logits.shape == (2, 1, 320)
    # the package's own model gives the same last-position logits
    from qwen2lib.deploy import load_deploy_package

    with torch.no_grad():
        ref = load_deploy_package(wd / "patched")(input_ids=torch.as_tensor(ids), use_cache=False).logits
    assert ref.shape == (2, 1, 320)
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)


def test_the_int8_graph_compiles_from_the_quantized_package(tmp_path, capsys):
    wd = tmp_path / "run"
    graph = ensure_compiled(MODEL, "auto", wd, config="qwen2_int8", verbose=False,
                            overrides={"verify.blocks": 1, "verify.block_tokens": 16})
    record = read_metrics(graph)["stage"]
    assert record["inputs"]["int8_package"]["identity"] == identity(wd / "quantized" / "w8a16")
    assert record["inputs"]["source"]["identity"] == identity(wd / "patched")
    assert "notebook 03 package" in GraphManifest.read(graph).source["int8_weights"]
    # the plan reads the calibration statistics the package came from: they decide which projections keep
    # per-block activation scales, the graph records why, and they are one of the graph's inputs
    assert record["inputs"]["calibration"]["identity"] == identity(wd / "calibration")
    outliers = activation_outliers(load_stats(wd / "calibration"))
    decided = read_metrics(graph)["per_block_projections"]
    assert decided["projections"] == outliers["per_block_projections"]
    assert decided["max_over_median"] == outliers["max_over_median"]
    assert decided["why"].startswith("calibration statistics") and "down_proj" in decided["why"]
    # a warm compile checks each upstream stage once (issue 34: resolved once per call)
    capsys.readouterr()
    assert ensure_compiled(MODEL, "auto", wd, config="qwen2_int8", verbose=True,
                           overrides={"verify.blocks": 1, "verify.block_tokens": 16}) == graph
    err = capsys.readouterr().err
    for stage in ("patched", "calibration", "quantized", "compiled"):
        assert err.count(f"[{stage}] reusing") == 1, err


def test_ensure_by_stage_name(tmp_path):
    assert pipeline.ensure("patched", MODEL, "auto", tmp_path / "run") == tmp_path / "run" / "patched"
    with pytest.raises(ValueError, match="stage 'inference'"):
        pipeline.ensure("inference", MODEL, "auto", tmp_path / "run")


def test_every_stage_records_its_wall_time_and_peak_memory(make_checkpoint, tmp_path):
    graph = ensure_compiled(str(make_checkpoint()), "auto", tmp_path / "run", config="qwen2_fp32", verbose=False)
    for folder in (tmp_path / "run" / "patched", graph):
        record = read_metrics(folder)["stage"]
        assert record["wall_s"] > 0 and record["peak_rss_bytes"] > 50 * 2**20, record  # a Python with torch loaded


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak is reset through Linux's /proc")
def test_each_stage_built_in_one_process_records_its_own_peak(tmp_path):
    """A notebook builds stages one after another in one process: each records its own peak, and a stage built
    inside another's build counts toward the outer one."""
    def allocating(mib):
        def build(tmp):
            block = np.ones(mib << 18, dtype=np.float32)  # mib MiB, touched
            return {"sum": float(block[::4096].sum())}
        return build

    big = stages.ensure_stage("patched", tmp_path / "big", {"n": 1}, {}, allocating(600), verbose=False)

    def outer(tmp):
        stages.ensure_stage("patched", tmp_path / "inner", {"n": 3}, {}, allocating(300), verbose=False)
        return {}

    small = stages.ensure_stage("patched", tmp_path / "small", {"n": 2}, {}, allocating(20), verbose=False)
    nested = stages.ensure_stage("patched", tmp_path / "outer", {"n": 4}, {}, outer, verbose=False)
    peak = {f.name: read_metrics(f)["stage"]["peak_rss_bytes"] for f in (big, small, nested, tmp_path / "inner")}
    assert peak["big"] > peak["small"] + 400 * 2**20, peak  # not the big stage's peak again
    assert peak["outer"] >= peak["inner"] > peak["small"] + 200 * 2**20, peak


def test_an_insert_slice_package_quantizes_and_compiles_to_a_last_position_int8_graph(tmp_path):
    wd = tmp_path / "run"
    ensure_patched(MODEL, "auto", wd, insert_slice=True)
    graph = ensure_compiled(MODEL, "auto", wd, config="qwen2_int8", verbose=False,
                            overrides={"verify.blocks": 1, "verify.block_tokens": 16})
    assert GraphManifest.read(graph).insert_slice is True
    package = json.loads((wd / "quantized" / "w8a16" / "config.json").read_text())
    assert package["insert_slice"] is True  # the quantized package keeps the deploy package's setting
    assert read_metrics(wd / "quantized" / "w8a16")["fidelity"]["tokens"] > 1  # scored on every position


def test_resident_memory_is_read_from_proc_and_its_peak_restarts():
    from qwen2lib.stages.resident import peak_bytes, reset_peak, resident_bytes, status_bytes

    assert status_bytes("VmRSS", "0") is None  # no such process: None, not an error
    assert reset_peak(), "Linux lets a process restart its own high-water mark"
    before = peak_bytes()
    block = b"\x01" * (64 << 20)  # written, so resident
    assert peak_bytes() >= before + (48 << 20) and resident_bytes() >= 48 << 20
    del block
    reset_peak()
    assert peak_bytes() < before + (48 << 20), "after a reset the peak is what the process holds now"
