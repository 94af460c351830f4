"""Exports for other engines: GGUF read back by gguf's own reader, compressed-tensors loaded by transformers with
the compressed-tensors package; both against the packages they were written from."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import absmax_stats, tiny_hf_config
from qwen2lib.export import stage as export, compressed_tensors as export_ct, gguf as export_gguf
from qwen2lib.model import gguf as gguf_reader
from qwen2lib.artifacts import read_metrics
from qwen2lib.evaluation.fidelity import fidelity_report
from qwen2lib.evaluation.fidelity import logits_fn
from qwen2lib.quantize.stage import dequantize_weight, is_int8_linear, load_quantized, quantize_model
from qwen2lib.model.tokenizer import cached_family_tokenizer_dir
from qwen2lib.errors import MissingInputError, Qwen2LibError
from qwen2lib.serve import llamacpp
from qwen2lib.serve.generation import SamplingParams, TorchBackend, generate
from qwen2lib.serve.llamacpp import LlamaCppBackend

VOCAB = 320
CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SAMPLES = ["Hello world!  x = 12345;\n\tprint(x)  ", "你好，世界。The end\r\n",
           "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "it's   the  thing's end...!!"]


def write_small_qwen_tokenizer(folder, vocab_size: int = VOCAB) -> None:
    """Qwen2's tokenizer cut to ``vocab_size`` ids: the first ranks (the 256 byte symbols and the earliest
    merges), the merges among them, and the three control tokens on the last ids. The same pre-tokenizer and
    byte-level BPE, so a toy checkpoint gets a real Qwen2-style vocabulary that reads back in milliseconds."""
    family = cached_family_tokenizer_dir("qwen2", instruct=True)
    data = json.loads((family / "tokenizer.json").read_text(encoding="utf-8"))
    keep = vocab_size - len(CONTROL)
    vocab = {tok: i for tok, i in data["model"]["vocab"].items() if i < keep}
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    for i, added in enumerate(a for a in data["added_tokens"] if a["content"] in CONTROL):
        added["id"] = keep + i
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] in CONTROL]
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(family / name, folder / name)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A deploy package of a toy Qwen2 (weights large enough for peaked logits) with the small Qwen2 tokenizer."""
    from transformers import Qwen2ForCausalLM

    from qwen2lib.deploy import build_deploy_package

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    config = tiny_hf_config(initializer_range=0.15, bos_token_id=VOCAB - 3, eos_token_id=VOCAB - 1)
    Qwen2ForCausalLM(config).eval().save_pretrained(root / "checkpoint")
    write_small_qwen_tokenizer(root / "checkpoint")
    return build_deploy_package(root / "checkpoint", root / "patched")


@pytest.fixture(scope="module")
def blocks():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB - 3, (2, 24), generator=g)


@pytest.fixture(scope="module")
def reference(package):
    from qwen2lib.deploy import load_deploy_package

    return load_deploy_package(package, torch.float32)


# ---- GGUF ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_reports(package, reference, blocks, tmp_path_factory):
    """{type: (write summary, fidelity vs the package, reader)} for each GGUF type."""
    import gguf

    out, reports = tmp_path_factory.mktemp("gguf"), {}
    for gguf_type in export_gguf.GGUF_TYPES:
        summary = export_gguf.write_gguf(package, out / f"m-{gguf_type}.gguf", gguf_type)
        reader = gguf.GGUFReader(str(out / f"m-{gguf_type}.gguf"))
        model = gguf_reader.load_gguf_model(reader)
        reports[gguf_type] = (summary, fidelity_report(logits_fn(reference), logits_fn(model), blocks), reader)
    return reports


