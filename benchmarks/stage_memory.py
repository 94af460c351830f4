"""Each stage's wall time and peak resident memory at real shapes, against what ``qwen2lib.model.footprint`` predicts.

    python benchmarks/stage_memory.py                                   # tiny, Qwen2-0.5B, Qwen2.5-1.5B
    python benchmarks/stage_memory.py --models Qwen2.5-3B Qwen2.5-7B    # bigger (needs the memory they need)
    python benchmarks/stage_memory.py --tree /path/to/other/checkout    # the same stages run by another checkout

Every stage runs in its own process (``python -m qwen2lib.cli <stage> --weights random``), so its peak is its own:
the figures are the stage record of its ``metrics.json`` (``wall_s``, ``peak_rss_bytes``), or for the random
checkpoint (no stage folder) the process's own wall time and ``ru_maxrss`` (``os.wait4``). Each model gets a fresh
cache and run folder under ``--root`` (deleted at the end unless ``--keep``), so the random checkpoint is built
by the stage under test. The table then shows the prediction of ``qwen2lib.model.footprint`` for the same config, and
the predictions for the sizes not run (14B, 32B, 72B by default).

Time has no formula in the library: the benchmark fits seconds per billion parameters per stage on the models it
ran (least squares through the origin) and prints that slope with the predictions it gives.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))

from qwen2lib.model.footprint import parameter_counts, stage_estimates  # noqa: E402
from qwen2lib.paths import cache_root  # noqa: E402
from qwen2lib.model.registry import resolve  # noqa: E402

GiB = 1 << 30
# stage -> the qwen2lib command that builds it, and the stage folder holding its metrics.json
COMMANDS = {
    "checkpoint": (["checkpoint"], None),
    "patched": (["patch", "--no-proof"], "patched"),
    "calibration": (["calibrate"], "calibration"),
    "quantized": (["quantize", "--scheme", "w8a16"], "quantized/w8a16"),
    "compiled fp32": (["compile", "qwen2_fp32"], "compiled/qwen2_fp32"),
    "compiled int8": (["compile", "qwen2_int8"], "compiled/qwen2_int8"),
}


def run_stage(tree: Path, python: str, stage: str, model: str, workdir: Path, env: dict, log: Path) -> dict:
    """Run one stage in a child process; its wall time and peak RSS (from metrics.json when the stage has one)."""
    args, folder = COMMANDS[stage]
    cmd = [python, "-m", "qwen2lib.cli", *args, "--model", model, "--weights", "random", "--workdir", str(workdir)]
    started = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        child = subprocess.Popen(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    row = {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "rc": code, "from": "process"}
    if code == 0 and folder is not None:
        record = json.loads((workdir / folder / "metrics.json").read_text(encoding="utf-8"))["stage"]
        row.update(wall_s=record["wall_s"], peak_rss_bytes=record["peak_rss_bytes"], **{"from": "metrics.json"})
    return row


def measure(model: str, stages: list[str], tree: Path, python: str, root: Path, keep: bool) -> dict[str, dict]:
    base = root / model
    cache, workdir = base / "cache", base / "run"
    cache.mkdir(parents=True, exist_ok=True)
    for shared in ("tokenizers", "models"):  # the family tokenizers and the embedded models are built once, elsewhere
        if (cache_root() / shared).is_dir() and not (cache / shared).exists():
            (cache / shared).symlink_to(cache_root() / shared)
    # one thread per core, fixed (as torch's default was before the workbook picked the free cores): comparable runs
    env = dict(os.environ, QWEN2LIB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(tree),
               QWEN2LIB_THREADS=os.environ.get("QWEN2LIB_THREADS") or str(len(os.sched_getaffinity(0))))
    rows = {}
    for stage in stages:
        rows[stage] = run_stage(tree, python, stage, model, workdir, env, base / "log.txt")
        r = rows[stage]
        print(f"  {model:14s} {stage:14s} rc {r['rc']}  {r['wall_s']:8.1f} s  {r['peak_rss_bytes'] / GiB:6.2f} GiB",
              flush=True)
        if r["rc"] != 0:
            print(f"  {stage} failed: see {base / 'log.txt'}", flush=True)
            break
    if not keep:
        shutil.rmtree(base, ignore_errors=True)
    return rows


def fit_seconds_per_gparam(measured: dict[str, dict[str, dict]]) -> dict[str, float]:
    """Per stage: the slope s of wall_s = s * (parameters / 1e9), least squares through the origin."""
    slopes = {}
    for stage in COMMANDS:
        pairs = [(parameter_counts(resolve(m).config)["total"] / 1e9, rows[stage]["wall_s"])
                 for m, rows in measured.items() if stage in rows and rows[stage]["rc"] == 0 and m != "tiny"]
        if pairs:
            slopes[stage] = sum(p * t for p, t in pairs) / sum(p * p for p, _ in pairs)
    return slopes


def print_table(measured: dict[str, dict[str, dict]], predict: list[str], slopes: dict[str, float]) -> None:
    print("\n| model | params | stage | wall s | peak RSS GiB | predicted GiB | predicted s |")
    print("|---|---|---|---|---|---|---|")
    for model in list(measured) + predict:
        config = resolve(model).config
        params = parameter_counts(config)["total"]
        estimates = stage_estimates(config)
        for stage in COMMANDS:
            row = measured.get(model, {}).get(stage)
            est = estimates[stage]
            wall = f"{row['wall_s']:.1f}" if row and row["rc"] == 0 else "-"
            peak = f"{row['peak_rss_bytes'] / GiB:.2f}" if row and row["rc"] == 0 else "-"
            seconds = f"{slopes[stage] * params / 1e9:.0f}" if stage in slopes else "-"
            print(f"| {model} | {params / 1e9:.2f} B | {stage} | {wall} | {peak} | {est.resident_bytes / GiB:.2f} | "
                  f"{seconds} |")
    print("\nseconds per billion parameters (fitted on the models run, this machine):",
          ", ".join(f"{s} {v:.0f}" for s, v in slopes.items()) or "-")
    print("memory formulas (qwen2lib.model.footprint):")
    for name, est in stage_estimates(resolve(predict[0] if predict else "tiny").config).items():
        print(f"  {name:13s} {est.formula}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "Qwen2-0.5B", "Qwen2.5-1.5B"])
    p.add_argument("--predict", nargs="*", default=["Qwen2.5-14B", "Qwen2.5-32B", "Qwen2.5-72B"])
    p.add_argument("--stages", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    p.add_argument("--tree", type=Path, default=CHECKOUT, help="the checkout whose qwen2lib runs the stages")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--root", type=Path, default=CHECKOUT / "runs" / "stage_memory")
    p.add_argument("--keep", action="store_true", help="keep each model's cache and run folder")
    p.add_argument("--json", type=Path, help="also write the measured rows here")
    args = p.parse_args()
    measured = {}
    for model in args.models:
        # tiny has no random weights at its shape; tiny-random is the embedded model's random twin
        stages = [s for s in args.stages if not (model.startswith("tiny") and s == "checkpoint")]
        measured[model] = measure(model, stages, args.tree.resolve(), args.python, args.root, args.keep)
    if args.json:
        args.json.write_text(json.dumps(measured, indent=2) + "\n", encoding="utf-8")
    print_table(measured, args.predict, fit_seconds_per_gparam(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
