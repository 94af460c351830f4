"""Hand-off: the model in the formats other engines load, each checked by reading the export back.

    <workdir>/exported/gguf-<type>/model-<type>.gguf      llama.cpp, llama-cpp-python, ollama (notebook 01's
                                                          float deploy package, quantized by gguf: f32 | f16 | q8_0 | q4_0)
    <workdir>/exported/compressed-tensors-<scheme>/       vLLM, SGLang (notebook 03's int8 package, w8a16 |
                                                          smoothquant, its int8 values unchanged)

Each is a stage (``qwen2lib.stages.reuse``): written into a temp folder that replaces the old one in one rename, its
``metrics.json`` records the source package's identity, and it is reused while nothing it depends on changed.

Verification, before the folder is published (``verify_blocks`` held-out blocks; 0 skips it):

    gguf                the file is read back with gguf's reader; its metadata must describe the package's model
                        (the config llama.cpp reads from it alone); the model is run with the file's dequantized
                        tensors and its logits compared with the fp32 deploy package's (KLD, top-1, PPL ratio, and
                        each decoder layer's SQNR), both streamed a layer at a time, so any size verifies in the
                        memory of one layer; the tokenizer is rebuilt from the file's tokens and merges and must
                        give the package tokenizer's ids on the held-out text and a chat prompt
    compressed-tensors  transformers loads the folder through the compressed-tensors package (the code path
                        vLLM's format shares) and its logits are compared with the int8 package's and the fp32
                        reference's

llama.cpp itself (llama-cpp-python) is compared in ``benchmarks/gguf_vs_llamacpp.py``: building it is not
something a test or a stage should need.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..artifacts import default_workdir, stage_dir
from .compressed_tensors import FLOAT_DTYPES, write_compressed_tensors
from ..model.gguf import GGUFTensors, as_reader, gguf_tokenizer
from .gguf import GGUF_TYPES, ExportError, write_gguf
from ..evaluation.fidelity import fidelity_report, heldout_blocks as make_heldout_blocks, logits_fn
from ..deploy import ensure_patched, load_deploy_package
from ..deploy.layerwise import LayerwiseModel
from ..quantize.stage import INT8_SCHEMES, default_settings, ensure_quantized, load_quantized, streamed_fidelity
from ..stages.reuse import ensure_stage
from ..model.tokenizer import load_tokenizer

FORMATS = ("gguf", "compressed-tensors")
DEFAULTS = {"gguf": "q8_0", "compressed-tensors": "w8a16"}
CHAT_SAMPLE = [{"role": "user", "content": "Write a haiku about int8 weights, 然后用中文解释。"}]


def check_export_request(fmt: str, variant: str | None = None, dtype: str = "bfloat16", verify_blocks: int = 2,
                         verify_len: int = 64) -> str:
    """Refuse a bad request in one line before anything loads; returns the variant (type or scheme) to use."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    variant = variant or DEFAULTS[fmt]
    allowed = GGUF_TYPES if fmt == "gguf" else INT8_SCHEMES
    if variant not in allowed:
        what = "--type (GGUF quantization)" if fmt == "gguf" else "--scheme (the int8 package to export)"
        raise ExportError(f"{what} {variant!r}: for --format {fmt} use one of {', '.join(allowed)}")
    if dtype not in FLOAT_DTYPES:
        raise ExportError(f"--float-dtype {dtype!r}: one of {', '.join(FLOAT_DTYPES)}")
    if verify_blocks < 0 or (verify_blocks and verify_len < 2):
        raise ExportError(f"--verify-blocks {verify_blocks} / --verify-len {verify_len}: blocks >= 0 (0 skips the "
                          "check) and at least 2 tokens per block")
    return variant


def export_dir(workdir: str | os.PathLike, fmt: str, variant: str) -> Path:
    return stage_dir(workdir, "exported", f"{fmt}-{variant}")


def gguf_file(folder: str | os.PathLike) -> Path:
    """The .gguf file of an exported/gguf-<type>/ folder."""
    found = sorted(Path(folder).glob("*.gguf"))
    if not found:
        raise ExportError(f"{folder} holds no .gguf file: run `qwen2lib export --format gguf` first")
    return found[0]


# ---- verification --------------------------------------------------------------------------------


def tokenizer_agreement(reference, candidate, texts: list[str]) -> dict:
    """How many of ``texts`` the two tokenizers (transformers, tokenizers) split into the same ids."""
    same = [reference(t, add_special_tokens=False)["input_ids"] == candidate.encode(t, add_special_tokens=False).ids
            for t in texts]
    return {"samples": len(texts), "identical": sum(same), "all_identical": all(same)}


def verification_texts(tokenizer, blocks: torch.Tensor) -> list[str]:
    texts = [tokenizer.decode(b.tolist()) for b in blocks]
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template(CHAT_SAMPLE, tokenize=False, add_generation_prompt=True))
    return texts


