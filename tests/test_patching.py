"""The deploy package: patched transformers Qwen2 source, checked against upstream on tiny random checkpoints."""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_hf_config

from qwen2lib import deploy
from qwen2lib.deploy import package as deploy_package
from qwen2lib.errors import ModelNotFoundError, WrongModelTypeError

TOLERANCE = 1e-5  # fp32, same algorithm: anything above this is a patch bug, not rounding
VOCAB = 1000

# What the generated files may import: torch, the public-ish transformers modules they really use, and the
# package's own configuration file and copied modules. masking_utils, integrations (hub kernels), flash-attention
# utils, output capturing and the deprecation helpers must be gone.
ALLOWED_MODELING_IMPORTS = {
    "collections.abc",
    "torch",
    "transformers.activations",
    "transformers.cache_utils",
    "transformers.generation",
    "transformers.modeling_layers",
    "transformers.modeling_outputs",
    "transformers.modeling_rope_utils",
    "transformers.modeling_utils",
    "transformers.processing_utils",
    "transformers.utils",
    ".configuration_qwen2_onnx",
    ".causal_mask_onnx",
    ".kv_cache_onnx",
    ".dual_chunk_onnx",
    ".quantization_onnx",
    ".schemes_onnx",
    ".quantized_package_onnx",
}
# The quantizer the package carries: torch, numpy, safetensors and the standard library (qwen2lib's error base only
# where it is installed, inside a try).
ALLOWED_QUANTIZATION_IMPORTS = {"__future__", "copy", "fnmatch", "json", "os", "shutil", "pathlib", "typing", "numpy",
                                "torch", "torch.nn", "torch.nn.functional", "safetensors", "safetensors.torch",
                                "qwen2lib.errors", ".quantization_onnx", ".schemes_onnx"}
ALLOWED_CONFIGURATION_IMPORTS = {
    "huggingface_hub.dataclasses",
    "transformers.configuration_utils",
    "transformers.modeling_rope_utils",
    "transformers.utils",
}


