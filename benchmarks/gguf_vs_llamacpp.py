"""The fidelity comparison against llama.cpp on the same model and text: our GGUF export run by llama.cpp itself
(llama-cpp-python) next to our own int8 packages, all against the fp32 deploy package.

    PYTHONPATH=/path/to/llamacpp-site python benchmarks/gguf_vs_llamacpp.py --model tiny
    python benchmarks/gguf_vs_llamacpp.py --model tiny --types q8_0 q4_0 f16 --blocks 8 --block-len 128
    python benchmarks/gguf_vs_llamacpp.py --types q4_0 --schemes w4a16 awq --group-sizes 32 64 128 --blocks 48 --block-len 256

llama-cpp-python is not a dependency of the workbook (building it compiles llama.cpp for minutes):
``pip install --target DIR llama-cpp-python`` once and put DIR on PYTHONPATH for this script.

Rows, each on the same held-out blocks (``qwen2lib.evaluation.fidelity.heldout_blocks``), compared with the fp32 reference by
``fidelity_report`` (KLD, top-1 agreement, PPL ratio):

    int8 <scheme> (qwen2lib)        notebook 03's packages in torch
    int4 <scheme> g<N> (qwen2lib)   its int4 packages (``--group-sizes``: inputs per scale and zero point)
    graph <config> (onnxruntime)    notebook 04's compiled graphs (``--graphs``: shipped configs, e.g. qwen2_int8,
                                    which also quantizes activations to 8 bits at run time, as llama.cpp does)
    gguf <type> (llama.cpp)         the exported file run by llama.cpp (its own kernels: for q8_0/q4_0 it also
                                    quantizes the activations to 8 bits inside each matmul)
    gguf <type> (dequantized)       the same file's weights dequantized into transformers: the format's own error,
                                    so the gap to the llama.cpp row is llama.cpp's arithmetic

Each row's ``bits_per_weight`` is what the decoder layers' matrices take (weights, scales and zero points; biases
and norms aside): Q4_0's 32-weight blocks with an fp16 scale are 4.5 bits, our int4 with groups of N inputs is
4 + 40 / N (an fp32 scale and a uint8 zero point per group), so compare int4 rows at similar bits.

Plus whether llama.cpp's tokenizer gives qwen2lib's ids on the held-out text and a chat prompt, and the time each
takes per block (full-sequence logits, one thread count for all; compare within one run only).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen2lib.artifacts import default_workdir  # noqa: E402
from qwen2lib.compile.stage import ensure_compiled  # noqa: E402
from qwen2lib.export.stage import CHAT_SAMPLE, ensure_exported, gguf_file  # noqa: E402
from qwen2lib.model.gguf import load_gguf_model  # noqa: E402
from qwen2lib.evaluation.fidelity import fidelity_report, heldout_blocks  # noqa: E402
from qwen2lib.compile.runtime import OnnxCausalLM  # noqa: E402
from qwen2lib.deploy import ensure_patched, load_deploy_package  # noqa: E402
from qwen2lib.deploy.quantizer import is_int4_linear, is_int8_linear  # noqa: E402
from qwen2lib.deploy.schemes import INT4_SCHEMES  # noqa: E402
from qwen2lib.evaluation.fidelity import logits_fn  # noqa: E402
from qwen2lib.quantize.stage import ensure_quantized, load_quantized  # noqa: E402
from qwen2lib.model.tokenizer import load_tokenizer  # noqa: E402
from qwen2lib.serve import llamacpp  # noqa: E402


def timed(fn):
    """ids -> logits, adding each call's seconds to ``.seconds``."""

    def run(ids):
        start = time.perf_counter()
        out = fn(ids)
        run.seconds += time.perf_counter() - start
        return out

    run.seconds = 0.0
    return run


