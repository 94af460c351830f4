"""The code the patches insert, tested as the real modules the deploy package copies: the causal mask (patch 3), the
explicit KV cache (patch 4) and Dual Chunk Attention (patch 7, ``scratch/dual_chunk.py``, against dca.py's naive
reference); then how the package carries them: byte for byte, imported by one line each, checked on load, and
part of the patched stage's rebuild key."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import imported_names
import torch
from transformers import DynamicCache, Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from qwen2lib import deploy
from qwen2lib.deploy import package as deploy_package
from qwen2lib.deploy.inserted import causal_mask, kv_cache
from qwen2lib.deploy.patch import Patch
from qwen2lib.scratch import dca, dual_chunk
from qwen2lib.scratch.rope import default_inv_freq
from qwen2lib.stages import reuse

TARGET = "onnx"
COPIED = {"causal_mask_onnx.py": "deploy/inserted/causal_mask.py", "kv_cache_onnx.py": "deploy/inserted/kv_cache.py",
          "dual_chunk_onnx.py": "scratch/dual_chunk.py"}


# ---- patch 3: the causal mask --------------------------------------------------------------------


def reference_mask(attention_mask, past, query_length, key_length, key_offset, window):
    """The rule, one (row, query, key) at a time: a query sees earlier keys, within the window, that are tokens."""
    rows = 1 if attention_mask is None else attention_mask.shape[0]
    visible = torch.zeros(rows, 1, query_length, key_length, dtype=torch.bool)
    for b in range(rows):
        for i in range(query_length):
            for j in range(key_length):
                query, key = past + i, key_offset + j
                token = attention_mask is None or bool(attention_mask[b, key_offset + j])
                visible[b, 0, i, j] = key <= query and (window is None or key > query - window) and token
    return visible


@pytest.mark.parametrize("past,query_length,key_offset,window,padded", [
    (0, 7, 0, None, False), (5, 3, 0, None, False), (5, 1, 0, None, True), (0, 9, 0, 3, True), (6, 4, 2, 3, False),
])
def test_build_causal_mask_follows_the_rule(past, query_length, key_offset, window, padded):
    key_length = past + query_length - key_offset
    attention_mask = None
    if padded:
        attention_mask = torch.ones(2, past + query_length, dtype=torch.long)
        attention_mask[1, :2] = 0  # the second row is left-padded by two
    mask = causal_mask.build_causal_mask(attention_mask, past, query_length, key_length, key_offset, window,
                                         torch.float16, torch.device("cpu"))
    expected = reference_mask(attention_mask, past, query_length, key_length, key_offset, window)
    assert mask.dtype == torch.float16 and mask.shape == expected.shape
    assert torch.equal(mask == 0, expected)
    assert (mask[~expected] == torch.finfo(torch.float16).min).all()  # additive: exp(min - max) is 0


def test_layer_causal_mask_picks_the_window_by_layer_type_and_asks_a_cache_for_its_keys():
    config = SimpleNamespace(layer_types=["full_attention", "sliding_attention"], sliding_window=2)
    embeds = torch.zeros(1, 3, 8)  # three new tokens after four cached
    full = causal_mask.layer_causal_mask(config, "full_attention", None, embeds, 4, None)
    sliding = causal_mask.layer_causal_mask(config, "sliding_attention", None, embeds, 4, None)
    assert torch.equal(full == 0, reference_mask(None, 4, 3, 7, 0, None))
    assert torch.equal(sliding == 0, reference_mask(None, 4, 3, 7, 0, 2))

    class WindowedCache:  # a sliding-window Cache that kept only its last 5 keys, positions 2..6
        def get_mask_sizes(self, query_length, layer_idx):
            assert (query_length, layer_idx) == (3, 1)
            return 5, 2

    kept = causal_mask.layer_causal_mask(config, "sliding_attention", None, embeds, 4, WindowedCache())
    assert torch.equal(kept == 0, reference_mask(None, 4, 3, 5, 2, 2))


# ---- patch 4: the explicit KV cache --------------------------------------------------------------


def layer_kv(batch=1, past=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, past, 4, generator=g), torch.randn(batch, 2, past, 4, generator=g)


def test_cache_convention_takes_one_convention_and_the_old_spelling():
    cache = DynamicCache()
    assert kv_cache.cache_convention(None, cache, 2) == (cache, None)  # a Cache passed as past_key_values
    assert kv_cache.cache_convention(None, [], 2) == (None, [])
    pairs = [layer_kv(), layer_kv()]
    assert kv_cache.cache_convention(None, pairs, 2) == (None, pairs)
    with pytest.raises(ValueError, match="not both"):
        kv_cache.cache_convention(cache, [], 2)
    with pytest.raises(ValueError, match="1 \\(key, value\\) pairs; the model has 2 layers"):
        kv_cache.cache_convention(None, pairs[:1], 2)


def test_past_length_in_either_convention():
    assert kv_cache.past_length(None, None) == 0 and kv_cache.past_length([], None) == 0
    assert kv_cache.past_length([layer_kv(past=5)], None) == 5
    cache = DynamicCache()
    cache.update(*layer_kv(past=6), layer_idx=0)
    assert kv_cache.past_length(None, cache) == 6


def test_append_past_puts_the_new_positions_last():
    past, new = layer_kv(past=3), layer_kv(past=2, seed=1)
    key, value = kv_cache.append_past(past, *new)
    assert key.shape == value.shape == (1, 2, 5, 4)
    assert torch.equal(key[:, :, :3], past[0]) and torch.equal(value[:, :, 3:], new[1])


def test_outputs_carry_presents_beside_the_usual_fields():
    presents = [layer_kv()]
    out = kv_cache.Qwen2CausalLMOutputWithPresents(logits=torch.zeros(1, 2, 3), presents=presents)
    assert out.presents is presents and out["logits"].shape == (1, 2, 3) and out.loss is None
    assert kv_cache.Qwen2ModelOutputWithPresents(last_hidden_state=torch.zeros(1)).presents is None


# ---- patch 7: Dual Chunk Attention ----------------------------------------------------------------

HD, CHUNK, LOCAL = 16, 12, 4  # chunks of s = 8 positions
DCA_CONFIG = SimpleNamespace(dual_chunk_attention_config={"chunk_size": CHUNK, "local_size": LOCAL},
                             sliding_window=None)


def rotary_emb():
    """transformers' own Qwen2 rotary embedding, default RoPE at base 10k: what the package passes in."""
    config = Qwen2Config(hidden_size=HD * 4, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    return Qwen2RotaryEmbedding(config)


def qkv(T, heads=4, kv_heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, T, HD, generator=g), torch.randn(1, kv_heads, T, HD, generator=g),
            torch.randn(1, kv_heads, T, HD, generator=g))