def test_gguf_logits_match_the_package_within_each_types_tolerance(gguf_reports, int8_packages, reference, blocks):
    f16, q8, q4 = (gguf_reports[t][1] for t in ("f16", "q8_0", "q4_0"))
    with torch.no_grad():
        scale = float(reference(blocks).logits.abs().max())
    assert f16["max_abs_dlogits"] < 5e-3 * scale and f16["kld_mean"] < 1e-5 and f16["top1_agreement"] == 1.0
    assert q8["kld_mean"] < 3e-3 and q8["top1_agreement"] >= 0.9
    assert q4["kld_mean"] < 0.3 and q4["top1_agreement"] >= 0.3  # 4 bits on a 64-wide random toy: far, not lost
    assert f16["kld_mean"] < q8["kld_mean"] < q4["kld_mean"]  # more bits, closer: the types really differ
    # q8_0 (a scale per 32 weights, the tied embedding/output quantized too) lands near our per-channel int8
    # (embedding and lm_head kept fp32) on the same blocks
    ours = fidelity_report(logits_fn(reference), logits_fn(load_quantized(int8_packages["w8a16"])), blocks)
    assert q8["kld_mean"] < 1.5 * ours["kld_mean"]
    sizes = {t: gguf_reports[t][0]["bytes"] for t in gguf_reports}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]


def test_gguf_verification_streams_both_models_and_matches_the_whole_model_report(gguf_reports, package, blocks):
    # export's check runs the package and the file's dequantized tensors a layer at a time (any size fits); its
    # figures must be those of the two whole models (the fixture: transformers built from the GGUF alone)
    from qwen2lib.model.tokenizer import load_tokenizer

    _, whole, reader = gguf_reports["q4_0"]
    streamed = export.verify_gguf(package, reader.data.filename, blocks, load_tokenizer(str(package)))
    report = streamed["fidelity"]["gguf vs fp32"]
    for key in ("kld_mean", "top1_agreement", "ppl_ratio", "max_abs_dlogits"):
        torch.testing.assert_close(report[key], whole[key], rtol=1e-4, atol=1e-6, msg=key)
    assert len(streamed["layer_sqnr_db"]) == 2 and all(5 < db < 60 for db in streamed["layer_sqnr_db"].values())
    assert streamed["tokenizer"]["all_identical"]


def test_a_gguf_of_another_model_is_refused_before_it_is_run(gguf_reports, package):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(package))
    config.num_key_value_heads, config.rms_norm_eps = 1, 1e-5
    with pytest.raises(gguf_reader.GGUFError, match=r"describes another model: num_key_value_heads 2 \(package: "
                                                      r"1\), rms_norm_eps 1e-06 \(package: 1e-05\)"):
        gguf_reader.GGUFTensors(gguf_reports["q8_0"][2], config)


def test_gguf_metadata_and_tensor_types_are_what_llama_cpp_reads(gguf_reports, package):
    import gguf

    source = json.loads((package / "config.json").read_text())
    summary, _, reader = gguf_reports["q4_0"]
    config = gguf_reader.config_from_gguf(reader)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "rms_norm_eps", "vocab_size"):
        assert getattr(config, key) == pytest.approx(source[key]), key
    assert config.rope_parameters["rope_theta"] == source["rope_parameters"]["rope_theta"]
    assert config.tie_word_embeddings and reader.get_field("general.architecture").contents() == "qwen2"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reads the output from token_embd
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0  # the output matrix keeps 8 bits in q4_0
    assert types["blk.1.ffn_down.weight"] == types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.0.attn_q.bias"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert len(types) == summary["tensors"] == 1 + 1 + 2 * 12  # embd, norm, 12 per layer (3 biases)
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)


def test_gguf_tokenizer_rebuilt_from_the_file_gives_the_packages_ids(gguf_reports, package):
    import gguf

    from qwen2lib.model.tokenizer import load_tokenizer

    reader = gguf_reports["q8_0"][2]
    value = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "qwen2"
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert len(tokens) == VOCAB and tokens[VOCAB - 3:] == list(CONTROL)
    assert types[VOCAB - 3:] == [int(gguf.TokenType.CONTROL)] * 3
    assert set(types[:VOCAB - 3]) == {int(gguf.TokenType.NORMAL)}
    assert value("tokenizer.ggml.eos_token_id") == VOCAB - 1 and value("tokenizer.ggml.add_bos_token") is False
    assert "<|im_start|>" in value("tokenizer.chat_template")
    reference = load_tokenizer(str(package))
    rebuilt = gguf_reader.gguf_tokenizer(reader)
    for text in SAMPLES:
        ids = reference(text, add_special_tokens=False)["input_ids"]
        assert rebuilt.encode(text, add_special_tokens=False).ids == ids, text
        assert rebuilt.decode(ids, skip_special_tokens=False) == reference.decode(ids)
    assert any(len(reference(t)["input_ids"]) < len(t.encode()) for t in SAMPLES)  # merges were applied