def tiny_config(**overrides):
    """conftest's tiny config with a larger vocabulary, an untied head and base-10k RoPE."""
    return tiny_hf_config(**{"vocab_size": VOCAB, "tie_word_embeddings": False,
                             "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0}, **overrides})


def save_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    Qwen2ForCausalLM(tiny_config(**overrides)).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')  # a tokenizer file to carry over
    return folder


@pytest.fixture(scope="module")
def package_of(tmp_path_factory):
    """Factory, cached per module: (checkpoint, package) for a config variant."""
    built = {}

    def make(variant: str, *, insert_slice: bool = False, **overrides) -> tuple[Path, Path]:
        key = (variant, insert_slice)
        if key not in built:
            root = tmp_path_factory.mktemp(variant)
            checkpoint = save_checkpoint(root / "checkpoint", **overrides)
            package = deploy.build_deploy_package(checkpoint, root / f"package-{variant}", insert_slice=insert_slice)
            built[key] = (checkpoint, package)
        return built[key]

    return make


def prompt(length: int = 10, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference(checkpoint: Path, attention: str = "eager"):
    return deploy.load_reference(checkpoint, attention=attention)


# ---- numerics against upstream ---------------------------------------------------------------


def test_package_matches_upstream_over_prompt_and_cached_decode(package_of):
    checkpoint, package = package_of("plain")
    proof = deploy.prove_package(package, checkpoint, prompt(), decode_steps=16)
    assert proof["prompt_logits_max_abs_diff"] <= TOLERANCE, proof
    assert proof["decode_logits_max_abs_diff"] <= TOLERANCE, proof
    assert proof["generate_tokens_equal"] and proof["generated_tokens"] == 16, proof
    assert proof["passed"]
    assert json.loads((package / "metrics.json").read_text())["proof"] == proof


def test_package_matches_upstream_default_sdpa_attention_too(package_of):
    checkpoint, package = package_of("plain")
    ids = prompt(12)
    with torch.inference_mode():
        ours = deploy.load_deploy_package(package)(ids).logits
        theirs = reference(checkpoint, attention="sdpa")(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TOLERANCE)


def test_insert_slice_keeps_the_last_position_logits(package_of):
    checkpoint, package = package_of("plain", insert_slice=True)
    ids = prompt(10)
    model = deploy.load_deploy_package(package)
    assert model.config.insert_slice is True
    with torch.inference_mode():
        ours = model(ids, past_key_values=[]).logits
        theirs = reference(checkpoint)(ids).logits
    assert ours.shape == (1, 1, VOCAB)
    torch.testing.assert_close(ours[:, -1], theirs[:, -1], rtol=0, atol=TOLERANCE)
    proof = deploy.prove_package(package, checkpoint, ids, decode_steps=16, record=False)
    assert proof["passed"] and proof["insert_slice"] and "prompt_logits_max_abs_diff" not in proof, proof


def test_feeding_presents_back_reproduces_full_recomputation(package_of):
    _, package = package_of("plain")
    model = deploy.load_deploy_package(package)
    ids = prompt(12)
    with torch.inference_mode():
        full = model(ids, past_key_values=[]).logits
        step = model(ids[:, :8], past_key_values=[])
        logits = [step.logits]
        for start in (8, 9, 10):
            width = 2 if start == 10 else 1  # one chunk of two tokens: T_new > 1 on top of a past
            step = model(ids[:, start : start + width], past_key_values=step.presents)
            logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=0, atol=TOLERANCE)
    assert len(step.presents) == 2
    for key, value in step.presents:
        assert key.shape == value.shape == (1, 2, 12, 16)  # (batch, kv heads, all positions, head_dim)


def test_explicit_cache_as_plain_tuple_output(package_of):
    _, package = package_of("plain")
    model = deploy.load_deploy_package(package)
    with torch.inference_mode():
        logits, presents = model(prompt(5), past_key_values=[], return_dict=False)
    assert logits.shape == (1, 5, VOCAB) and len(presents) == 2


def test_explicit_cache_forward_exports_to_plain_tensor_ops(package_of):
    _, package = package_of("plain")
    model = deploy.load_deploy_package(package)

    class LogitsAndPresents(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids, past):
            out = self.lm(ids, past_key_values=past, use_cache=False)
            return out.logits, out.presents

    past = [(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16)) for _ in range(2)]
    new, old = torch.export.Dim("new", min=1, max=64), torch.export.Dim("old", min=0, max=64)
    exported = torch.export.export(LogitsAndPresents(model), (prompt(4), past), strict=False,
                                   dynamic_shapes=({1: new}, [({2: old}, {2: old})] * 2))
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "aten.le.Tensor" in ops and "aten.softmax.int" in ops, ops  # the mask and eager attention are in the graph
    assert not any("scaled_dot_product" in op for op in ops), ops
    longer_past = [(torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)) for _ in range(2)]
    with torch.inference_mode():
        torch.testing.assert_close(exported.module()(prompt(3), longer_past)[0],
                                   LogitsAndPresents(model)(prompt(3), longer_past)[0], rtol=0, atol=TOLERANCE)


def test_cache_conventions_mixed_are_refused_and_old_spelling_works(package_of):
    from transformers import DynamicCache

    _, package = package_of("plain")
    model = deploy.load_deploy_package(package)
    with pytest.raises(ValueError, match="not both"):
        model(prompt(3), cache=DynamicCache(), past_key_values=[])
    with torch.inference_mode():  # the pre-5.x spelling: a Cache object passed as past_key_values
        out = model(prompt(3), past_key_values=DynamicCache(), use_cache=True)
    assert out.cache.get_seq_length() == 3 and out.presents is None


def test_sliding_window_layers_match_upstream(package_of):
    # window 4 on layer 1 only; prompt 10 + 16 cached steps run far past it, and upstream's sliding
    # DynamicCache drops old keys while the explicit tensors keep them behind the mask
    checkpoint, package = package_of("sliding", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert deploy.load_deploy_package(package).config.layer_types == ["full_attention", "sliding_attention"]
    proof = deploy.prove_package(package, checkpoint, prompt(10), decode_steps=16, record=False)
    assert proof["prompt_logits_max_abs_diff"] <= TOLERANCE, proof
    assert proof["decode_logits_max_abs_diff"] <= TOLERANCE, proof
    assert proof["generate_tokens_equal"], proof


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tied_and_untied_embeddings(package_of, tied):
    checkpoint, package = package_of(f"tie-{tied}", tie_word_embeddings=tied)
    model = deploy.load_deploy_package(package)
    shares = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert shares == tied
    ids = prompt(8)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(checkpoint)(ids).logits, rtol=0, atol=TOLERANCE)