def package_dual_chunk(q, k, v, past=0, attention_mask=None):
    """What the package's attention does for new tokens at past.. (its call sites, in order): queries
    (B, H, T, hd) for the new positions, k/v (B, KVH, L, hd) unrotated for every position so far."""
    T, L = q.shape[2], k.shape[2]
    emb, x = rotary_emb(), torch.zeros(1, L, HD)
    positions = torch.arange(L)[None] if attention_mask is None else (attention_mask.cumsum(-1) - 1).clamp(min=0)
    every = dual_chunk.dual_chunk_rotary(emb, DCA_CONFIG, x, positions, attention_mask, L)  # keys are cached rotated
    new = dual_chunk.dual_chunk_rotary(emb, DCA_CONFIG, x[:, -T:], positions[:, -T:], attention_mask, L)
    queries, _ = dual_chunk.rotate_dual_chunk(q, k[:, :, -T:], new)
    keys = dual_chunk.rotate_by(k, *every.key)
    mask = causal_mask.build_causal_mask(attention_mask, past, T, L, 0, None, q.dtype, q.device)
    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False)
    out, _ = dual_chunk.dual_chunk_attention_forward(module, queries, keys, v, new, mask, HD**-0.5)
    return out.transpose(1, 2)  # (B, H, T, hd)


