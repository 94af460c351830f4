"""Bad input never costs data and never runs foreign code: the red-team cases, each a test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2lib import cli
from qwen2lib.artifacts import MARKER, ForeignFolderError, atomic_dir, check_component, sweep_leftovers
from qwen2lib.compile.config_schema import ConfigError, load_config
from qwen2lib.errors import WeightsError, WeightsUnavailableError
from qwen2lib.model.loading import check_weights_match_config, load_model
from qwen2lib.deploy import PackageCodeError, build_deploy_package, load_deploy_package
from qwen2lib.deploy.package import patched_sources
from qwen2lib.quantize import stage as q


# ---- no stage replaces a folder it did not create --------------------------------------------------

@pytest.mark.parametrize("name", ["/some/folder", "../../folder", "a/b", "..", ".hidden"])
def test_compile_name_is_one_folder_name(name):
    with pytest.raises(ConfigError, match="name"):
        load_config("configs/qwen2_fp32.yaml", {"name": name})


def test_compile_name_in_a_yaml_is_refused_at_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: qwen2_fp32.yaml\nname: /tmp/victim\n".replace(
        "qwen2_fp32.yaml", str(Path("configs/qwen2_fp32.yaml").resolve())))
    with pytest.raises(ConfigError, match=r"bad.yaml:2: name: .*one plain folder name"):
        load_config(path)


def test_check_component_accepts_plain_names():
    assert check_component("qwen2_int8") == "qwen2_int8"
    assert check_component("int8.v2-b") == "int8.v2-b"


def test_atomic_dir_refuses_a_folder_it_did_not_write_and_keeps_its_files(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    with pytest.raises(ForeignFolderError, match="not written by qwen2lib"):
        with atomic_dir(victim) as tmp:
            (tmp / "model.onnx").write_text("graph")
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["victim"]  # no temp folder left behind


def test_atomic_dir_refuses_a_file_or_a_link(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for name in ("file", "link"):
        with pytest.raises(ForeignFolderError, match="not a qwen2lib output folder"):
            with atomic_dir(tmp_path / name):
                pass
    assert (tmp_path / "file").read_text() == "x"


def test_atomic_dir_replaces_its_own_folder(tmp_path):
    final = tmp_path / "stage"
    for text in ("one", "two"):
        with atomic_dir(final) as tmp:
            (tmp / "out.txt").write_text(text)
    assert (final / "out.txt").read_text() == "two" and (final / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_compile_refuses_a_foreign_output_folder_before_building(make_checkpoint, tmp_path):
    from qwen2lib.compile.stage import compile_model

    victim = tmp_path / "mine"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    with pytest.raises(ForeignFolderError, match="mine"):
        compile_model("qwen2_fp32", str(make_checkpoint()), out_dir=victim, verbose=False)
    assert (victim / "notes.txt").read_text() == "keep me"


# ---- leftovers of killed runs ---------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_processes_are_swept_live_ones_kept(tmp_path):
    dead = tmp_path / f".stage.tmp-{_dead_pid()}-abc"
    mine = tmp_path / f".stage.tmp-{os.getpid()}-def"
    live = tmp_path / ".stage.tmp-1-ghi"  # pid 1 always runs
    old_unnamed = tmp_path / ".stage.tmp-zzz"
    fresh_unnamed = tmp_path / ".stage.tmp-yyy"
    for d in (dead, mine, live, old_unnamed, fresh_unnamed):
        d.mkdir()
        (d / "weights.bin").write_bytes(b"0" * 10)
    os.utime(old_unnamed, (0, 0))
    removed = sweep_leftovers(tmp_path, "stage")
    assert sorted(removed) == sorted([dead, old_unnamed])
    assert mine.is_dir() and live.is_dir() and fresh_unnamed.is_dir()


def test_the_next_run_sweeps_a_killed_runs_temp_folder(tmp_path):
    leftover = tmp_path / f".stage.tmp-{_dead_pid()}-x"
    leftover.mkdir()
    with atomic_dir(tmp_path / "stage") as tmp:
        (tmp / "a").write_text("a")
    assert not leftover.exists()


# ---- generated code runs only if it is what qwen2lib generates ------------------------------------------

@pytest.fixture
def package(make_checkpoint, tmp_path):
    return build_deploy_package(make_checkpoint(), tmp_path / "patched")


def _append_payload(path: Path, sentinel: Path) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"\nopen({str(sentinel)!r}, 'w').write('pwned')\n")


def test_a_line_appended_to_the_modeling_file_is_refused_and_never_runs(package, tmp_path):
    sentinel = tmp_path / "ran"
    _append_payload(next(package.glob("modeling_qwen2_*.py")), sentinel)
    with pytest.raises(PackageCodeError, match="modeling_qwen2_onnx.py differs"):
        load_deploy_package(package)
    assert not sentinel.exists()


def test_an_extra_python_file_or_a_rewritten_auto_map_is_refused(package, tmp_path):
    (package / "evil.py").write_text("import os\n")
    with pytest.raises(PackageCodeError, match="evil.py is not a file qwen2lib generates"):
        load_deploy_package(package)
    (package / "evil.py").unlink()
    config = json.loads((package / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "modeling_qwen2_onnx.Qwen2Model"
    (package / "config.json").write_text(json.dumps(config))
    with pytest.raises(PackageCodeError, match="auto_map"):
        load_deploy_package(package)


def test_the_deploy_package_records_the_hash_of_its_generated_files(package):
    import hashlib

    recorded = json.loads((package / "metrics.json").read_text())["generated_code"]
    on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in package.glob("*.py")}
    # modeling, configuration, quantizer, schemes, package writer, and the modules the patches' call sites import
    assert recorded == on_disk and set(on_disk) == set(patched_sources("onnx").files()) and len(on_disk) == 8


def test_a_tampered_quantized_package_is_refused(package, tmp_path):
    model = load_deploy_package(package)
    model.quantize("w8a16")
    out = model.save_quantized(tmp_path / "int8")
    assert q.is_int8_linear(q.load_quantized(out).model.layers[0].mlp.up_proj)
    sentinel = tmp_path / "ran"
    _append_payload(out / q.INT8_MODELING_FILE, sentinel)
    with pytest.raises(PackageCodeError, match="modeling_qwen2_int8.py differs"):
        q.load_quantized(out)
    assert not sentinel.exists()


def test_cli_never_runs_a_tampered_run_folder(tmp_path, capsys):
    from qwen2lib.deploy import verify_package_code

    workdir = tmp_path / "run"
    assert cli.main(["patch", "--model", "tiny-random", "--workdir", str(workdir), "--no-proof"]) == 0
    target = workdir / "patched" / "configuration_qwen2_onnx.py"
    pristine = target.read_bytes()
    # an appended payload changes the file's size: the stage sees a damaged folder and rebuilds it
    sentinel = tmp_path / "ran"
    _append_payload(target, sentinel)
    assert cli.main(["quantize", "--model", "tiny-random", "--workdir", str(workdir), "--heldout-blocks", "1",
                     "--heldout-len", "16"]) == 0
    assert not sentinel.exists() and target.read_bytes() == pristine
    verify_package_code(workdir / "patched")
    # an edit of the same size passes the size check: the code check refuses it before any import
    payload = b"open(%r, 'w')#" % str(sentinel)
    target.write_bytes(payload + pristine[len(payload):])
    capsys.readouterr()
    code = cli.main(["quantize", "--model", "tiny-random", "--workdir", str(workdir), "--scheme", "smoothquant",
                     "--heldout-blocks", "1", "--heldout-len", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert not sentinel.exists()
    assert code == 2 and "configuration_qwen2_onnx.py differs" in err[-1], err


# ---- config.json and the weights must belong together -----------------------------------------------

def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 3}, r"needs model\.layers\.2\.input_layernorm\.weight"),
    ({"num_hidden_layers": 1}, r"no place for model\.layers\.1\."),
    ({"intermediate_size": 96}, r"mlp\.gate_proj\.weight is \[96, 64\] but the weights hold \[128, 64\]"),
    ({"tie_word_embeddings": False}, r"needs lm_head\.weight"),
])
def test_config_and_weights_that_disagree_are_refused_before_loading(make_checkpoint, changes, message):
    folder = make_checkpoint()
    _edit_config(folder, **changes)
    with pytest.raises(WeightsError, match=message):
        check_weights_match_config(folder)
    with pytest.raises(WeightsError, match=message):
        load_model(str(folder))


def test_a_matching_checkpoint_passes(make_checkpoint):
    check_weights_match_config(make_checkpoint())
    check_weights_match_config(make_checkpoint("untied", tie_word_embeddings=False))


# ---- the command line keeps its promise -----------------------------------------------------------------

def test_ctrl_c_exits_130_quietly(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_models", interrupted)
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err.strip() == "qwen2lib models: interrupted"


def test_an_os_error_is_one_line_naming_the_path(tmp_path, capsys):
    workdir = tmp_path / "a-file"
    workdir.write_text("not a folder")
    assert cli.main(["patch", "--model", "tiny-random", "--workdir", str(workdir), "--no-proof"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(workdir) in err[0] and "File exists" in err[0], err


def test_the_checkpoint_is_never_touched_by_a_rejected_compile(make_checkpoint, tmp_path):
    folder = make_checkpoint()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ForeignFolderError):
        from qwen2lib.compile.stage import compile_model

        compile_model("qwen2_fp32", str(folder), out_dir=folder, verbose=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---- the bad-input table of the README: each row, one line, exit 2 -------------------------------------

def _folder(tmp_path, name, files: dict) -> str:
    folder = tmp_path / name
    folder.mkdir()
    for file, content in files.items():
        (folder / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(folder)


def _truncated_checkpoint(make_checkpoint) -> str:
    folder = make_checkpoint("truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return str(folder)


def _mismatched_checkpoint(make_checkpoint) -> str:
    folder = make_checkpoint("mismatch")
    _edit_config(folder, num_hidden_layers=6)
    return str(folder)


def _damaged_graph(make_checkpoint, tmp_path) -> str:
    from qwen2lib.compile.stage import compile_model

    out = compile_model("qwen2_fp32_standard", str(make_checkpoint("g")), workdir=tmp_path / "g-run", verbose=False)
    graph = out / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    return str(out)


BAD_INPUT_ROWS = {
    "unknown model": (lambda mc, tp: ["checkpoint", "--model", "Qwen3-0.6B"], "unknown model 'Qwen3-0.6B'"),
    "folder without config.json": (lambda mc, tp: ["checkpoint", "--model", _folder(tp, "empty", {"x.txt": "x"})],
                                   "config.json"),
    "llama config": (lambda mc, tp: ["checkpoint", "--model", _folder(tp, "llama", {
        "config.json": json.dumps({"model_type": "llama"})})], "llama"),
    "pickle-only checkpoint": (lambda mc, tp: ["checkpoint", "--model", _folder(tp, "pickle", {
        "config.json": (mc("p") / "config.json").read_text(), "pytorch_model.bin": b"\x80\x04"})], "pickle"),
    "truncated safetensors": (lambda mc, tp: ["checkpoint", "--model", _truncated_checkpoint(mc)], "truncated"),
    "config and weights disagree": (lambda mc, tp: ["checkpoint", "--model", _mismatched_checkpoint(mc)],
                                    "do not belong together"),
    "compile name is a path": (lambda mc, tp: ["compile", "qwen2_fp32", "--model", "tiny-random", "--workdir",
                                               str(tp / "w"), "--set", "name=../../victim"], "one plain folder name"),
    "max_sequence_length absurd": (lambda mc, tp: ["compile", "qwen2_fp32", "--model", "tiny-random", "--set",
                                                   "graph.max_sequence_length=99999999999"], "must be 1..1,048,576"),
    "workdir is a file": (lambda mc, tp: ["patch", "--model", "tiny-random", "--no-proof", "--workdir",
                                          _folder(tp, "wd", {"f": "x"}) + "/f"], "File exists"),
    "temperature nan": (lambda mc, tp: ["generate", "--model", "tiny-random", "--temperature", "nan", "--prompt",
                                        "x"], "temperature=nan"),
    "a zip that is not a zip": (lambda mc, tp: ["calibrate", "--model", "tiny-random", "--workdir", str(tp / "w"),
                                                "--dataset", "ceval", "--data-path",
                                                _folder(tp, "z", {"ceval-exam.zip": b"not a zip"}) + "/ceval-exam.zip"],
                                "zip"),
    "alpha outside [0, 1]": (lambda mc, tp: ["quantize", "--model", "tiny-random", "--workdir", str(tp / "w"),
                                             "--scheme", "smoothquant", "--alpha", "5"], "alpha=5.0"),
    "damaged compiled graph": (lambda mc, tp: ["generate", "--model", "tiny-random", "--backend", "onnx",
                                               "--compiled", _damaged_graph(mc, tp), "--prompt", "x"],
                               "cannot be loaded by onnxruntime"),
    "non-UTF-8 argument": (lambda mc, tp: ["checkpoint", "--model", "caf\udce9"], "unknown model"),
    "a ShareGPT file of another shape": (lambda mc, tp: ["bench", "--model", "tiny-random", "--dataset",
                                                         _folder(tp, "sg", {"s.json": "[1, 2, 3]"}) + "/s.json"],
                                         "not in the ShareGPT layout"),
    "a c4 folder holding other JSON": (lambda mc, tp: ["calibrate", "--model", "tiny-random", "--workdir",
                                                       str(tp / "w"), "--dataset", "c4", "--data-path",
                                                       _folder(tp, "c4", {"other.json": '{"a": 1}'})],
                                       "no 'text' field"),
    "malformed safetensors header": (lambda mc, tp: ["checkpoint", "--model", _folder(tp, "bad", {
        "config.json": (mc("h") / "config.json").read_text(),
        "model.safetensors": b"\x10" + b"\x00" * 7 + b"{not json}xxxxxx"})], "not a valid safetensors file"),
}


@pytest.mark.parametrize("row", list(BAD_INPUT_ROWS))
def test_bad_input_row_exits_2_in_one_line(row, make_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv_of, expected = BAD_INPUT_ROWS[row]
    argv = argv_of(make_checkpoint, tmp_path)
    capsys.readouterr()
    code = cli.main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("qwen2lib ")]
    assert code == 2, (row, code, err)
    assert len(err) == 1 and expected in err[0], (row, err)


def test_the_readme_lists_every_bad_input_row():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    missing = [row for row in BAD_INPUT_ROWS if f"| {row} |" not in readme]
    assert not missing, f"README's bad-input table lacks: {missing}"


def test_an_unexpected_error_is_one_line_naming_its_traceback_file(monkeypatch, capsys, tmp_path):
    def broken(args):
        raise KeyError("internal")

    monkeypatch.setenv("QWEN2LIB_CACHE", str(tmp_path))
    monkeypatch.setattr(cli, "cmd_models", broken)
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: KeyError" in err[0] and f"traceback written to {tmp_path}" in err[0]
    monkeypatch.setenv("QWEN2LIB_DEBUG", "1")
    assert cli.main(["models"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_notebook_cell_ends_a_qwen2lib_error_in_one_line(capsys, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    from qwen2lib.errors import show_short_errors

    monkeypatch.delenv("QWEN2LIB_DEBUG", raising=False)
    shell = InteractiveShell.instance()
    show_short_errors(shell)
    cell = ("from qwen2lib.errors import WeightsUnavailableError\n"
            "try:\n    raise OSError('Name or service not known')\n"
            "except OSError as cause:\n    raise WeightsUnavailableError('no weights for X here: download them') from cause\n")
    result = shell.run_cell(cell)
    shown = capsys.readouterr().out.strip().splitlines()
    assert not result.success and isinstance(result.error_in_exec, WeightsUnavailableError)  # the cell still fails
    assert len(shown) == 1 and shown[0].startswith("WeightsUnavailableError: no weights for X here"), shown
    monkeypatch.setenv("QWEN2LIB_DEBUG", "1")
    shell.run_cell(cell)
    assert "OSError" in capsys.readouterr().out  # the cause, on request
