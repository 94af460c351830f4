"""load_model / checkpoint_dir on checkpoints the tests create, and every bad input with its message."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2ForCausalLM

import qwen2lib
from qwen2lib import errors
from qwen2lib.model.loading import check_safetensors, parse_dtype


def test_folder_checkpoint_loads_with_its_weights(make_checkpoint):
    folder = make_checkpoint()
    model = qwen2lib.load_model(folder)
    expected = Qwen2ForCausalLM.from_pretrained(folder)
    assert isinstance(model, Qwen2ForCausalLM) and not model.training
    torch.testing.assert_close(model.model.embed_tokens.weight, expected.model.embed_tokens.weight)
    assert qwen2lib.load_model(folder, dtype="bfloat16").dtype == torch.bfloat16


def test_sharded_checkpoint_loads(make_checkpoint, tmp_path):
    folder = make_checkpoint()
    model = Qwen2ForCausalLM.from_pretrained(folder)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    loaded = qwen2lib.load_model(sharded)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_models_root_env_is_searched(make_checkpoint, monkeypatch):
    folder = make_checkpoint(name="Qwen2-0.5B")
    monkeypatch.setenv("QWEN2LIB_MODELS", str(folder.parent))
    assert qwen2lib.checkpoint_dir("Qwen/qwen2-0.5b") == folder


def test_hugging_face_cache_is_searched(make_checkpoint, tmp_path, monkeypatch):
    # The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<revision>/...}
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--Qwen--Qwen2-1.5B"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(make_checkpoint(), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert qwen2lib.checkpoint_dir("Qwen2-1.5B").resolve() == snapshot.resolve()


def test_offline_with_nothing_local_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("QWEN2LIB_MODELS", raising=False)
    with pytest.raises(errors.WeightsUnavailableError) as info:
        qwen2lib.load_model("Qwen2-0.5B")
    message = str(info.value)
    assert "hf download Qwen/Qwen2-0.5B" in message and "weights='random'" in message
    # pasted as is with QWEN2LIB_MODELS unset, the advice must not point at the filesystem root
    assert "--local-dir ~/models/Qwen2-0.5B" in message and "$QWEN2LIB_MODELS" not in message
    monkeypatch.setenv("QWEN2LIB_MODELS", str(tmp_path / "models"))
    with pytest.raises(errors.WeightsUnavailableError, match=f"--local-dir {tmp_path / 'models' / 'Qwen2-0.5B'}"):
        qwen2lib.load_model("Qwen2-0.5B")


def test_unknown_name_suggests_close_names():
    with pytest.raises(errors.ModelNotFoundError, match="Did you mean Qwen2-1.5B-Instruct"):
        qwen2lib.load_model("Qwen2-1.5B-Instrct")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.ModelNotFoundError, match="no config.json"):
        qwen2lib.load_model(tmp_path / "empty")


def test_wrong_model_type(make_checkpoint):
    folder = make_checkpoint()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(errors.WrongModelTypeError, match="model_type='llama'"):
        qwen2lib.load_model(folder)


def test_missing_shard(make_checkpoint, tmp_path):
    sharded = tmp_path / "sharded"
    Qwen2ForCausalLM.from_pretrained(make_checkpoint()).save_pretrained(sharded, max_shard_size="100KB")
    victim = sorted(sharded.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(errors.WeightsError, match=f"missing shard.*{victim.name}"):
        qwen2lib.load_model(sharded)


def test_truncated_safetensors(make_checkpoint):
    folder = make_checkpoint()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(errors.WeightsError, match="truncated"):
        qwen2lib.load_model(folder)


def test_corrupt_safetensors_header(make_checkpoint):
    folder = make_checkpoint()
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(errors.WeightsError, match="not a valid safetensors"):
        check_safetensors(folder)


def test_pickle_checkpoints_are_refused(make_checkpoint):
    folder = make_checkpoint()
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(errors.WeightsError, match="pickle"):
        qwen2lib.load_model(folder)


def test_unsupported_dtype_and_weights_mode(make_checkpoint):
    with pytest.raises(errors.UnsupportedDtypeError, match="int8"):
        parse_dtype("int8")
    with pytest.raises(errors.UnsupportedDtypeError):
        qwen2lib.load_model(make_checkpoint(), dtype=torch.float64)
    with pytest.raises(errors.WeightsError, match="'auto'"):
        qwen2lib.load_model("tiny-random", weights="pretrained")


def test_tiny_random_is_a_real_qwen2_shape():
    model = qwen2lib.load_model("tiny-random")
    cfg = model.config
    assert cfg.vocab_size == 151936 and cfg.tie_word_embeddings
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    again = qwen2lib.load_model("tiny-random")
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, again.model.layers[0].mlp.up_proj.weight)


def test_random_weights_at_real_shape(capfd):
    model = qwen2lib.load_model("Qwen2.5-0.5B", weights="random", dtype="bfloat16")
    assert "RANDOM WEIGHTS" in capfd.readouterr().err
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == 494_032_768


def test_a_random_checkpoint_names_its_architecture(tmp_path):
    """llama.cpp's convert_hf_to_gguf.py finds the model class by config.json's ``architectures``."""
    import json

    from qwen2lib.model.random_weights import write_random_checkpoint
    from conftest import tiny_hf_config

    write_random_checkpoint(tiny_hf_config(), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
