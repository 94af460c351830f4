"""llama.cpp as a peer in the benchmarks: finding its tools, running ``llama-batched-bench``, reading a GGUF's bytes,
and recording which build a row came from.

Its build options change its speed by up to 1.7x on one CPU, so every llama.cpp row names its build
(``build_record``: the commit from the tool's ``--version``, the CMake options from the build's CMakeCache.txt, and
llama.cpp's own ``system_info`` line when the tool prints one). ``CONFIGURATIONS`` are the builds worth comparing
against, each with how to make it from the llama-cpp-python source package; compare a row with the fastest one that
runs it on the host.

The tools are not a dependency of the workbook. They are looked for, in order, in the folder given on the command
line (``--llama-cpp DIR``: a build folder, its ``bin/``, or a llama.cpp checkout with ``build/bin``), in
``$LLAMA_CPP_DIR`` (the same), then on ``PATH``. Missing ones are reported with how to build them
(``BUILD_HINT``); the GGUFs come from ``qwen2lib export --format gguf`` (the same checkpoint as every other row).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

BUILD_HINT = ("build it from llama.cpp's sources (e.g. the tree vendored in the llama-cpp-python source package, "
              "`pip download llama-cpp-python --no-binary :all:`): `cmake -B build -DCMAKE_BUILD_TYPE=Release && "
              "cmake --build build --target {tool} -j` in vendor/llama.cpp, then pass --llama-cpp vendor/llama.cpp/build")


SOURCE_HINT = ("`pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps` and unpack it: its "
               "vendor/llama.cpp is the source tree")
# name -> (CMake options, what the build is). Build each in its own folder: cmake -S vendor/llama.cpp -B build-<name>
# <options> -DCMAKE_BUILD_TYPE=Release && cmake --build build-<name> --target llama-batched-bench llama-bench -j
CONFIGURATIONS = {
    "native": (["-DGGML_NATIVE=ON"],
               "-march=native: on a CPU with AMX its AMX buffer type and repacked VNNI kernels decode fastest, but "
               "on some virtual machines its batched paths (prefill, batch > 1) die with SIGILL in the AMX tile "
               "kernel"),
    "native-no-amx": (["-DGGML_NATIVE=ON", "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
                       "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"],
                      "-march=native with the compiler's AMX instructions off: the native build's other kernels "
                      "without the AMX tile path"),
    "avx512": (["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AMX_TILE=OFF",
                "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"],
               "portable AVX-512 (VNNI, BF16) without AMX: runs every path everywhere AVX-512 exists, slower decode"),
}
CACHE_KEYS = re.compile(r"^(GGML_[A-Z0-9_]+|CMAKE_BUILD_TYPE|CMAKE_C_FLAGS|CMAKE_CXX_FLAGS):[A-Z]+=(.*)$")


def build_command(name: str, source: str = "vendor/llama.cpp") -> str:
    """The shell commands that make configuration ``name`` of ``CONFIGURATIONS`` from ``source``."""
    options, _ = CONFIGURATIONS[name]
    quoted = " ".join(f"'{o}'" if " " in o else o for o in options)
    return (f"cmake -S {source} -B {source}/build-{name} {quoted} -DCMAKE_BUILD_TYPE=Release && "
            f"cmake --build {source}/build-{name} --target llama-batched-bench llama-bench -j")


def cmake_options(cache_text: str) -> dict[str, str]:
    """The GGML_* options, build type and compiler flags a CMakeCache.txt recorded (empty values left out)."""
    found = {}
    for line in cache_text.splitlines():
        m = CACHE_KEYS.match(line.strip())
        if m and m.group(2):
            found[m.group(1)] = m.group(2)
    return found


def system_info(output: str) -> str | None:
    """llama.cpp's ``system_info: ... | CPU : SSE3 = 1 | ... |`` line from a tool's output, if it printed one."""
    return next((line.strip() for line in output.splitlines() if line.strip().startswith("system_info:")), None)


def build_record(tool: Path) -> dict:
    """Which llama.cpp ``tool`` is: {"tool", "version" (its ``--version`` lines: commit and compiler),
    "cmake" (``cmake_options`` of the build folder's CMakeCache.txt, when found)}."""
    record = {"tool": str(tool), "version": None, "cmake": {}}
    try:
        done = subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=60)
        lines = [ln.strip() for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
        record["version"] = "; ".join(ln for ln in lines if ln.startswith(("version", "built with"))) or None
    except (OSError, subprocess.SubprocessError) as e:
        record["version"] = f"not known ({e})"
    for folder in (tool.parent, tool.parent.parent):
        if (folder / "CMakeCache.txt").is_file():
            record["cmake"] = cmake_options((folder / "CMakeCache.txt").read_text(errors="replace"))
            break
    return record


def describe_build(record: dict) -> str:
    """One line naming a build: version and the options that decide the CPU kernels."""
    keys = ("GGML_NATIVE", "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AMX_TILE", "GGML_AMX_INT8", "CMAKE_C_FLAGS")
    options = " ".join(f"{k}={record['cmake'][k]}" for k in keys if k in record["cmake"]) or "CMake options unknown"
    return f"{record['version'] or 'version unknown'}; {options}"


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
    rows, info = {}, system_info(done.stdout + "\n" + done.stderr)
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            rows[int(row["pl"])] = {**row, "system_info": info}
    if done.returncode != 0 or not rows:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{tail}")
    return rows
