"""What a speed row records about where it came from (benchmarks/machine.py, benchmarks/llamacpp.py) and how
decode_prefill.py compares with several llama.cpp builds: nothing is timed here."""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
machine = pytest.importorskip("machine")
llamacpp = pytest.importorskip("llamacpp")

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_cpu_record_names_the_model_and_the_instruction_sets_present_and_absent():
    record = machine.cpu_record(CPUINFO)
    assert record["model"].startswith("Intel(R) Xeon(R) Platinum 8481C")
    assert record["flags"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]
    assert record["missing"] == []
    amd = machine.cpu_record("model name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n")
    assert amd["flags"] == ["avx2"] and "amx_int8" in amd["missing"]
    assert "no avx512f" in machine.describe_cpu(amd)


def test_others_cores_is_busy_time_not_ours_over_wall_time():
    # 2 s of wall time, 300 jiffies (at 100 Hz: 3 s) busy in all, 1 s of it ours: others took 1 core on average
    assert machine.others_cores(1000, 1300, 5.0, 6.0, 2.0, 100) == pytest.approx(1.0)
    assert machine.others_cores(1000, 1050, 5.0, 6.0, 2.0, 100) == 0.0  # never negative (sampling granularity)
    assert machine.busy_jiffies("cpu  10 1 5 1000 7 2 3 4 0 0\ncpu0 ...") == 10 + 1 + 5 + 2 + 3 + 4


def test_a_process_taking_a_core_makes_the_run_unreliable():
    watch = machine.LoadWatch().start()
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(2.0)  # the "benchmark" sleeps: all busy time is the other process's
        watch.stop()
    finally:
        busy.kill()
        busy.wait()
    assert watch.others >= 0.5, watch.why
    assert not watch.reliable and machine.verdict(True, watch) == "UNRELIABLE"
    assert machine.verdict(True, None) == "PASS" and machine.verdict(False, None) == "FAIL"


def test_cmake_cache_and_system_info_are_read_from_what_llamacpp_writes():
    cache = "\n".join(["GGML_NATIVE:BOOL=OFF", "GGML_AVX512:BOOL=ON", "GGML_AMX_INT8:BOOL=OFF",
                       "CMAKE_BUILD_TYPE:STRING=Release", "CMAKE_C_FLAGS:STRING=", "LLAMA_CURL:BOOL=OFF",
                       "//GGML_NATIVE comment line"])
    options = llamacpp.cmake_options(cache)
    assert options == {"GGML_NATIVE": "OFF", "GGML_AVX512": "ON", "GGML_AMX_INT8": "OFF", "CMAKE_BUILD_TYPE": "Release"}
    record = {"version": "version: 1 (abc123); built with cc 12 for x86_64", "cmake": options}
    assert llamacpp.describe_build(record) == ("version: 1 (abc123); built with cc 12 for x86_64; GGML_NATIVE=OFF "
                                               "GGML_AVX512=ON GGML_AMX_INT8=OFF")
    out = "load...\nsystem_info: n_threads = 2 | CPU : AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |\nmain: done"
    assert llamacpp.system_info(out).endswith("REPACK = 1 |") and llamacpp.system_info("nothing") is None


@pytest.mark.parametrize("name", sorted(llamacpp.CONFIGURATIONS))
def test_each_configuration_says_how_to_build_it(name):
    command = llamacpp.build_command(name)
    options, what = llamacpp.CONFIGURATIONS[name]
    assert all(o in command for o in options if " " not in o) and f"build-{name}" in command and what


def test_each_figure_is_compared_with_the_fastest_build_that_ran_it():
    bench = pytest.importorskip("decode_prefill")
    args = argparse.Namespace(llama_cpp=["native=/nonexistent/a", "avx512=/nonexistent/b"], gguf_types=["q8_0"])
    assert list(bench.llama_builds(args)) == ["native", "avx512"]
    table = pd.DataFrame.from_dict({
        "graph int8": {"prefill tok/s": 400.0, "decode b1 tok/s": 40.0, "decode b8 tok/s": 200.0},
        "llama.cpp Q8_0 [native]": {"prefill tok/s": math.nan, "decode b1 tok/s": 44.0, "decode b8 tok/s": math.nan},
        "llama.cpp Q8_0 [avx512]": {"prefill tok/s": 150.0, "decode b1 tok/s": 26.0, "decode b8 tok/s": 100.0},
    }, orient="index")
    lines = bench.add_best_peers(table, args)
    assert table.loc["llama.cpp Q8_0"].to_dict() == {"prefill tok/s": 150.0, "decode b1 tok/s": 44.0,
                                                     "decode b8 tok/s": 100.0}
    assert "decode b1 <- llama.cpp Q8_0 [native]" in lines[0] and "prefill <- llama.cpp Q8_0 [avx512]" in lines[0]
    targets = bench.check_targets(table)
    assert "graph int8 decode b1 = 0.91x llama.cpp Q8_0 (target >= 1.1x): FAIL" in targets
    assert bench.best_of(math.nan, 3.0) == 3.0 and bench.best_of(2.0, math.nan) == 2.0