def test_left_padded_batch_matches_upstream(package_of):
    checkpoint, package = package_of("plain")
    ids = prompt(8, batch=2)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0  # second row is left-padded by three tokens
    with torch.inference_mode():
        ours = deploy.load_deploy_package(package)(ids, attention_mask=attention_mask, past_key_values=[]).logits
        theirs = reference(checkpoint)(ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()  # padded query rows attend to nothing; only real tokens are compared
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=TOLERANCE)


# ---- the patches themselves ------------------------------------------------------------------


def test_a_patch_that_no_longer_matches_names_itself_and_the_version():
    upstream = deploy.upstream_source(deploy.MODELING_FILE)
    drifted = upstream.replace("ALL_ATTENTION_FUNCTIONS.get_interface(", "ALL_ATTENTION_FUNCTIONS.lookup(")
    with pytest.raises(deploy.PatchAnchorError) as caught:
        deploy.patched_sources("onnx", modeling_source=drifted)
    message = str(caught.value)
    assert "'eager_attention'" in message and deploy.PATCHES_WRITTEN_FOR in message, message


def test_relative_imports_patch_refuses_a_file_without_relative_imports():
    with pytest.raises(deploy.PatchAnchorError, match="relative_imports.*5.24.0"):
        deploy.apply_patches("import torch\n", deploy.configuration_patches("onnx"))


def imported_modules(source: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add("." * node.level + (node.module or ""))
    return modules


def test_generated_files_import_only_the_allowed_modules():
    sources = deploy.patched_sources("onnx")
    modeling, configuration = imported_modules(sources.modeling), imported_modules(sources.configuration)
    assert modeling <= ALLOWED_MODELING_IMPORTS, modeling - ALLOWED_MODELING_IMPORTS
    assert configuration <= ALLOWED_CONFIGURATION_IMPORTS, configuration - ALLOWED_CONFIGURATION_IMPORTS
    for text in (sources.quantization, sources.schemes, sources.quantized_package):  # torch, numpy, safetensors and each other only
        quantization = imported_modules(text)
        assert quantization <= ALLOWED_QUANTIZATION_IMPORTS, quantization - ALLOWED_QUANTIZATION_IMPORTS
    assert "masking_utils" not in sources.modeling and "ALL_ATTENTION_FUNCTIONS" not in sources.modeling


def test_every_patch_changes_something_and_records_its_diff():
    applied = deploy.patched_sources("onnx").applied
    assert [(a.patch.name, a.patch.file) for a in applied] == [
        ("relative_imports", "modeling_qwen2.py"),
        ("no_runtime_dispatch", "modeling_qwen2.py"),
        ("eager_attention", "modeling_qwen2.py"),
        ("explicit_kv_cache", "modeling_qwen2.py"),
        ("insert_slice", "modeling_qwen2.py"),
        ("quantize_entry_point", "modeling_qwen2.py"),
        ("dual_chunk_attention", "modeling_qwen2.py"),
        ("relative_imports", "configuration_qwen2.py"),
        ("insert_slice", "configuration_qwen2.py"),
        ("dual_chunk_attention", "configuration_qwen2.py"),
    ]
    for a in applied:
        assert a.before != a.after and a.diff.startswith(f"--- a/{a.patch.file}"), a.patch.name
        assert a.lines_added + a.lines_removed > 0


def test_report_helpers_show_diffs_and_the_summary_table():
    applied = deploy.patched_sources("onnx").applied
    table = deploy.patch_table(applied)
    assert list(table.columns) == ["patch", "file", "description", "+lines", "-lines", "copies"]
    assert table["copies"].tolist()[2:4] == ["causal_mask_onnx.py", "kv_cache_onnx.py"]
    assert table["+lines"].tolist() == [a.lines_added for a in applied]
    html = deploy.patch_html(applied[2])
    assert "eager_attention" in html and "background:#dafbe1" in html and "&lt;" not in html[:50]
    assert "## quantize_entry_point" in deploy.patch_report(applied)
    assert "qwen2lib/deploy/inserted/causal_mask.py as causal_mask_onnx.py" in html  # the note beside the import line


# ---- dual chunk attention (patch 7) ------------------------------------------------------------

DCA = {"chunk_size": 12, "local_size": 4, "original_max_position_embeddings": 12}  # chunks of s = 8 positions


def naive_dca_logits(checkpoint: Path, ids: torch.Tensor, monkeypatch) -> torch.Tensor:
    """Logits of qwen2lib's teaching model with its attention swapped for dca.naive_dual_chunk_attention."""
    from qwen2lib.scratch import dca
    from qwen2lib.scratch.model import Qwen2

    monkeypatch.setattr(dca, "dual_chunk_attention", dca.naive_dual_chunk_attention)
    with torch.no_grad():
        return Qwen2.from_checkpoint(checkpoint).eval()(ids)


@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_dual_chunk_package_equals_the_naive_reference_in_prefill_and_cached_decode(package_of, monkeypatch, rope):
    rope_parameters = {"rope_type": "default", "rope_theta": 10_000.0}
    if rope == "yarn":  # YaRN's cos/sin factor scales DCA's scores like plain attention's
        rope_parameters = {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                           "original_max_position_embeddings": 64}
    checkpoint, package = package_of(f"dca-{rope}", dual_chunk_attention_config=DCA, rope_parameters=rope_parameters,
                                     max_position_embeddings=256)
    model = deploy.load_deploy_package(package)
    ids = prompt(40)  # five chunks: intra, successive and inter parts all present
    expected = naive_dca_logits(checkpoint, ids, monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, past_key_values=[]).logits, expected, atol=1e-4, rtol=0)
        out = model(ids[:, :13], past_key_values=[])  # prefill ends mid-chunk, then one token at a time
        for t in range(13, 40):
            out = model(ids[:, t : t + 1], past_key_values=out.presents)
            torch.testing.assert_close(out.logits[:, -1], expected[:, t], atol=1e-4, rtol=0)
        generated = model.generate(ids[:, :20], max_new_tokens=12, do_sample=False,
                                   attention_mask=torch.ones(1, 20, dtype=torch.long))  # DynamicCache path
    torch.testing.assert_close(model(generated, past_key_values=[]).logits[:, 19:-1].argmax(-1),
                               generated[:, 20:])


