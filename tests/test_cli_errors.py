"""Exit codes: the user's mistakes exit 2 in one line; a bug exits 1 in one line naming the file that holds its
traceback; argparse's own errors are one line too."""
from __future__ import annotations

import subprocess
import sys

import pytest

from qwen2lib import cli
from qwen2lib.cli import stages as cli_stages
from qwen2lib.errors import BadInputError, MissingInputError


def run(*args):
    return subprocess.run([sys.executable, "-m", "qwen2lib.cli", *args], capture_output=True, text=True, timeout=300)


def test_an_unknown_option_is_one_line_naming_the_subcommand():
    for argv, message in ((["compile", "--bogus"], "qwen2lib compile: error: "),
                          (["compile", "qwen2_fp32", "--bogus"], "qwen2lib compile: error: unrecognized arguments: --bogus"),
                          (["eval", "ceval", "--bogus"], "qwen2lib eval ceval: error: unrecognized arguments: --bogus"),
                          (["generate", "--prompt", "x", "--max-new-tokens", "many"], "qwen2lib generate: error: "
                                                                                      "argument --max-new-tokens")):
        result = run(*argv)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (argv, result.stderr)
        assert len(lines) == 1 and lines[0].startswith(message) and lines[0].endswith("(see --help)"), lines


def test_an_injected_internal_error_exits_1_and_names_its_traceback_under_the_run_folder(tmp_path, monkeypatch,
                                                                                         capsys):
    def broken(*args, **kwargs):
        raise KeyError("no such plan field")

    monkeypatch.setattr(cli_stages, "compile_model", broken)
    workdir = tmp_path / "run"
    workdir.mkdir()
    code = cli.main(["compile", "qwen2_fp32", "--model", "tiny-random", "--workdir", str(workdir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("qwen2lib compile: internal error: KeyError: 'no such plan field' (traceback written to ")
    path = err[0].split("traceback written to ")[1].split(";")[0]
    assert path.startswith(str(workdir / "errors")), path
    text = open(path, encoding="utf-8").read()
    assert "Traceback (most recent call last)" in text and "in broken" in text and "KeyError" in text
    assert "compile qwen2_fp32 --model tiny-random" in text  # the command line that failed


def test_an_internal_error_without_a_run_folder_goes_to_the_cache(tmp_path, monkeypatch, capsys):
    def broken(args):
        raise ValueError("a shape mismatch deep inside")  # a plain ValueError is a bug, not bad input

    monkeypatch.setenv("QWEN2LIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "cmd_models", broken)
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: ValueError: a shape mismatch deep inside" in err[0]
    written = list((tmp_path / "cache" / "errors").iterdir())
    assert len(written) == 1 and str(written[0]) in err[0]


@pytest.mark.parametrize("exc", [BadInputError("--top-p 2: must be in (0, 1]"),
                                 MissingInputError("x/manifest.json does not exist: compile first"),
                                 FileExistsError(17, "File exists", "/some/where")])
def test_the_users_errors_exit_2_without_a_traceback_file(exc, tmp_path, monkeypatch, capsys):
    def refused(args):
        raise exc

    monkeypatch.setenv("QWEN2LIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "cmd_models", refused)
    assert cli.main(["models"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwen2lib models: error: ") and "internal" not in err[0]
    assert not (tmp_path / "cache" / "errors").exists()
