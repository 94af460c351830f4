import math

import matplotlib
import pytest
import torch
import torch.nn as nn

from conftest import tiny_hf_config
from qwen2lib.calibrate import stage as cal

matplotlib.use("Agg")


def seeded_model():
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(tiny_hf_config()).eval()


def direct_inputs(model, ids, batch_size=None) -> dict[str, torch.Tensor]:
    """Every Linear's input as (M, K), captured by a plain hook: the reference the statistics are checked against."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size or ids.shape[0]):  # the same batches: bitwise equal inputs
            model(ids[start: start + (batch_size or ids.shape[0])])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def test_absmax_and_percentile_equal_a_direct_computation():
    model, ids = seeded_model(), torch.randint(0, 320, (3, 20))
    stats = cal.collect_activation_stats(model, ids, percentile=90, batch_size=3, progress=False)
    inputs = direct_inputs(model, ids)
    assert len(cal.linear_names(stats)) == 2 * 7 + 1  # every Linear, lm_head included
    for name, x in inputs.items():
        torch.testing.assert_close(stats[f"{name}.absmax"], x.abs().amax(0), rtol=0, atol=0)
        sorted_abs = x.abs().sort(0).values  # (M, K)
        expected = sorted_abs[math.ceil(0.9 * x.shape[0]) - 1]  # nearest rank, one batch: exact
        torch.testing.assert_close(stats[f"{name}.percentile"], expected)  # up to the weighted-mean rounding


def test_batches_keep_the_exact_absmax_and_average_the_percentile():
    model, ids = seeded_model(), torch.randint(0, 320, (4, 10))
    stats = cal.collect_activation_stats(model, ids, percentile=99, batch_size=1, progress=False)
    x = direct_inputs(model, ids, batch_size=1)["model.layers.1.mlp.down_proj"]  # (40, K): 4 batches of 10 tokens
    torch.testing.assert_close(stats["model.layers.1.mlp.down_proj.absmax"], x.abs().amax(0), rtol=0, atol=0)
    per_batch = torch.stack([cal.nearest_rank_percentile(x[i * 10:(i + 1) * 10].abs(), 99) for i in range(4)])
    torch.testing.assert_close(stats["model.layers.1.mlp.down_proj.percentile"], per_batch.mean(0))
    torch.testing.assert_close(stats["model.layers.1.mlp.down_proj.meansq"], x.square().mean(0))  # over all batches


def test_a_percentile_never_passes_the_max_where_every_batch_hits_it():
    """At 99.9% a batch of up to 1,000 tokens has its max as its nearest-rank percentile; the token-weighted mean of
    ten such batches is the max again, where float32 sums rounded 0.7 up to 0.70000005 (notebook 02 at 1.5B)."""
    linear = nn.Linear(3, 2)
    stats = cal.ActivationStats(linear, percentile=99.9)
    x = torch.tensor([[0.7, 1.3, 3.3]]).expand(7, 3)  # (7, 3): every token equal, so percentile == max
    with torch.no_grad():
        for _ in range(10):
            linear(x)
    out = stats.tensors()
    assert torch.equal(out[".percentile"], out[".absmax"]) and torch.equal(out[".absmax"], x[0])


def test_save_load_and_plots(tmp_path):
    model, ids = seeded_model(), torch.randint(0, 320, (2, 8))
    stats = cal.collect_activation_stats(model, ids, progress=False)
    cal.save_stats(tmp_path / "calibration", stats, {"model": "m", "dataset": "d", "samples": 2, "seq_len": 8, "seed": 0})
    loaded = cal.load_stats(tmp_path / "calibration")
    assert loaded.keys() == stats.keys() and all(torch.equal(loaded[k], stats[k]) for k in stats)
    assert cal.layer_matrix(stats, "mlp.down_proj").shape == (2, 128)
    assert cal.plot_outlier_heatmap(stats, "self_attn.q_proj", "test").get_title().startswith("per-channel")
    assert cal.plot_channel_distribution(stats, "model.layers.0.mlp.gate_proj").get_yscale() == "log"
    with pytest.raises(KeyError, match="pick one of"):
        cal.layer_matrix(stats, "attn.c_proj")
    with pytest.raises(FileNotFoundError, match="qwen2lib calibrate"):
        cal.load_stats(tmp_path / "empty")


def test_ensure_calibration_on_a_c4_shard_then_reuse(tmp_path):
    from test_data import write_c4

    from qwen2lib.artifacts import read_metrics

    shard = write_c4(tmp_path / "c4")
    kwargs = dict(dataset="c4", data_path=shard, samples=2, seq_len=16, seed=0, progress=False)
    out = cal.ensure_calibration("tiny-random", "auto", tmp_path / "run", **kwargs)
    metrics = read_metrics(out)
    assert metrics["dataset"].startswith("c4") and metrics["tokens"] == 32 and metrics["samples"] == 2
    assert metrics["model"] == "tiny-random" and metrics["linears"] == 4 * 7 + 1 and not metrics["fallback"]
    stamp = (out / cal.STATS_FILE).stat().st_mtime_ns
    assert cal.ensure_calibration("tiny-random", "auto", tmp_path / "run", **kwargs) == out
    assert (out / cal.STATS_FILE).stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_cli_calibrate_offline_c4_falls_back_and_labels_it(tmp_path, monkeypatch, capsys):
    from qwen2lib.artifacts import read_metrics
    from qwen2lib.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    workdir = tmp_path / "run"
    assert main(["calibrate", "--model", "tiny-random", "--workdir", str(workdir), "--dataset", "c4",
                 "--samples", "2", "--seq-len", "16"]) == 0
    metrics = read_metrics(workdir / "calibration")
    assert metrics["fallback"] and "offline fallback" in metrics["dataset"]
    assert main(["calibrate", "--model", "tiny-random", "--workdir", str(workdir), "--dataset", "alpaca",
                 "--no-fallback", "--samples", "2", "--seq-len", "16"]) == 2
    assert "--data-path" in capsys.readouterr().err


@pytest.mark.parametrize("insert_slice", [False, True])
def test_layer_by_layer_statistics_equal_the_whole_models(make_checkpoint, tmp_path, insert_slice):
    """Calibration streams one decoder layer at a time; every Linear's statistics equal the whole model's."""
    from qwen2lib.deploy import build_deploy_package, load_deploy_package

    package = build_deploy_package(make_checkpoint(num_hidden_layers=3), tmp_path / "patched", insert_slice=insert_slice)
    ids = torch.randint(0, 320, (5, 12), generator=torch.Generator().manual_seed(1))
    whole = cal.collect_activation_stats(load_deploy_package(package), ids, percentile=99, batch_size=2,
                                         progress=False)
    streamed = cal.collect_activation_stats_layerwise(package, ids, percentile=99, batch_size=2, progress=False)
    assert streamed.keys() == whole.keys() and len(cal.linear_names(whole)) == 3 * 7 + 1
    for key in whole:
        torch.testing.assert_close(streamed[key], whole[key], rtol=1e-6, atol=1e-7, msg=key)