def test_dual_chunk_package_equals_plain_attention_exactly_inside_one_chunk(package_of):
    _, plain = package_of("plain")
    _, dual = package_of("dca-default", dual_chunk_attention_config=DCA, max_position_embeddings=256)
    plain, dual = deploy.load_deploy_package(plain), deploy.load_deploy_package(dual)
    dual.load_state_dict(plain.state_dict())
    ids = prompt(8)  # s = 8: every pair intra, every rotation the plain one
    with torch.no_grad():
        assert torch.equal(dual(ids, past_key_values=[]).logits, plain(ids, past_key_values=[]).logits)
        # past one chunk, distances stay exact while query i mod s + s <= chunk_size (here i <= 12): local_size
        # buys that; the rotations differ (p mod s), so equal up to rounding only
        longer = prompt(20)
        ours, theirs = dual(longer, past_key_values=[]).logits, plain(longer, past_key_values=[]).logits
        torch.testing.assert_close(ours[:, :13], theirs[:, :13], atol=1e-5, rtol=0)
        assert (ours[:, 13:] - theirs[:, 13:]).abs().amax(-1).min() > 1e-4, "the capped distances change every later row"


def test_dual_chunk_left_padded_batch_equals_each_row_alone(package_of):
    _, package = package_of("dca-default", dual_chunk_attention_config=DCA, max_position_embeddings=256)
    model = deploy.load_deploy_package(package)
    short, long = prompt(17, seed=3), prompt(30, seed=4)
    ids = torch.cat([torch.cat([torch.zeros(1, 13, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 13), torch.ones(1, 17)], 1), torch.ones(1, 30)]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions, past_key_values=[]).logits
        torch.testing.assert_close(batch[0, 13:], model(short, past_key_values=[]).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch[1], model(long, past_key_values=[]).logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad, message", [({"chunk_size": 8, "local_size": 8}, "local_size"),
                                          ({"local_size": 2}, "chunk_size")])
def test_dual_chunk_config_errors_name_the_key(tmp_path, bad, message):
    checkpoint = save_checkpoint(tmp_path / "checkpoint", dual_chunk_attention_config=bad)
    package = deploy.build_deploy_package(checkpoint, tmp_path / "package")
    with pytest.raises(ValueError, match=message):
        deploy.load_deploy_package(package)


# ---- the package folder ----------------------------------------------------------------------