def verify_gguf(package: Path, path: Path, blocks: torch.Tensor, tokenizer) -> dict:
    """The GGUF's logits against the fp32 package's on held-out blocks, both streamed a decoder layer at a time
    (the file's tensors dequantized as their layer is reached: any size fits), after its metadata is checked to
    describe the package's model; and its tokenizer, rebuilt from the file alone, against the package's."""
    reader = as_reader(path)  # parsed once for both checks
    reference = LayerwiseModel(package)
    candidate = LayerwiseModel(package, weights=GGUFTensors(reader, reference.config))
    report, layers = streamed_fidelity(reference, candidate, blocks)
    agreement = tokenizer_agreement(tokenizer, gguf_tokenizer(reader), verification_texts(tokenizer, blocks))
    if not agreement["all_identical"]:
        differ = agreement["samples"] - agreement["identical"]
        raise ExportError(f"{path.name}: the tokenizer rebuilt from the GGUF splits {differ} of "
                          f"{agreement['samples']} texts differently from the package's")
    return {"fidelity": {"gguf vs fp32": report}, "layer_sqnr_db": layers, "tokenizer": agreement}


def load_compressed_tensors(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The export loaded as vLLM's format is read on CPU: transformers with the compressed-tensors package."""
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True).eval()


def verify_compressed_tensors(package: Path, int8_package: Path, folder: Path, blocks: torch.Tensor) -> dict:
    candidate = logits_fn(load_compressed_tensors(folder))
    int8 = load_quantized(int8_package)
    reference = load_deploy_package(package, torch.float32)
    return {"fidelity": {"export vs int8 package": fidelity_report(logits_fn(int8), candidate, blocks, batch_size=1),
                         "export vs fp32": fidelity_report(logits_fn(reference), candidate, blocks, batch_size=1),
                         "int8 package vs fp32": fidelity_report(logits_fn(reference), logits_fn(int8), blocks,
                                                                 batch_size=1)}}


def serve_hints(fmt: str, folder: Path) -> dict:
    if fmt == "gguf":
        file = gguf_file(folder).name if any(folder.glob("*.gguf")) else "model.gguf"
        return {"llama.cpp": f"llama-cli -m {file} -cnv", "llama-cpp-python": f"Llama(model_path='{file}')",
                "ollama": f"Modelfile 'FROM ./{file}', then ollama create NAME -f Modelfile"}
    return {"vllm": "vllm serve DIR --tensor-parallel-size 4", "sglang": "python -m sglang.launch_server "
            "--model-path DIR --tp 4"}


# ---- the stage ----------------------------------------------------------------------------------


def ensure_exported(model: str = "tiny", weights: str = "auto", workdir: str | os.PathLike | None = None, *,
                    format: str = "gguf", variant: str | None = None, float_dtype: str = "bfloat16",
                    verify_blocks: int = 2, verify_len: int = 64, seed: int = 0, force: bool = False,
                    verbose: bool = True) -> Path:
    """``<workdir>/exported/<format>-<variant>/``: the deploy package as a GGUF (variant: f32 | f16 | q8_0 | q4_0)
    or the int8 package in the compressed-tensors layout (variant: w8a16 | smoothquant), verified (module doc)."""
    fmt = format
    variant = check_export_request(fmt, variant, float_dtype, verify_blocks, verify_len)
    workdir = Path(workdir) if workdir else default_workdir(model)
    out = export_dir(workdir, fmt, variant)
    package = ensure_patched(model, weights, workdir, seed=seed, verbose=verbose)
    request = {"format": fmt, "variant": variant, "verify_blocks": verify_blocks, "verify_len": verify_len,
               "seed": seed, "float_dtype": float_dtype if fmt == "compressed-tensors" else None}
    if fmt == "gguf":
        inputs = {"patched": package}
    else:
        inputs = {"quantized": ensure_quantized(model, weights, workdir, scheme=variant, seed=seed, verbose=verbose)}

    def build(tmp: Path) -> dict:
        started = time.perf_counter()
        if fmt == "gguf":
            summary = write_gguf(package, tmp / f"model-{variant}.gguf", variant, name=Path(str(model)).name)
        else:
            summary = write_compressed_tensors(inputs["quantized"], tmp, float_dtype)
        metrics = {"request": request, "format": fmt, "variant": variant, "export": summary,
                   "export_s": time.perf_counter() - started, "serve": serve_hints(fmt, tmp),
                   "source": {name: str(path) for name, path in inputs.items()}}
        if verify_blocks:
            tokenizer = load_tokenizer(str(package))
            blocks = make_heldout_blocks(tokenizer, verify_blocks, verify_len, seed=seed,
                                         text=default_settings(model, weights)["heldout_text"])
            if fmt == "gguf":
                metrics.update(verify_gguf(package, tmp / summary["file"], blocks, tokenizer))
            else:
                metrics.update(verify_compressed_tensors(package, inputs["quantized"], tmp, blocks))
        return metrics

    return ensure_stage("exported", out, request, inputs, build, force=force, verbose=verbose)
