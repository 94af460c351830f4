import subprocess
import sys

from qwen2lib.model.tiny import TINY_RECIPE


def run(*args):
    return subprocess.run([sys.executable, "-m", "qwen2lib.cli", *args], capture_output=True, text=True, timeout=300)


def test_models_lists_the_registry():
    result = run("models")
    assert result.returncode == 0, result.stderr
    assert "Qwen/Qwen2.5-72B-Instruct" in result.stdout and "tiny-random" in result.stdout


def test_bad_input_exits_2_with_one_line():
    result = run("checkpoint", "--model", "Qwen3-0.6B")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen2lib checkpoint: error: unknown model 'Qwen3-0.6B'")


def test_checkpoint_prints_a_folder():
    result = run("checkpoint", "--model", "tiny-random")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"tiny-random-{TINY_RECIPE}")