def test_package_layout_config_and_symlinked_weights(package_of):
    checkpoint, package = package_of("plain")
    config = json.loads((package / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_qwen2_onnx.Qwen2Config",
        "AutoModelForCausalLM": "modeling_qwen2_onnx.Qwen2ForCausalLM",
    }
    assert config["_attn_implementation"] == "eager" and config["insert_slice"] is False
    weights = package / "model.safetensors"
    assert weights.is_symlink() and os.path.isabs(os.readlink(weights))
    assert weights.resolve() == (checkpoint / "model.safetensors").resolve()
    assert not (package / "tokenizer_config.json").is_symlink()
    assert (package / "tokenizer_config.json").read_text() == (checkpoint / "tokenizer_config.json").read_text()
    assert (package / "generation_config.json").is_file()
    summary = json.loads((package / "patches.json").read_text())
    assert summary["patches_written_for"] == deploy.PATCHES_WRITTEN_FOR
    assert {p["name"] for p in summary["patches"]} >= {"eager_attention", "explicit_kv_cache", "insert_slice"}
    assert deploy.load_deploy_package(package).config._attn_implementation == "eager"


def test_sharded_checkpoint_links_every_shard_and_the_index(tmp_path):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_config()).save_pretrained(tmp_path / "checkpoint", max_shard_size="200KB")
    shards = sorted(p.name for p in (tmp_path / "checkpoint").glob("*.safetensors"))
    assert len(shards) > 1
    package = deploy.build_deploy_package(tmp_path / "checkpoint", tmp_path / "package")
    for name in shards + ["model.safetensors.index.json"]:
        assert (package / name).is_symlink(), name


def test_an_exception_mid_build_leaves_no_package_folder(tmp_path, monkeypatch):
    checkpoint = save_checkpoint(tmp_path / "checkpoint")

    def broken_link(*args, **kwargs):
        raise OSError("disk full while linking")

    monkeypatch.setattr(deploy_package, "link_weights", broken_link)
    with pytest.raises(OSError, match="disk full"):
        deploy.build_deploy_package(checkpoint, tmp_path / "out" / "patched")
    assert list((tmp_path / "out").iterdir()) == []  # neither the package nor a temp folder


