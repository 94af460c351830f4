"""The numbers a deploy engineer asks of a real checkpoint, in one report: what every stage costs in fidelity on
held-out text, in accuracy the OpenCompass way, in wall time and in memory.

    python benchmarks/real_model.py --model ~/.cache/qwen2-real/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    python benchmarks/real_model.py --model Qwen2.5-0.5B-Instruct --mmlu data/mmlu --eval-limit 20 --write-readme
    PYTHONPATH=/path/to/llamacpp-site python benchmarks/real_model.py --model ... --gguf-types q8_0 q4_0

``--model`` is anything the workbook takes: a checkpoint folder, a hub id in the cache, or a GGUF file (converted
once, ``qwen2lib.model.gguf``). Every stage is built (or reused) in the model's run folder exactly as the notebooks
build it, with the model's own defaults (a trained checkpoint calibrates on prose).

Fidelity, for each held-out text (``--texts``: ``code``, the stdlib files; ``prose``, the READMEs of held-out
installed packages), each row against the same fp32 logits of the deploy package:

    int8 / int4 <scheme> g<N>      notebook 03's packages in torch (``--group-sizes``: int4 rows at other group
                                   sizes, e.g. 32 for Q4_0's bits)
    graph <config>                 notebook 04's compiled graphs in onnxruntime
    gguf <type> (dequantized)      our GGUF export's weights read back into transformers: the format's own error
    gguf <type> (llama.cpp)        the same file run by llama.cpp, when llama-cpp-python is importable

with KLD mean and its 95% confidence interval (blocks as the sampling unit), p99, top-1 agreement and the
perplexity ratio. Accuracy (``--ceval`` / ``--cmmlu`` / ``--mmlu``: paths in their published layouts, nothing is
downloaded) is scored in PPL mode on the same questions for fp32 and each graph. The stage table reads each stage's
``metrics.json`` (wall time and peak resident memory of the build that made it).

``--write-readme`` replaces the "On a real checkpoint" section of benchmarks/README.md with the tables; the raw
results go to ``<workdir>/real_model.json`` either way.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_vs_llamacpp import gguf_bits_per_weight, layer_bits_per_weight  # noqa: E402
from qwen2lib.artifacts import default_workdir, read_metrics  # noqa: E402
from machine import cpu_record, describe_cpu  # noqa: E402
from tables import markdown  # noqa: E402
from qwen2lib.compile.runtime import OnnxCausalLM  # noqa: E402
from qwen2lib.compile.stage import ensure_compiled  # noqa: E402
from qwen2lib.deploy import ensure_patched, load_deploy_package  # noqa: E402
from qwen2lib.deploy.schemes import INT4_SCHEMES  # noqa: E402
from qwen2lib.evaluation.fidelity import fidelity_report, heldout_blocks  # noqa: E402
from qwen2lib.evaluation.runner import accuracy_table, evaluate_benchmark  # noqa: E402
from qwen2lib.export.stage import ensure_exported, gguf_file  # noqa: E402
from qwen2lib.model.gguf import load_gguf_model  # noqa: E402
from qwen2lib.model.tokenizer import load_tokenizer  # noqa: E402
from qwen2lib.evaluation.fidelity import logits_fn  # noqa: E402
from qwen2lib.quantize.stage import ensure_quantized, load_quantized  # noqa: E402
from qwen2lib.serve.llamacpp import LlamaCppBackend, available as llamacpp_available  # noqa: E402

README = Path(__file__).resolve().parent / "README.md"
SECTION = "## On a real checkpoint"
COLUMNS = ["bits_per_weight", "kld_mean", "kld_ci95", "kld_p99", "top1_agreement", "ppl_ratio"]


def cached(fn):
    """ids -> logits, each distinct block computed once: every row is compared with the same fp32 logits."""
    memo = {}

    def run(ids: torch.Tensor) -> torch.Tensor:
        key = ids.numpy().tobytes()
        if key not in memo:
            memo[key] = fn(ids)
        return memo[key]

    run.memo = memo
    return run


def recorded(memo: dict):
    """ids -> the logits ``cached`` recorded for them, holding no model (a 1.5B fp32 reference is 6 GB)."""
    return lambda ids: memo[ids.numpy().tobytes()]


def candidates(args, workdir: Path):
    """(label, bits per weight, a loader of its ids -> logits) for every row asked for, loaded one at a time."""
    for scheme in args.schemes:
        for group in args.group_sizes if scheme in INT4_SCHEMES else [None]:
            label = f"int4 {scheme} g{group}" if group else f"int8 {scheme}"

            def load(scheme=scheme, group=group):
                model = load_quantized(ensure_quantized(args.model, args.weights, workdir, scheme=scheme,
                                                        group_size=group))
                return logits_fn(model), layer_bits_per_weight(model)

            yield label, load
    for name in args.graphs:
        def load(name=name):
            folder = ensure_compiled(args.model, args.weights, workdir, config=name)
            return OnnxCausalLM.load(folder, threads=args.threads), float("nan")

        yield f"graph {name}", load
    for gguf_type in args.gguf_types:
        def path(gguf_type=gguf_type):
            return gguf_file(ensure_exported(args.model, args.weights, workdir, format="gguf", variant=gguf_type))

        yield f"gguf {gguf_type} (dequantized)", lambda p=path: (logits_fn(load_gguf_model(p())), gguf_bits_per_weight(p()))
        if llamacpp_available():
            yield f"gguf {gguf_type} (llama.cpp)", lambda p=path: (llama_cpp(p(), args), gguf_bits_per_weight(p()))


def llama_cpp(path: Path, args):
    """ids -> logits of every position, by llama.cpp itself on the GGUF file."""
    return LlamaCppBackend.load(path, context=args.block_len + 8, threads=args.threads, every_position=True).logits


def fidelity_tables(args, workdir: Path, package: Path) -> dict[str, pd.DataFrame]:
    tokenizer = load_tokenizer(str(package))
    blocks = {text: heldout_blocks(tokenizer, args.blocks, args.block_len, seed=args.seed, text=text)
              for text in args.texts}
    reference = load_deploy_package(package, torch.float32)
    references = {text: cached(logits_fn(reference)) for text in args.texts}
    for text, ids in blocks.items():
        fidelity_report(references[text], references[text], ids, batch_size=1)  # fill the cache once
    references = {text: recorded(fn.memo) for text, fn in references.items()}  # the model itself is freed here
    del reference
    gc.collect()
    rows: dict[str, dict] = {text: {} for text in args.texts}
    for label, load in candidates(args, workdir):
        started = time.perf_counter()
        fn, bits = load()
        for text, ids in blocks.items():
            rows[text][label] = dict(fidelity_report(references[text], fn, ids, batch_size=1), bits_per_weight=bits)
        print(f"[real_model] {label}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        del fn
        gc.collect()
    return {text: pd.DataFrame.from_dict(r, orient="index")[COLUMNS] for text, r in rows.items()}


def accuracy(args, workdir: Path, package: Path) -> pd.DataFrame | None:
    sets = {name: path for name, path in (("ceval", args.ceval), ("cmmlu", args.cmmlu), ("mmlu", args.mmlu)) if path}
    if not sets:
        return None
    tokenizer = load_tokenizer(str(package))
    stages = {"fp32 torch": lambda: logits_fn(load_deploy_package(package, torch.float32))}
    for name in args.graphs:
        stages[f"graph {name}"] = lambda name=name: OnnxCausalLM.load(
            ensure_compiled(args.model, args.weights, workdir, config=name), threads=args.threads)
    results = {}
    for label, load in stages.items():
        fn = load()
        results[label] = {name: evaluate_benchmark(fn, tokenizer, name, path, limit=args.eval_limit, mode="ppl",
                                                   results_path=workdir / "real_model_eval" / f"{name}.jsonl",
                                                   run_id=label, progress=False)
                          for name, path in sets.items()}
        del fn
    return accuracy_table(results)


def stage_table(workdir: Path) -> pd.DataFrame:
    """Wall time and peak resident memory of the build of every stage folder under ``workdir``."""
    rows = {}
    for path in sorted(workdir.rglob("metrics.json")):
        record = read_metrics(path.parent).get("stage")
        if record and "wall_s" in record:
            rows[path.parent.relative_to(workdir).as_posix()] = {
                "wall_s": record["wall_s"], "peak_rss_GB": (record.get("peak_rss_bytes") or math.nan) / 1e9}
    return pd.DataFrame.from_dict(rows, orient="index")


def machine() -> str:
    return f"{describe_cpu(cpu_record())}; load {os.getloadavg()[0]:.1f}; {torch.get_num_threads()} threads"


def report(args, fidelity: dict[str, pd.DataFrame], scores: pd.DataFrame | None, stages: pd.DataFrame) -> str:
    fmt = {"bits_per_weight": "{:.2f}", "kld_mean": "{:.3g}", "kld_ci95": "±{:.2g}", "kld_p99": "{:.3g}",
           "top1_agreement": "{:.2%}", "ppl_ratio": "{:.4f}"}
    parts = [SECTION, "",
             f"`python benchmarks/real_model.py --model {Path(args.model).name}` ({time.strftime('%Y-%m-%d')}, "
             f"{machine()}). Each row against the fp32 deploy package on {args.blocks} held-out blocks x "
             f"{args.block_len} tokens; ± is the 95% interval of the KLD mean over blocks."]
    if str(args.model).endswith(".gguf"):
        parts.append("The checkpoint is the GGUF's dequantized values (bf16), not the original release: every row "
                     "measures what quantizing *that* checkpoint costs, and scores sit below the published ones.")
    for text, table in fidelity.items():
        shown = table.copy()
        for column, f in fmt.items():
            shown[column] = shown[column].map(lambda v, f=f: "" if v != v else f.format(v))
        parts += ["", f"Fidelity on held-out {text}:", "", markdown(shown)]
    if scores is not None:
        parts += ["", f"Accuracy (PPL mode, {args.eval_limit or 'all'} questions per subject):", "",
                  markdown(scores.round(2))]
    parts += ["", "Stage builds (wall time and peak resident memory, from each stage's metrics.json):", "",
              markdown(stages.round(2)), ""]
    return "\n".join(parts)


def write_readme(text: str) -> None:
    readme = README.read_text(encoding="utf-8")
    start = readme.find(SECTION)
    if start == -1:
        readme = readme.rstrip("\n") + "\n\n" + text
    else:
        end = readme.find("\n## ", start + len(SECTION))
        readme = readme[:start] + text + (readme[end:] if end != -1 else "")
    README.write_text(readme, encoding="utf-8")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--texts", nargs="+", default=["prose", "code"], choices=["prose", "code"])
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--block-len", type=int, default=128)
    parser.add_argument("--schemes", nargs="*", default=["w8a16", "smoothquant", "w4a16", "awq", "gptq"])
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[128], help="int4 schemes: one row per size")
    parser.add_argument("--graphs", nargs="*", default=["qwen2_fp16", "qwen2_int8", "qwen2_int8_block32", "qwen2_int4"])
    parser.add_argument("--gguf-types", nargs="*", default=["q8_0", "q4_0"])
    parser.add_argument("--ceval", default=None)
    parser.add_argument("--cmmlu", default=None)
    parser.add_argument("--mmlu", default=None)
    parser.add_argument("--eval-limit", type=int, default=None, help="questions per subject (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write-readme", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.model)
    package = ensure_patched(args.model, args.weights, workdir)
    fidelity = fidelity_tables(args, workdir, package)
    scores = accuracy(args, workdir, package)
    stages = stage_table(workdir)
    text = report(args, fidelity, scores, stages)
    print(text)
    raw = {"args": vars(args), "machine": machine(), "fidelity": {t: f.to_dict(orient="index") for t, f in fidelity.items()},
           "accuracy": None if scores is None else scores.to_dict(orient="index"),
           "stages": stages.to_dict(orient="index")}
    (workdir / "real_model.json").write_text(json.dumps(raw, indent=2, default=str) + "\n", encoding="utf-8")
    if args.write_readme:
        write_readme(text)


if __name__ == "__main__":
    main()