def layer_bits_per_weight(model) -> float:
    """Bits per weight of the decoder layers' matrices: weights, scales and zero points over in x out."""
    bits = weights = 0
    for name, module in model.named_modules():
        if name.startswith("model.layers.") and (isinstance(module, torch.nn.Linear) or is_int8_linear(module)
                                                 or is_int4_linear(module)):
            tensors = [t for n, t in list(module.named_parameters()) + list(module.named_buffers()) if n != "bias"]
            bits += 8 * sum(t.numel() * t.element_size() for t in tensors)
            weights += module.in_features * module.out_features
    return bits / weights


def gguf_bits_per_weight(path: Path) -> float:
    """The same for a GGUF file: its blk.* matrices' bytes over their elements."""
    reader = gguf.GGUFReader(str(path))
    matrices = [t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in matrices) / sum(int(t.n_elements) for t in matrices)


def tokenizer_check(llm, tokenizer, texts: list[str]) -> str:
    same = sum(llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
               == tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    return f"{same}/{len(texts)} texts tokenized identically by llama.cpp and qwen2lib"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--types", nargs="+", default=["q8_0", "q4_0"])
    parser.add_argument("--schemes", nargs="+", default=["w8a16", "smoothquant"])
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[128], help="int4 schemes: one row per size")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--block-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--graphs", nargs="*", default=[], help="shipped configs whose compiled graphs get a row each "
                        "(qwen2_int8 qwen2_int4); bits per weight as the package each is compiled from")
    args = parser.parse_args()
    if not llamacpp.available():
        raise SystemExit("llama-cpp-python is not importable: pip install --target DIR llama-cpp-python, then run "
                         "with PYTHONPATH=DIR (see the module doc)")
    import pandas as pd

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.model)
    package = ensure_patched(args.model, args.weights, workdir)
    tokenizer = load_tokenizer(str(package))
    blocks = heldout_blocks(tokenizer, args.blocks, args.block_len)
    reference = logits_fn(load_deploy_package(package, torch.float32))
    rows, notes = {}, []

    def add(label, fn, bits):
        fn = timed(fn)
        rows[label] = dict(fidelity_report(reference, fn, blocks, batch_size=1), bits_per_weight=bits,
                           ms_per_block=1e3 * fn.seconds / len(blocks))

    for scheme in args.schemes:
        for group_size in args.group_sizes if scheme in INT4_SCHEMES else [None]:
            model = load_quantized(ensure_quantized(args.model, args.weights, workdir, scheme=scheme,
                                                    group_size=group_size))
            label = f"int4 {scheme} g{group_size}" if group_size else f"int8 {scheme}"
            add(f"{label} (qwen2lib)", logits_fn(model), layer_bits_per_weight(model))
            del model
    for name in args.graphs:
        folder = ensure_compiled(args.model, args.weights, workdir, config=name)
        add(f"graph {name} (onnxruntime)", OnnxCausalLM.load(folder, threads=args.threads), float("nan"))
    texts = [tokenizer.decode(b.tolist()) for b in blocks]
    texts.append(tokenizer.apply_chat_template(CHAT_SAMPLE, tokenize=False, add_generation_prompt=True))
    for gguf_type in args.types:
        path = gguf_file(ensure_exported(args.model, args.weights, workdir, format="gguf", variant=gguf_type))
        backend = llamacpp.LlamaCppBackend.load(path, context=args.block_len + 8, threads=args.threads,
                                                every_position=True)
        notes.append(f"{gguf_type}: {tokenizer_check(backend.llm, tokenizer, texts)}")
        bits = gguf_bits_per_weight(path)
        add(f"gguf {gguf_type} (llama.cpp)", backend.logits, bits)
        add(f"gguf {gguf_type} (dequantized)", logits_fn(load_gguf_model(path)), bits)
        backend.close()
    columns = ["bits_per_weight", "kld_mean", "kld_p99", "top1_agreement", "ppl_ratio", "max_abs_dlogits",
               "ms_per_block"]
    table = pd.DataFrame.from_dict(rows, orient="index")[columns]
    print(f"{args.model}: {args.blocks} held-out blocks x {args.block_len} tokens vs the fp32 deploy package, "
          f"{args.threads} threads")
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(table.to_string())
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
