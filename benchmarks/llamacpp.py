"""llama.cpp as a peer in the benchmarks: finding its tools, running ``llama-batched-bench``, reading a GGUF's bytes.

The tools are not a dependency of the workbook. They are looked for, in order, in the folder given on the command
line (``--llama-cpp DIR``: a build folder, its ``bin/``, or a llama.cpp checkout with ``build/bin``), in
``$LLAMA_CPP_DIR`` (the same), then on ``PATH``. Missing ones are reported with how to build them
(``BUILD_HINT``); the GGUFs come from ``qwen2lib export --format gguf`` (the same checkpoint as every other row).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

BUILD_HINT = ("build it from llama.cpp's sources (e.g. the tree vendored in the llama-cpp-python source package, "
              "`pip download llama-cpp-python --no-binary :all:`): `cmake -B build -DCMAKE_BUILD_TYPE=Release && "
              "cmake --build build --target {tool} -j` in vendor/llama.cpp, then pass --llama-cpp vendor/llama.cpp/build")


def find_tool(name: str, where: str | os.PathLike | None = None) -> Path | None:
    """The llama.cpp binary ``name`` (e.g. ``llama-batched-bench``), or None when it is not built."""
    for base in (where, os.environ.get("LLAMA_CPP_DIR")):
        if not base:
            continue
        base = Path(base)
        for folder in (base, base / "bin", base / "build" / "bin"):
            if (folder / name).is_file() and os.access(folder / name, os.X_OK):
                return folder / name
    found = shutil.which(name)
    return Path(found) if found else None


def gguf_matmul_bytes(path: str | os.PathLike) -> int:
    """Bytes of the tensors one decode step reads in full: every tensor but a token table that only gathers
    rows (``token_embd`` when an ``output`` matrix exists; with tied embeddings the head reads it whole)."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    has_output = any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if not (has_output and t.name == "token_embd.weight"))


def batched_bench(tool: Path, gguf: str | os.PathLike, threads: int, prompt: int, decode: int,
                  batches: list[int], timeout_s: float = 1800) -> dict[int, dict]:
    """One ``llama-batched-bench`` run: each batch size's row of ``batches`` prompts of ``prompt`` tokens, then
    ``decode`` steps of one token per row (random ids; llama.cpp's own warm-up first). Returns
    {batch: {"speed_pp": prompt tok/s, "speed_tg": decode tok/s, ...}} as the tool prints them (jsonl)."""
    context = max(b * (prompt + decode) for b in batches)
    command = [str(tool), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(context),
               "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(decode),
               "-npl", ",".join(map(str, batches)), "--output-format", "jsonl"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    rows = {}
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            rows[int(row["pl"])] = row
    if done.returncode != 0 or not rows:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{tail}")
    return rows