def test_llama_cpp_runs_the_gguf_through_the_generation_loop(package, reference, blocks, tmp_path):
    """llama.cpp itself (llama-cpp-python, optional: it compiles llama.cpp) on our f32 GGUF: the package's logits
    and its greedy tokens, through the same generate() as the torch and graph backends."""
    pytest.importorskip("llama_cpp")
    path = tmp_path / "m-f32.gguf"
    export_gguf.write_gguf(package, path, "f32")
    backend = LlamaCppBackend.load(path, context=64, threads=1, every_position=True)
    report = fidelity_report(logits_fn(reference), backend.logits, blocks)
    assert report["kld_mean"] < 1e-4 and report["top1_agreement"] == 1.0, report
    prompt = blocks[0, :8].tolist()
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
    ours = generate(TorchBackend(reference), None, prompt, greedy)
    theirs = generate(backend, None, prompt, greedy)
    assert theirs.token_ids == ours.token_ids
    logits, state = backend.prefill(blocks[:1, :4], torch.ones(1, 4, dtype=torch.long))
    backend.prefill(blocks[:1, :6], torch.ones(1, 6, dtype=torch.long))
    with pytest.raises(Qwen2LibError, match="one sequence at a time"):
        backend.decode(logits.argmax(-1, keepdim=True), state)  # the context has moved on to another prompt
    with pytest.raises(Qwen2LibError, match="one unpadded row at a time"):
        backend.prefill(blocks[:, :4], torch.ones(2, 4, dtype=torch.long))
    backend.close()


def test_the_llama_cpp_backend_without_llama_cpp_python_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    with pytest.raises(MissingInputError, match=r"^llama.cpp backend: llama-cpp-python is not installed: pip install "):
        LlamaCppBackend.load(tmp_path / "m.gguf")


def test_gguf_writer_streams_and_refuses_what_it_cannot_write(package, tmp_path, monkeypatch):
    int8_dir = tmp_path / "int8"
    int8_dir.mkdir()
    config = json.loads((package / "config.json").read_text())
    (int8_dir / "config.json").write_text(json.dumps(dict(config, quantization_config={"quant_method": "x"})))
    with pytest.raises(export_gguf.ExportError, match="float deploy package"):
        export_gguf.write_gguf(int8_dir, tmp_path / "x.gguf")
    with pytest.raises(export_gguf.ExportError, match="--type"):
        export_gguf.write_gguf(package, tmp_path / "x.gguf", "q5_k")
    no_tokenizer = tmp_path / "no-tok"
    shutil.copytree(package, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(export_gguf.ExportError, match="tokenizer.json"):
        export_gguf.write_gguf(no_tokenizer, tmp_path / "x.gguf")
    # tensors are read one at a time: never the whole state dict
    from safetensors import safe_open

    reads = []
    handle = type(safe_open(str(next(package.glob("*.safetensors"))), framework="pt"))
    original = handle.get_tensor

    def counting(self, name):
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(handle, "get_tensor", counting)
    summary = export_gguf.write_gguf(package, tmp_path / "s.gguf", "f16")
    assert len(reads) == summary["tensors"] == len(set(reads))


# ---- compressed-tensors -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_packages(package, blocks, tmp_path_factory):
    from qwen2lib.deploy import load_deploy_package

    out = {}
    for scheme in ("w8a16", "smoothquant"):
        model = load_deploy_package(package, torch.float32)
        stats = absmax_stats(model, blocks) if scheme == "smoothquant" else None
        quantize_model(model, scheme, stats=stats)
        out[scheme] = model.save_quantized(tmp_path_factory.mktemp(scheme) / "pkg")
    return out


@pytest.mark.parametrize("scheme", ["w8a16", "smoothquant"])
def test_compressed_tensors_export_loads_with_the_same_int8_weights_and_logits(int8_packages, blocks, tmp_path, scheme):
    from compressed_tensors.quantization import QuantizationConfig

    source = int8_packages[scheme]
    out = tmp_path / "ct"
    out.mkdir()
    summary = export_ct.write_compressed_tensors(source, out, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["Qwen2ForCausalLM"]
    assert not list(out.glob("*.py")) and (out / "tokenizer.json").is_file()
    quant = QuantizationConfig.model_validate(config["quantization_config"])  # the library's own schema
    assert quant.quant_method == "compressed-tensors" and quant.ignore == ["lm_head"]
    formats = {g.format for g in quant.config_groups.values()}
    assert formats == ({"pack-quantized"} if scheme == "w8a16" else {"pack-quantized", "int-quantized"})
    assert config["quantization_config"]["format"] == (formats.pop() if len(formats) == 1 else "mixed-precision")

    exported = export.load_compressed_tensors(out)
    int8 = load_quantized(source)
    report = fidelity_report(logits_fn(int8), logits_fn(exported), blocks)  # (weights decompress on first call)
    assert report["kld_mean"] < 1e-3 and report["top1_agreement"] >= 0.95, report
    for name, module in int8.named_modules():
        if is_int8_linear(module):  # the engine sees exactly the package's int8 values and scales
            weight = exported.get_submodule(name).weight
            torch.testing.assert_close(weight, dequantize_weight(module.weight, module.weight_scale), rtol=0,
                                       atol=1e-7, msg=name)
    assert summary["shards"] == ["model.safetensors"]


def test_compressed_tensors_default_is_bf16_and_shards_stream(int8_packages, blocks, tmp_path):
    source = int8_packages["w8a16"]
    out = tmp_path / "ct"
    out.mkdir()
    summary = export_ct.write_compressed_tensors(source, out, shard_bytes=40_000)
    assert len(summary["shards"]) > 1 and (out / export_ct.INDEX_FILE).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / summary["shards"][0]), framework="pt") as f:
        dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}
    assert set(dtypes.values()) <= {"BF16", "I32", "F32", "I64"}
    report = fidelity_report(logits_fn(load_quantized(source)), logits_fn(export.load_compressed_tensors(out)), blocks)
    assert report["kld_mean"] < 5e-3 and report["top1_agreement"] >= 0.9, report


