"""A GGUF file as a model source: converted into the Hugging Face checkpoint every stage starts from, its logits
those of the file within each type's error, and a file that is not a whole qwen2 GGUF with its tokenizer refused
in one line with nothing left behind."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from conftest import tiny_hf_config
from qwen2lib.cli import main
from qwen2lib.export import gguf as export_gguf
from qwen2lib.model import gguf as gguf_source
from qwen2lib.model.loading import checkpoint_dir
from qwen2lib.model.registry import resolve
from test_export import SAMPLES, VOCAB, write_small_qwen_tokenizer

K_QUANT = "blk.0.ffn_down.weight"  # its rows are 256 wide: one Q6_K block


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A toy Qwen2 checkpoint (down_proj 256 columns wide, so a K-quant block fits) with the small Qwen tokenizer."""
    root = tmp_path_factory.mktemp("gguf-source")
    torch.manual_seed(0)
    config = tiny_hf_config(intermediate_size=256, initializer_range=0.15, bos_token_id=VOCAB - 3,
                            eos_token_id=VOCAB - 1, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).eval().save_pretrained(root / "checkpoint")
    write_small_qwen_tokenizer(root / "checkpoint")
    return root / "checkpoint"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN2LIB_CACHE", str(tmp_path / "cache"))


def random_q6_k(shape) -> np.ndarray:
    """Valid Q6_K blocks of random values (gguf-py has no K-quant quantizer): ql, qh, int8 scales, fp16 d."""
    rng = np.random.default_rng(0)
    rows, blocks = shape[0], shape[1] // 256
    block = np.zeros((rows, blocks, 210), dtype=np.uint8)
    block[..., :192] = rng.integers(0, 256, (rows, blocks, 192))
    block[..., 192:208] = rng.integers(-8, 9, (rows, blocks, 16)).astype(np.int8).view(np.uint8)
    block[..., 208:210] = np.full((rows, blocks, 1), 0.002, dtype=np.float16).view(np.uint8)
    return block.reshape(rows, blocks * 210)


def write(source, path, gguf_type, monkeypatch=None, k_quant=False):
    if k_quant:
        plain = export_gguf.tensor_type
        monkeypatch.setattr(export_gguf, "tensor_type", lambda name, shape, t, tied: gguf.GGMLQuantizationType.Q6_K
                            if name == K_QUANT else plain(name, shape, t, tied))
        encode = export_gguf.encode_tensor
        monkeypatch.setattr(export_gguf, "encode_tensor", lambda tensor, qtype: random_q6_k(tuple(tensor.shape))
                            if qtype == gguf.GGMLQuantizationType.Q6_K else encode(tensor, qtype))
    export_gguf.write_gguf(source, path, gguf_type)
    return path


def kld(reference: torch.Tensor, other: torch.Tensor) -> float:
    p, q = reference.log_softmax(-1), other.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("gguf_type, bound", [("f32", 1e-4), ("f16", 1e-4), ("q8_0", 3e-3), ("q6_k", None)])
def test_a_gguf_becomes_a_checkpoint_with_the_files_logits(source, tmp_path, monkeypatch, gguf_type, bound):
    path = write(source, tmp_path / f"toy-{gguf_type}.gguf", "f32" if gguf_type == "q6_k" else gguf_type,
                 monkeypatch, k_quant=gguf_type == "q6_k")
    folder = checkpoint_dir(str(path))
    assert resolve(str(path)).name == path.stem and folder == resolve(str(tmp_path)).folder  # the file or its folder
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["torch_dtype"] == "bfloat16"
    ids = torch.randint(0, VOCAB - 3, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits
        of_the_file = gguf_source.load_gguf_model(path)(ids).logits
        original = Qwen2ForCausalLM.from_pretrained(source, dtype=torch.float32).eval()(ids).logits
    assert kld(of_the_file, ours) < 1e-4  # only bf16 rounding of the file's values
    if bound is not None:
        assert kld(original, ours) < bound
    else:  # the K-quant tensor holds the file's (random) values, not the source's
        weight = gguf_source.GGUFTensors(path, Qwen2ForCausalLM.config_class.from_pretrained(folder))
        stored = Qwen2ForCausalLM.from_pretrained(folder).state_dict()["model.layers.0.mlp.down_proj.weight"]
        torch.testing.assert_close(stored.float(), weight["model.layers.0.mlp.down_proj.weight"], rtol=1e-2, atol=1e-6)
    assert checkpoint_dir(str(path)) == folder  # built once, then reused


def test_the_checkpoints_tokenizer_and_chat_template_are_the_files(source, tmp_path):
    folder = checkpoint_dir(str(write(source, tmp_path / "toy.gguf", "q8_0")))
    ours, reference = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(source)
    for text in SAMPLES:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.eos_token == reference.eos_token == "<|im_end|>"
    record = json.loads((folder / "gguf_source.json").read_text())
    assert record["tensor_types"]["Q8_0"] > 0 and "not the original" in record["note"]


def test_a_folder_with_two_ggufs_asks_which(source, tmp_path):
    write(source, tmp_path / "a.gguf", "f16")
    write(source, tmp_path / "b.gguf", "f16")
    with pytest.raises(gguf_source.GGUFError, match="holds 2 GGUF files"):
        resolve(str(tmp_path))


def refused(capsys, path) -> str:
    assert main(["generate", "--model", str(path), "--max-new-tokens", "1", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_gguf_of_another_architecture_is_refused_in_one_line(tmp_path, capsys):
    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "general.architecture is 'llama'" in refused(capsys, tmp_path / "llama.gguf")
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_a_truncated_gguf_is_refused_in_one_line(source, tmp_path, capsys):
    (tmp_path / "whole").mkdir()
    whole = write(source, tmp_path / "whole" / "m.gguf", "f16")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert "not a whole GGUF file" in refused(capsys, cut)
    assert not any((tmp_path / "cache" / "gguf").glob("cut-*"))


def test_a_gguf_without_its_tokenizer_is_refused_in_one_line(source, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_gguf, "add_tokenizer", lambda writer, package, vocab_size: {})
    path = write(source, tmp_path / "bare.gguf", "f16")
    assert "carries no tokenizer" in refused(capsys, path)
    assert not any((tmp_path / "cache" / "gguf").glob("bare-*"))
