import pytest
import torch
from transformers import Qwen2ForCausalLM

import qwen2lib
from qwen2lib.model.registry import FAMILY_CONFIGS, resolve

SIZES = {"Qwen2": ["0.5B", "1.5B", "7B", "72B"], "Qwen2.5": ["0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"]}
# Parameter counts the model cards publish, in billions (rounded as published).
PUBLISHED_BILLIONS = {"0.5B": 0.49, "1.5B": 1.54, "3B": 3.09, "7B": 7.61, "14B": 14.7, "32B": 32.5, "72B": 72.7}


def all_names():
    return [f"{family}-{size}{suffix}" for family, sizes in SIZES.items() for size in sizes for suffix in ("", "-Instruct")]


def test_every_published_model_is_registered():
    assert sorted(FAMILY_CONFIGS) == sorted(all_names())
    table = qwen2lib.list_models()
    assert set(all_names()) <= set(table["name"]) and {"tiny", "tiny-random"} <= set(table["name"])
    for column in ("hub_id", "tokenizer_family", "vocab_size", "num_key_value_heads", "rope_theta", "max_window_layers"):
        assert column in table.columns


@pytest.mark.parametrize("name", all_names())
def test_architecture_is_consistent_and_sized_as_published(name):
    spec = resolve(name)
    cfg = spec.config
    assert spec.hub_id == f"Qwen/{name}"
    assert spec.tokenizer_family == ("qwen2.5" if name.startswith("Qwen2.5") else "qwen2")
    assert spec.instruct == name.endswith("Instruct")
    assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"], "every Qwen2/2.5 model uses GQA"
    with torch.device("meta"):
        model = Qwen2ForCausalLM(spec.hf_config())
    billions = sum(p.numel() for p in model.parameters()) / 1e9  # tied weights are counted once
    size = name.split("-")[1]
    assert billions == pytest.approx(PUBLISHED_BILLIONS[size], rel=0.01), f"{name}: {billions:.3f}B parameters"


@pytest.mark.parametrize("alias", ["Qwen2-1.5B", "qwen2-1.5b", "Qwen/Qwen2-1.5B", "QWEN/QWEN2-1.5B", " Qwen2-1.5B "])
def test_names_resolve_in_any_case(alias):
    assert resolve(alias).name == "Qwen2-1.5B"


def test_a_folder_resolves_to_its_own_config(make_checkpoint):
    folder = make_checkpoint(name="Qwen1.5-0.5B-Chat")
    spec = resolve(folder)
    assert spec.folder == folder.resolve() and spec.config["hidden_size"] == 64
    assert spec.tokenizer_family == "qwen2" and spec.instruct


def test_unknown_name_lists_the_closest():
    with pytest.raises(qwen2lib.ModelNotFoundError) as info:
        resolve("Qwen2.5-8B")
    assert "Qwen2.5-3B" in str(info.value) or "Qwen2.5-7B" in str(info.value)