def naive(q, k, v):
    return dca.naive_dual_chunk_attention(q, k, v, default_inv_freq(HD, 10_000.0), chunk_size=CHUNK, local_size=LOCAL)


@pytest.mark.parametrize("T,heads", [(5, 2), (37, 4), (40, 2)])
def test_the_package_dual_chunk_equals_the_naive_reference(T, heads):
    q, k, v = qkv(T, heads, seed=T)
    torch.testing.assert_close(package_dual_chunk(q, k, v), naive(q, k, v), atol=1e-5, rtol=0)


def test_the_package_dual_chunk_decodes_one_token_at_a_time_like_the_reference():
    q, k, v = qkv(29, seed=3)
    expected = naive(q, k, v)
    for t in (8, 15, 16, 28):  # chunk edges and the middle of a later chunk
        step = package_dual_chunk(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], past=t)
        torch.testing.assert_close(step[:, :, 0], expected[:, :, t], atol=1e-5, rtol=0)


def test_a_left_padded_row_attends_like_the_row_alone():
    q, k, v = qkv(20, seed=5)
    pad = torch.zeros(1, 4, HD)
    padded = [torch.cat([pad.expand(1, x.shape[1], 4, HD), x], 2) for x in (q, k, v)]
    attention_mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 20)], 1).long()
    out = package_dual_chunk(*padded, attention_mask=attention_mask)
    torch.testing.assert_close(out[:, :, 4:], naive(q, k, v), atol=1e-5, rtol=0)


def test_rotary_positions_and_parts_give_dcas_relative_distances():
    """The pairs' parts and rotary distances, read off the package's functions, are dca.py's by definition."""
    T, s = 30, CHUNK - LOCAL
    positions = torch.arange(T)
    key, queries = dual_chunk.rotary_positions(positions, CHUNK, LOCAL)
    intra, successive = (m[0, 0] for m in dual_chunk.chunk_parts(positions[None], positions[None], s))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    parts = {"intra": intra & causal, "successive": successive & causal, "inter": ~intra & ~successive & causal}
    expected = dca.relative_position_matrices(T, CHUNK, LOCAL)
    for (kind, part), query in zip(parts.items(), queries):
        assert torch.equal(part, dca.dca_masks(T, CHUNK, LOCAL)[kind]), kind
        distance = torch.where(part, query[:, None] - key[None, :], dca.NOT_THIS_KIND)
        assert torch.equal(distance, expected[kind]), kind


def test_attend_by_part_keeps_float64_and_softmaxes_bf16_in_float32():
    q, k, v = (x.double() for x in qkv(9, seed=7))
    intra, successive = dual_chunk.chunk_parts(torch.arange(9)[None], torch.arange(9)[None], 4)
    out, weights = dual_chunk.attend_by_part([q, q, q], k, v, intra, successive, None, 0.25, groups=2)
    assert out.dtype == weights.dtype == torch.float64
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 9, dtype=torch.float64), atol=1e-12, rtol=0)
    half, _ = dual_chunk.attend_by_part([x.bfloat16() for x in (q, q, q)], k.bfloat16(), v.bfloat16(), intra,
                                        successive, None, 0.25, groups=2)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), out, atol=2e-2, rtol=0)


@pytest.mark.parametrize("settings,message", [({"local_size": 2}, "chunk_size"),
                                              ({"chunk_size": 8, "local_size": 8}, "local_size"),
                                              ({"chunk_size": 8, "local_size": -1}, "local_size")])
def test_dual_chunk_settings_name_the_bad_key(settings, message):
    with pytest.raises(ValueError, match=message):
        dual_chunk.dual_chunk_settings(SimpleNamespace(dual_chunk_attention_config=settings, sliding_window=None))