def test_pack_int8_is_the_compressed_tensors_layout():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    q = torch.randint(-127, 128, (5, 10), dtype=torch.int8)  # 10: not a multiple of 4
    packed = export_ct.pack_int8(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, 3)
    assert torch.equal(packed, pack_to_int32(q, 8))
    assert torch.equal(unpack_from_int32(packed, 8, q.shape), q)


def test_compressed_tensors_refuses_a_float_package(package, tmp_path):
    with pytest.raises(export_ct.CompressedTensorsError, match="qwen2lib quantize"):
        export_ct.write_compressed_tensors(package, tmp_path)


# ---- the stage and the command line -------------------------------------------------------------


def test_export_stage_records_its_source_and_reuses(tmp_path, capsys):
    from qwen2lib.stages.reuse import identity

    wd = tmp_path / "run"
    out = export.ensure_exported("tiny-random", "auto", wd, format="gguf", variant="q8_0", verify_blocks=1,
                                 verify_len=16)
    assert out == wd / "exported" / "gguf-q8_0" and export.gguf_file(out).name == "model-q8_0.gguf"
    metrics = read_metrics(out)
    assert metrics["stage"]["inputs"]["patched"]["identity"] == identity(wd / "patched")
    assert metrics["tokenizer"]["all_identical"] and metrics["tokenizer"]["samples"] == 2  # block + chat prompt
    assert metrics["export"]["tokenizer"]["tokens"] == 151936 and metrics["export"]["tokenizer"]["control"] == 3
    assert metrics["fidelity"]["gguf vs fp32"]["kld_mean"] < 1e-3
    capsys.readouterr()
    assert export.ensure_exported("tiny-random", "auto", wd, format="gguf", variant="q8_0", verify_blocks=1,
                                  verify_len=16) == out
    assert "[exported] reusing" in capsys.readouterr().err


