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
from qwen2lib.config_schema import ConfigError, load_config
from qwen2lib.errors import WeightsError
from qwen2lib.loading import check_weights_match_config, load_model
from qwen2lib.patching import PackageCodeError, build_deploy_package, load_deploy_package
from qwen2lib import quantization as q


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
    from qwen2lib.compile import compile_model

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
    assert recorded == on_disk and len(on_disk) == 2


def test_a_tampered_quantized_package_is_refused(package, tmp_path):
    model = load_deploy_package(package)
    model.quantize("w8a16")
    out = q.save_quantized(model, package, tmp_path / "int8")
    assert isinstance(q.load_quantized(out).model.layers[0].mlp.up_proj, q.Int8Linear)
    sentinel = tmp_path / "ran"
    _append_payload(out / q.INT8_MODELING_FILE, sentinel)
    with pytest.raises(PackageCodeError, match="modeling_qwen2_int8.py differs"):
        q.load_quantized(out)
    assert not sentinel.exists()


def test_cli_never_runs_a_tampered_run_folder(tmp_path, capsys):
    from qwen2lib.patching import verify_package_code

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
        from qwen2lib.compile import compile_model

        compile_model("qwen2_fp32", str(folder), out_dir=folder, verbose=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