def test_a_failed_rebuild_keeps_the_previous_package(tmp_path, monkeypatch):
    checkpoint = save_checkpoint(tmp_path / "checkpoint")
    package = deploy.build_deploy_package(checkpoint, tmp_path / "patched")
    before = (package / "config.json").read_text()
    monkeypatch.setattr(deploy_package, "copy_tokenizer_files", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        deploy.build_deploy_package(checkpoint, package, insert_slice=True)
    assert (package / "config.json").read_text() == before


def test_checkpoint_without_config_json_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json.*checkpoint_dir") as caught:
        deploy.build_deploy_package(tmp_path / "empty", tmp_path / "package")
    assert isinstance(caught.value, ModelNotFoundError)
    assert not (tmp_path / "package").exists()


def test_llama_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'.*qwen2") as caught:
        deploy.build_deploy_package(folder, tmp_path / "package")
    assert isinstance(caught.value, WrongModelTypeError)


def test_checkpoint_without_safetensors_is_refused(tmp_path):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        deploy.build_deploy_package(folder, tmp_path / "package")


def test_package_folder_may_not_be_the_checkpoint(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "checkpoint")
    with pytest.raises(ValueError, match="overlaps the checkpoint"):
        deploy.build_deploy_package(checkpoint, checkpoint)
    assert (checkpoint / "model.safetensors").is_file()


def test_ensure_patched_reuses_a_current_package_and_rebuilds_a_stale_one(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "checkpoint")
    package = deploy.ensure_patched(str(checkpoint), workdir=tmp_path / "run")
    assert package == tmp_path / "run" / "patched" and (package / "modeling_qwen2_onnx.py").is_file()
    built_at = (package / "config.json").stat().st_mtime_ns
    assert deploy.ensure_patched(str(checkpoint), workdir=tmp_path / "run") == package
    assert (package / "config.json").stat().st_mtime_ns == built_at  # reused, not rebuilt
    deploy.ensure_patched(str(checkpoint), workdir=tmp_path / "run", insert_slice=True)
    assert json.loads((package / "config.json").read_text())["insert_slice"] is True


# ---- quantize() entry point and insert_slice figures -----------------------------------------


STANDALONE_QUANTIZE = """
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

try:
    import qwen2lib  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("qwen2lib is importable here: this is not a check of a package on its own")
package, stats, out = map(Path, sys.argv[1:4])
ids = torch.arange(3, 19)[None]
logits = {}
for scheme in ("w8a16", "smoothquant", "w4a16"):
    model = AutoModelForCausalLM.from_pretrained(package, trust_remote_code=True).eval()
    model.quantize(scheme, stats=stats if scheme == "smoothquant" else None, **({"group_size": 32} if scheme == "w4a16" else {}))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_quantized(out / scheme)
    reloaded = AutoModelForCausalLM.from_pretrained(out / scheme, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
    logits[scheme] = expected
    print(scheme, type(reloaded.model.layers[0].mlp.up_proj).__name__)
streamed = type(model).quantize_checkpoint(package, out / "streamed", "smoothquant", stats=stats)  # layer by layer
reloaded = AutoModelForCausalLM.from_pretrained(streamed, trust_remote_code=True).eval()
with torch.no_grad():
    torch.testing.assert_close(reloaded(ids).logits, logits["smoothquant"], rtol=0, atol=0)
print("streamed", type(reloaded.model.layers[0].self_attn.q_proj).__name__)
"""


def venv_without_qwen2lib(folder: Path) -> Path:
    """A virtual environment that sees this one's packages (torch, transformers, ...) but not qwen2lib: the
    site-packages folder is put on sys.path by a plain .pth line, so the editable install's own .pth (which
    makes qwen2lib importable) is never processed."""
    import site
    import subprocess
    import venv

    venv.EnvBuilder(with_pip=False).create(folder)
    python = folder / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "parent-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_a_deploy_package_quantizes_and_reloads_without_qwen2lib(package_of, tmp_path):
    import subprocess

    from conftest import absmax_stats
    from safetensors.torch import save_file

    from qwen2lib.quantize import stage as q
    from qwen2lib.deploy.schemes import STATS_FILE

    _, package = package_of("plain")
    assert sorted(p.name for p in package.glob("*.py")) == [
        "causal_mask_onnx.py", "configuration_qwen2_onnx.py", "dual_chunk_onnx.py", "kv_cache_onnx.py",
        "modeling_qwen2_onnx.py", "quantization_onnx.py", "quantized_package_onnx.py", "schemes_onnx.py"]
    model = deploy.load_deploy_package(package)
    (tmp_path / "stats").mkdir()
    save_file(absmax_stats(model, prompt(32)), str(tmp_path / "stats" / STATS_FILE))
    python = venv_without_qwen2lib(tmp_path / "venv")
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE_QUANTIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    done = subprocess.run([python, "-I", script, package, tmp_path / "stats", tmp_path / "out"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.split() == ["w8a16", "Int8Linear", "smoothquant", "Int8Linear", "w4a16", "Int4Linear",
                                   "streamed", "Int8Linear"], done.stdout
    for scheme in ("w8a16", "smoothquant", "streamed"):  # what the package wrote on its own is what qwen2lib writes and loads
        q.verify_quantized_code(tmp_path / "out" / scheme)
        assert q.is_int8_linear(q.load_quantized(tmp_path / "out" / scheme).model.layers[1].self_attn.q_proj)


def test_measure_insert_slice_counts_lm_head_flops(package_of):
    _, package = package_of("plain")
    figures = deploy.measure_insert_slice(package, prompt_tokens=64, repeats=1)
    assert figures["lm_head_flops_without_slice"] == 2 * 64 * 64 * VOCAB
    assert figures["lm_head_flops_with_slice"] == 2 * 64 * VOCAB
    assert figures["prefill_ms_without_slice"] > 0 and figures["prefill_ms_with_slice"] > 0
    table = deploy.insert_slice_table(figures)
    assert table["logit rows"].tolist() == [64, 1]
    assert json.loads((package / "metrics.json").read_text())["insert_slice"] == figures


def test_cli_patch_builds_and_proves_the_package(tmp_path, capsys):
    from qwen2lib.cli import main

    checkpoint = save_checkpoint(tmp_path / "checkpoint")
    assert main(["patch", "--model", str(checkpoint), "--workdir", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
    assert (tmp_path / "run" / "patched" / "modeling_qwen2_onnx.py").is_file()