def test_cli_export_compressed_tensors_and_bad_requests(tmp_path, capsys):
    from qwen2lib.cli import main
    from qwen2lib.stages.reuse import identity

    wd = tmp_path / "run"
    assert main(["export", "--model", "tiny-random", "--workdir", str(wd), "--format", "compressed-tensors",
                 "--verify-blocks", "1", "--verify-len", "16"]) == 0
    out = wd / "exported" / "compressed-tensors-w8a16"
    assert "export vs int8 package" in capsys.readouterr().out
    metrics = read_metrics(out)
    assert metrics["stage"]["inputs"]["quantized"]["identity"] == identity(wd / "quantized" / "w8a16")
    assert metrics["fidelity"]["export vs int8 package"]["kld_mean"] < 1e-3
    for argv, message in ((["--format", "gguf", "--scheme", "w8a16"], "takes --type"),
                          (["--format", "compressed-tensors", "--type", "q8_0"], "takes --scheme"),
                          (["--format", "gguf", "--type", "q5_k"], "f16, q8_0, q4_0"),
                          (["--format", "compressed-tensors", "--float-dtype", "int8"], "--float-dtype"),
                          (["--format", "gguf", "--verify-blocks", "-1"], "--verify-blocks")):
        assert main(["export", "--model", "no-such-model-anywhere", *argv]) == 2  # refused before any loading
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_quant_types_keep_rows_that_do_not_split_into_blocks_in_f16():
    import gguf

    assert export_gguf.tensor_type("blk.0.ffn_up.weight", (64, 40), "q4_0", True) == gguf.GGMLQuantizationType.F16
    assert export_gguf.tensor_type("blk.0.ffn_up.weight", (64, 64), "q4_0", True) == gguf.GGMLQuantizationType.Q4_0
    assert export_gguf.tensor_type("output.weight", (64, 64), "q4_0", False) == gguf.GGMLQuantizationType.Q8_0
    q = np.zeros((2, 64), dtype=np.float32)
    assert export_gguf.encode_tensor(torch.from_numpy(q), gguf.GGMLQuantizationType.Q8_0).dtype == np.uint8


def test_yarn_scaling_is_written_and_read_back(tmp_path):
    from transformers import Qwen2ForCausalLM

    from qwen2lib.deploy import build_deploy_package

    yarn = {"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_hf_config(rope_parameters=yarn, max_position_embeddings=256)).save_pretrained(tmp_path / "ckpt")
    write_small_qwen_tokenizer(tmp_path / "ckpt")
    package = build_deploy_package(tmp_path / "ckpt", tmp_path / "patched")
    export_gguf.write_gguf(package, tmp_path / "y.gguf", "f16")
    rope = gguf_reader.config_from_gguf(gguf_reader.as_reader(tmp_path / "y.gguf")).rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 64)
    assert rope["rope_theta"] == 1_000_000.0


def as_vocab_and_merges(folder) -> None:
    """The other Hugging Face tokenizer layout: vocab.json + merges.txt, the added tokens in tokenizer_config.json,
    no tokenizer.json (as many fine-tunes ship)."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    (folder / "vocab.json").write_text(json.dumps(data["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config["added_tokens_decoder"] = {str(a["id"]): {k: a[k] for k in ("content", "special", "normalized", "lstrip",
                                                                         "rstrip", "single_word")}
                                      for a in data["added_tokens"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer.json").unlink()


def test_a_checkpoint_with_vocab_and_merges_exports_and_its_tokenizer_files_are_its_identity(package, tmp_path):
    from qwen2lib.model.tokenizer import load_tokenizer
    from qwen2lib.stages.reuse import checkpoint_identity

    folder = tmp_path / "vocab-merges"
    shutil.copytree(package, folder)
    as_vocab_and_merges(folder)
    reference, ours = load_tokenizer(str(package)), load_tokenizer(str(folder))
    for text in SAMPLES:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    export_gguf.write_gguf(folder, tmp_path / "vm.gguf", "f16")
    rebuilt = gguf_reader.gguf_tokenizer(tmp_path / "vm.gguf")
    for text in SAMPLES:
        assert rebuilt.encode(text, add_special_tokens=False).ids == reference(text)["input_ids"], text
    before = checkpoint_identity(folder)
    shutil.copy(package / "tokenizer.json", folder / "tokenizer.json")
    assert checkpoint_identity(folder) != before  # a tokenizer file added: another checkpoint to every stage
