"""The generation loop against transformers' generate, and its sampling, batching, streaming and stopping."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

from conftest import tiny_hf_config
from qwen2lib.errors import PromptTooLongError, Qwen2LibError
from qwen2lib.serve.generation import (SamplingParams, TextStream, ScratchBackend, TorchBackend, generate,
                                       process_logits, sample_rows, top_probabilities, torch_backend, stop_token_ids,
                                       stream)
from qwen2lib.scratch.model import Qwen2

PROMPT = [5, 17, 42, 99, 3, 250, 7, 61]


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    # A wider init than the default 0.02, so greedy output varies instead of repeating one token.
    return Qwen2ForCausalLM(tiny_hf_config(initializer_range=0.2)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from qwen2lib import load_tokenizer

    return load_tokenizer("tiny-random")


class ScriptedBackend:
    """Emits a fixed token sequence (one-hot logits), whatever it is fed: stopping and streaming tests."""

    def __init__(self, script, vocab_size=151936, max_positions=64):
        self.script, self.vocab_size, self.max_positions = list(script), vocab_size, max_positions
        self.decode_calls = 0

    def _logits(self, step, batch):
        logits = torch.full((batch, self.vocab_size), -10.0)
        logits[:, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits

    def prefill(self, ids, attention_mask):
        return self._logits(0, ids.shape[0]), 1

    def decode(self, next_ids, step):
        self.decode_calls += 1
        return self._logits(step, next_ids.shape[0]), step + 1


def test_greedy_equals_transformers_generate_for_32_tokens(hf_model):
    ids = torch.tensor([PROMPT])
    expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    for backend in (TorchBackend(hf_model), ScratchBackend(Qwen2.from_hf(hf_model))):
        out = generate(backend, None, PROMPT, SamplingParams(max_new_tokens=32), stop_ids=set())
        assert out.token_ids == expected, type(backend.model).__name__
        assert len(out.token_ids) == 32 and out.finish_reason == "length"
        assert len(set(out.token_ids)) >= 8, "a repetitive output would make this comparison weak"
        assert len(out.token_times) == 32 and out.ttft_s > 0 and len(out.itl_s) == 31


def test_greedy_stops_where_transformers_stops_on_eos(hf_model):
    ids = torch.tensor([PROMPT])
    free = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    eos = free[5]  # pretend the 6th greedy token is the end token
    expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0)[0, len(PROMPT):].tolist()
    out = generate(TorchBackend(hf_model), None, PROMPT, SamplingParams(max_new_tokens=12), stop_ids={eos})
    assert out.token_ids == expected == free[: free.index(eos) + 1]
    assert out.finish_reason == "stop"


def test_repetition_penalty_matches_transformers_generate(hf_model):
    ids = torch.tensor([PROMPT])
    expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    out = generate(TorchBackend(hf_model), None, PROMPT, SamplingParams(max_new_tokens=24, repetition_penalty=1.5),
                   stop_ids=set())
    plain = generate(TorchBackend(hf_model), None, PROMPT, SamplingParams(max_new_tokens=24), stop_ids=set())
    assert out.token_ids == expected != plain.token_ids


def test_sampling_is_reproducible_with_a_seed_and_varies_across_seeds(hf_model):
    backend = TorchBackend(hf_model)

    def run(seed):
        return generate(backend, None, PROMPT, SamplingParams(max_new_tokens=24, temperature=1.5, seed=seed),
                        stop_ids=set()).token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_1_equals_greedy(hf_model):
    backend = TorchBackend(hf_model)
    greedy = generate(backend, None, PROMPT, SamplingParams(max_new_tokens=20), stop_ids=set()).token_ids
    top1 = generate(backend, None, PROMPT, SamplingParams(max_new_tokens=20, temperature=0.8, top_k=1, seed=3),
                    stop_ids=set()).token_ids
    assert top1 == greedy


def test_logit_processing_matches_transformers_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    history = torch.randint(0, 50, (3, 7))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, history, True)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    expected = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.8)):
        expected = proc(history, expected)
    ours = process_logits(logits, params, seen)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected)), "different tokens survive top-k/top-p"
    kept = ~torch.isinf(ours)
    torch.testing.assert_close(ours[kept], expected[kept])
    assert bool(kept.sum(-1).lt(20).all()), "top-p should have cut below top-k here"


def test_top_p_over_a_real_vocabulary_keeps_what_a_full_sort_keeps():
    # the reference: HF's rule over a full descending sort; ours reads only as many top entries as each row needs
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 151936, generator=g) * torch.tensor([[6.0], [3.0], [1.0], [0.01]])  # peaked .. near flat
    for top_p in (0.5, 0.9):
        ours = process_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (probs.cumsum(-1) - probs) >= top_p)
        assert torch.equal(torch.isinf(ours), drop), f"top_p={top_p}: a different set of tokens survives"
    kept = (~torch.isinf(ours)).sum(-1)
    assert kept[0] < 256 < kept[3], "the rows should need from a few hundred entries to most of the vocabulary"
    top, ids = top_probabilities(torch.tensor([[0.1, 0.6, 0.0, 0.3]]), 0.65, first=1)
    assert ids.tolist() == [[1, 3, 0, 2]] and torch.allclose(top, torch.tensor([[0.6, 0.3, 0.1, 0.0]]))


def test_sample_rows_draws_each_token_with_its_probability():
    p = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_rows(p, g) for _ in range(20000)])  # (N, 2)
    freq = torch.bincount(draws[:, 0], minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, p[0], atol=0.015, rtol=0)  # ~4 standard errors at N = 20000
    assert freq[1] == 0 and freq[4] == 0, "a token of probability 0 was drawn"
    assert bool((draws[:, 1] == 4).all())
    again = torch.stack([sample_rows(p, torch.Generator().manual_seed(0)) for _ in range(3)])
    assert again[:, 0].tolist() == [draws[0, 0].item()] * 3, "the same generator state draws the same token"


def test_torch_backend_picks_the_class_for_the_model_and_torchbackend_refuses_the_scratch_model(hf_model):
    scratch = Qwen2.from_hf(hf_model)
    assert type(torch_backend(hf_model)) is TorchBackend and type(torch_backend(scratch)) is ScratchBackend
    with pytest.raises(Qwen2LibError, match="ScratchBackend"):
        TorchBackend(scratch)

def test_left_padded_batch_equals_single_prompts(hf_model):
    prompts = [PROMPT, [9, 8, 7], [100, 200, 300, 44, 55]]
    for backend in (TorchBackend(hf_model), ScratchBackend(Qwen2.from_hf(hf_model))):
        singles = [generate(backend, None, p, SamplingParams(max_new_tokens=16), stop_ids=set()).token_ids
                   for p in prompts]
        batch = generate(backend, None, prompts, SamplingParams(max_new_tokens=16), stop_ids=set())
        assert [c.token_ids for c in batch] == singles, type(backend.model).__name__


def test_batch_rows_finish_independently():
    backend = ScriptedBackend([11, 12, 151643, 13, 14])
    out = generate(backend, None, [[1, 2], [3]], SamplingParams(max_new_tokens=5), max_new_tokens=[5, 2],
                   stop_ids={151643})
    assert out[0].token_ids == [11, 12, 151643] and out[0].finish_reason == "stop"
    assert out[1].token_ids == [11, 12] and out[1].finish_reason == "length"
    assert backend.decode_calls == 2, "no decode step after every row has finished"


def test_eos_stops_and_ignore_eos_runs_to_length(tokenizer):
    script = [71, 18503, 151643, 385, 220]
    out = generate(ScriptedBackend(script), tokenizer, [1, 2, 3], SamplingParams(max_new_tokens=10))
    assert out.token_ids == [71, 18503, 151643] and out.finish_reason == "stop"
    assert out.text == "hél"
    forced = generate(ScriptedBackend(script), tokenizer, [1, 2, 3], SamplingParams(max_new_tokens=7, ignore_eos=True))
    assert len(forced.token_ids) == 7 and forced.finish_reason == "length"


def test_instruct_models_stop_on_both_family_end_tokens():
    from qwen2lib import load_tokenizer

    assert stop_token_ids(load_tokenizer("Qwen2-0.5B-Instruct")) == {151643, 151645}
    assert stop_token_ids(load_tokenizer("tiny-random")) >= {151643}


def test_streaming_concatenation_equals_final_decode_across_a_split_character(tokenizer):
    text = "héllo 鱷魚 🙂 done"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), "the test needs a character split over tokens"
    deltas = []
    backend = ScriptedBackend(ids + [151643])
    out = generate(backend, tokenizer, [1, 2], SamplingParams(max_new_tokens=len(ids) + 1),
                   on_text=lambda i, d: deltas.append(d))
    assert "".join(deltas) == out.text == text
    assert not any("\ufffd" in d for d in deltas), deltas
    assert list(stream(ScriptedBackend(ids + [151643]), tokenizer, [1, 2], SamplingParams(max_new_tokens=40))) == deltas

    held = TextStream(tokenizer)  # an output cut inside a character still flushes its bytes
    assert held.push(ids[0]) == "h"
    split = [t for t in ids if "\ufffd" in tokenizer.decode([t])][0]
    assert held.push(split) == "" and held.flush() == tokenizer.decode([split])


def test_chat_prompt_uses_the_chat_template():
    from qwen2lib import load_tokenizer

    tok = load_tokenizer("Qwen2-0.5B-Instruct")
    backend = ScriptedBackend([9707, 151645], max_positions=128)
    out = generate(backend, tok, "hi", SamplingParams(max_new_tokens=8), chat=True)
    assert tok.decode(out.prompt_ids).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert out.token_ids == [9707, 151645] and out.finish_reason == "stop"


def test_too_long_prompt_is_refused_with_the_numbers_or_truncated_left(hf_model):
    backend = TorchBackend(hf_model)  # max_position_embeddings = 256
    prompt = list(range(2, 252))
    with pytest.raises(PromptTooLongError, match=r"250 tokens and max_new_tokens=10: 260 positions.*256"):
        generate(backend, None, prompt, SamplingParams(max_new_tokens=10))
    out = generate(backend, None, prompt, SamplingParams(max_new_tokens=10), truncate="left", stop_ids=set())
    assert out.prompt_ids == prompt[-246:] and len(out.token_ids) == 10


def test_cli_generate_streams_to_the_terminal(capsys, tmp_path):
    from qwen2lib.cli import main

    rc = main(["generate", "--model", "tiny-random", "--workdir", str(tmp_path), "--prompt", "def __init__(self",
               "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.startswith("def __init__(self")
    assert "[generate] 6 tokens" in captured.err or "(stop)" in captured.err


# ---- ONNX backend: the compile stage's graphs -------------------------------------------------------

@pytest.fixture(scope="module", params=["qwen2_fp32", "qwen2_fp32_standard"])
def onnx_backend(request, hf_model, tmp_path_factory):
    """The fp32 graph (onnxruntime contrib ops, and plain ONNX ops) compiled from the same weights."""
    from qwen2lib.compile.stage import compile_model
    from qwen2lib.pipeline import load_backend

    root = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(root / "ckpt")
    compiled = compile_model(request.param, model=str(root / "ckpt"), workdir=root / "run", verbose=False)
    return load_backend(str(root / "ckpt"), "onnx", compiled=compiled)


def test_onnx_graph_greedy_is_token_identical_to_torch_for_32_tokens(hf_model, onnx_backend):
    ids = torch.tensor([PROMPT])
    expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    out = generate(onnx_backend, None, PROMPT, SamplingParams(max_new_tokens=32), stop_ids=set())
    assert out.token_ids == expected and len(set(expected)) >= 8


def test_onnx_graph_left_padded_batch_and_full_logits_match_torch(hf_model, onnx_backend):
    assert onnx_backend.max_positions == 256  # the model's limit, below the graph's rotary table
    prompts = [PROMPT, [9, 8, 7], [100, 200, 300, 44, 55]]
    torch_out = generate(TorchBackend(hf_model), None, prompts, SamplingParams(max_new_tokens=16), stop_ids=set())
    threads = torch.get_num_threads()
    onnx_out = generate(onnx_backend, None, prompts, SamplingParams(max_new_tokens=16), stop_ids=set())
    assert [c.token_ids for c in onnx_out] == [c.token_ids for c in torch_out]
    assert torch.get_num_threads() == threads, "sampling on one thread for onnxruntime must not leak out"
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(onnx_backend.logits(ids), hf_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_a_last_position_graph_generates_what_the_full_logits_graph_does(tmp_path):
    from qwen2lib.pipeline import stage_backend
    from qwen2lib.model.tokenizer import load_tokenizer

    full = stage_backend("fp32 graph", "tiny-random", workdir=tmp_path / "run")
    last = stage_backend("fp32 graph", "tiny-random", workdir=tmp_path / "run", last_position_only=True)
    assert last.runtime.insert_slice and not full.runtime.insert_slice
    tokenizer = load_tokenizer("tiny-random")
    params = SamplingParams(max_new_tokens=8)
    assert (generate(last, tokenizer, "def read(self, path):\n", params).token_ids
            == generate(full, tokenizer, "def read(self, path):\n", params).token_ids)


def test_stage_backends_close_the_oldest_past_max_held_and_reload_it_the_same(tmp_path):
    from qwen2lib.pipeline import StageBackends

    backends = StageBackends("tiny-random", labels=("fp32 torch", "fp32 graph", "int8 torch"), max_held=1,
                             workdir=tmp_path / "run")
    assert backends.all_fit  # tiny: they would all stay, but max_held=1 asks for one besides the reference
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    reference = backends["fp32 torch"]
    graph = backends["fp32 graph"]
    first = graph.logits(ids)
    int8 = backends["int8 torch"]
    assert graph.runtime is None and list(backends.held) == ["fp32 torch", "int8 torch"]  # closed, reference kept
    assert "fp32 graph" in backends and "int8 graph" not in backends and len(backends.held) == 2  # asked, not loaded
    torch.testing.assert_close(backends["fp32 graph"].logits(ids), first)
    assert int8.model is None and list(backends.held) == ["fp32 torch", "fp32 graph"]
    backends.release(everything=True)
    assert reference.model is None and not backends.held
    with pytest.raises(KeyError):
        backends["int8 graph"]