def test_dual_chunk_settings_off_and_refused_with_a_sliding_window():
    assert dual_chunk.dual_chunk_settings(SimpleNamespace(dual_chunk_attention_config=None)) is None
    assert dual_chunk.dual_chunk_settings(DCA_CONFIG) == (CHUNK, LOCAL)
    windowed = SimpleNamespace(dual_chunk_attention_config={"chunk_size": 8, "local_size": 2}, sliding_window=4)
    with pytest.raises(ValueError, match="sliding window"):
        dual_chunk.dual_chunk_settings(windowed)


# ---- how the package carries them ------------------------------------------------------------------


def test_each_copied_module_is_its_qwen2lib_file_byte_for_byte_under_a_header():
    sources = deploy.patched_sources(TARGET)
    copies = {filename: source for a in sources.applied for filename, source in a.patch.copies}
    assert copies == COPIED
    for filename, source in copies.items():
        text = (reuse.PACKAGE_DIR / source).read_text(encoding="utf-8")
        packaged = sources.files()[filename]
        assert packaged.endswith(text) and packaged[: -len(text)].count("\n") == 2, filename
        assert f"qwen2lib/{source}" in packaged.splitlines()[0]


def test_copied_modules_import_only_torch_and_transformers():
    allowed = {"__future__", "dataclasses", "torch", "transformers.cache_utils", "transformers.modeling_outputs"}
    for filename, text in deploy.patched_sources(TARGET).copied.items():
        assert imported_names(text) <= allowed, (filename, imported_names(text) - allowed)


def test_the_modeling_file_imports_each_copied_module_once_in_patch_order_above_the_configuration():
    modeling = deploy.patched_sources(TARGET).modeling
    lines = [modeling.index(f"from .{Path(f).stem} import ") for f in COPIED]
    assert lines == sorted(lines) and lines[-1] < modeling.index(f"from .configuration_qwen2_{TARGET} import ")
    for filename, source in COPIED.items():
        assert modeling.count(f"from .{Path(filename).stem} import ") == 1
        assert f"# {filename} is qwen2lib/{source}, copied into the package\n" in modeling
    assert "def build_causal_mask" not in modeling and "class DualChunkRotary" not in modeling  # only call sites


def test_a_module_with_a_relative_or_qwen2lib_import_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(deploy_package, "QWEN2LIB_DIR", tmp_path)
    for line in ("from .rope import apply_rotary\n", "from qwen2lib.errors import Qwen2LibError\n"):
        (tmp_path / "helper.py").write_text("import torch\n" + line)
        patch = Patch("p", "d", deploy.MODELING_FILE, lambda s: s, copies=(("helper_onnx.py", "helper.py"),))
        applied = deploy.AppliedPatch(patch, "", "")
        with pytest.raises(RuntimeError, match="stands alone"):
            deploy_package.copied_modules([applied])


def test_the_patched_stage_is_rebuilt_when_a_copied_module_changes():
    """The copies are read as files, not imported: the stage's rebuild key lists them (stages/reuse.py)."""
    hashed = {p.relative_to(reuse.PACKAGE_DIR).as_posix() for p in reuse.stage_sources("patched")}
    quantizer = {f"deploy/{name}" for name in deploy_package.COPIED_FILES}
    assert set(COPIED.values()) | quantizer <= hashed


def test_an_edited_copied_module_is_refused_before_import(make_checkpoint, tmp_path):
    package = deploy.build_deploy_package(make_checkpoint(), tmp_path / "package")
    digests = deploy.verify_package_code(package)
    assert set(COPIED) <= set(digests)
    with open(package / "dual_chunk_onnx.py", "a", encoding="utf-8") as fh:
        fh.write("import os\n")
    with pytest.raises(deploy.PackageCodeError, match="dual_chunk_onnx.py differs"):
        deploy.load_deploy_package(package)
