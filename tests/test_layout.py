"""The library's layout: every module imports on its own (no import cycles), imports sit at the top of their module,
and the README's "Layout" section names every module."""
from __future__ import annotations

import ast
import json
import select
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import imported_names

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qwen2lib"
SOURCES = sorted(PACKAGE.rglob("*.py"))

# Heavy dependencies that only one function of a module needs may be imported inside that function.
OPTIONAL_HEAVY = {"matplotlib", "pandas", "playwright", "llama_cpp", "gguf", "compressed_tensors", "IPython",
                  "ipywidgets"}
# Function-level imports in files that concurrent work owns: (file, imported module, function). Move each to the top
# of its module (or under OPTIONAL_HEAVY's rule), then delete its entry here.
PENDING: set[tuple[str, str, str]] = set()  # (file, module, function) moves still owed: none


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def function_level_imports(path: Path) -> list[tuple[str, str, int]]:
    """(imported module as written, enclosing function, line) of every import inside a function of ``path``."""
    found = []

    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and function is not None:
                names = ["." * child.level + (child.module or "")] if isinstance(child, ast.ImportFrom) \
                    else [alias.name for alias in child.names]
                found.extend((name, function, child.lineno) for name in names)
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            walk(child, inner)

    walk(ast.parse(path.read_text(encoding="utf-8")), None)
    return found


# ---- every module imports alone --------------------------------------------------------------------

# A fresh interpreter holding the third-party libraries only; each module is then imported in a child forked from
# it, so qwen2lib is imported from nothing every time while torch and transformers load once.
IMPORT_TIMEOUT_S = 300
IMPORT_SERVER = r"""
import importlib, json, os, sys, traceback
for name in ("torch", "transformers", "transformers.models.qwen2.modeling_qwen2", "onnx", "onnxruntime", "pandas"):
    importlib.import_module(name)
assert not any(m == "qwen2lib" or m.startswith("qwen2lib.") for m in sys.modules)
for line in sys.stdin:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what a module prints must not reach the answer channel
        try:
            importlib.import_module(line.strip())
            message = ""
        except BaseException:
            message = traceback.format_exc()
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    print(json.dumps(message), flush=True)
"""


@pytest.fixture(scope="module")
def import_alone():
    server = subprocess.Popen([sys.executable, "-c", IMPORT_SERVER], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def run(name: str) -> str:
        server.stdin.write(name + "\n")
        server.stdin.flush()
        ready, _, _ = select.select([server.stdout], [], [], IMPORT_TIMEOUT_S)
        assert ready, f"`import {name}` did not finish in {IMPORT_TIMEOUT_S} s"
        line = server.stdout.readline()
        assert line, "the import server died"
        return json.loads(line)

    yield run
    server.stdin.close()
    server.wait(timeout=60)


@pytest.mark.parametrize("module", [module_name(p) for p in SOURCES if p.name != "__main__.py"])
def test_every_module_imports_on_its_own(module, import_alone):
    error = import_alone(module)
    assert not error, f"`import {module}` in a fresh interpreter failed (an import cycle?):\n{error}"


def test_the_import_check_sees_a_cycle(tmp_path):
    """Two modules importing each other's names at the top fail to import: what the check above looks for."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from .b import B\nA = 1\n")
    (tmp_path / "pkg" / "b.py").write_text("from .a import A\nB = 2\n")
    done = subprocess.run([sys.executable, "-c", "import pkg.a"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0 and "ImportError" in done.stderr


# ---- imports at the top ----------------------------------------------------------------------------

def test_imports_sit_at_the_top_of_their_module():
    """Only an optional heavy dependency that a single function needs is imported inside it, with a comment why."""
    wrong = []
    for path in SOURCES:
        rel = path.relative_to(PACKAGE).as_posix()
        lines = path.read_text(encoding="utf-8").splitlines()
        found = function_level_imports(path)
        for name, function, line in found:
            if (rel, name, function) in PENDING:
                continue
            package = name.split(".")[0]
            users = {f for n, f, _ in found if n.split(".")[0] == package}
            if package not in OPTIONAL_HEAVY:
                wrong.append(f"{rel}:{line} imports {name} inside {function}(): move it to the top")
            elif len(users) > 1:
                wrong.append(f"{rel}:{line} imports {name} in {len(users)} functions: move it to the top")
            elif "#" not in lines[line - 1] and "#" not in lines[line - 2]:
                wrong.append(f"{rel}:{line} imports {name} inside {function}() without a comment saying why")
    assert not wrong, "\n".join(wrong)


def test_pending_function_level_imports_still_exist():
    """An entry of PENDING whose import has moved must go, so the list never excuses a new one."""
    present = {(p.relative_to(PACKAGE).as_posix(), name, function)
               for p in SOURCES for name, function, _ in function_level_imports(p)}
    assert PENDING <= present, f"moved already, delete from PENDING: {sorted(PENDING - present)}"


def test_the_import_scan_finds_imports_in_methods_and_nested_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\nclass C:\n    def f(self):\n        def g():\n            from . import x\n"
                      "        import json\n")
    assert function_level_imports(source) == [(".", "g", 6), ("json", "f", 7)]



def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it, as written (``.cli``, ``argparse``)."""
    return imported_names(path.read_text(encoding="utf-8"))


def test_argparse_only_in_the_cli_and_the_library_never_imports_it():
    wrong = []
    for path in SOURCES:
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("cli/") or rel == "__main__.py":  # __main__.py is `python -m qwen2lib`: the CLI itself
            continue
        names = imported_modules(path)
        if "argparse" in names:
            wrong.append(f"{rel} imports argparse: parse arguments in qwen2lib/cli/")
        if any(n.split(".")[-1] == "cli" or ".cli." in n or n.startswith("qwen2lib.cli") for n in names):
            wrong.append(f"{rel} imports the CLI: the library must not depend on it")
    assert not wrong, "\n".join(wrong)


def test_the_import_listing_sees_argparse_and_a_relative_cli(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    import argparse\n\nfrom ..cli import main\n")
    assert imported_modules(source) == {"argparse", "..cli"}

# ---- the tree is the stage graph ---------------------------------------------------------------------

# Packages in the order of the flow: each may import from itself and the ones before it, never a later one.
PACKAGE_ORDER = ["model", "scratch", "evaluation", "stages", "deploy", "calibrate", "quantize", "compile", "export",
                 "serve", "cli"]
FOUNDATION = {"errors", "paths", "artifacts"}  # top-level modules every package may use; they import no package
FACADES = {"pipeline", "workbook"}  # top-level modules over every stage; only the CLI imports them
MAX_TOP_LEVEL_MODULES = 5


def qwen2lib_imports(path: Path) -> set[str]:
    """The qwen2lib modules ``path`` imports, absolute (``qwen2lib.model.loading``)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] == "qwen2lib":
                found.update(f"{target}.{a.name}" if (PACKAGE / Path(*f"{target}.{a.name}".split(".")[1:])).with_suffix(
                    ".py").is_file() else target for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "qwen2lib")
    return found


def top_of(module: str) -> str:
    """``qwen2lib.model.loading`` -> ``model``; ``qwen2lib`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_package_imports_a_later_stage():
    wrong = []
    for path in SOURCES:
        here = top_of(module_name(path))
        if here not in PACKAGE_ORDER and here not in FOUNDATION:
            continue  # the facades and qwen2lib/__init__ may import any stage
        for target in qwen2lib_imports(path):
            there = top_of(target)
            if here in FOUNDATION:
                if there not in FOUNDATION and there != "":
                    wrong.append(f"{path.relative_to(PACKAGE)} (foundation) imports {target}")
            elif there in FACADES:
                if here != "cli":
                    wrong.append(f"{path.relative_to(PACKAGE)} imports the facade {target}")
            elif there in PACKAGE_ORDER and PACKAGE_ORDER.index(there) > PACKAGE_ORDER.index(here):
                wrong.append(f"{path.relative_to(PACKAGE)} imports {target}, a later stage than {here}/")
    assert not wrong, "\n".join(wrong)


def test_the_order_check_sees_a_backward_import(tmp_path):
    assert PACKAGE_ORDER.index(top_of("qwen2lib.serve.generation")) > PACKAGE_ORDER.index("model")
    source = PACKAGE / "model" / "loading.py"
    assert "qwen2lib.model.footprint" in qwen2lib_imports(source)


def test_few_modules_stay_at_the_top_and_every_module_lives_in_a_known_place():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at the top of qwen2lib/: {top}"
    assert set(top) == FOUNDATION | FACADES, f"top-level modules {top}: name each in FOUNDATION or FACADES"
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(PACKAGE_ORDER), f"packages {packages} != PACKAGE_ORDER"


def layout_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## Layout\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else len(readme)]


def test_the_readme_layout_names_every_package_and_top_level_module():
    section = layout_section()
    named = {part.split("`")[0] for part in section.split("- `")[1:]}
    named |= {word.strip("`:;,") for word in section.split() if word.startswith("`")}
    missing = [f"{p}/" for p in PACKAGE_ORDER if f"{p}/" not in named]
    missing += [f"{m}.py" for m in sorted(FOUNDATION | FACADES) if f"{m}.py" not in named]
    assert not missing, f"README's Layout section does not name {missing}"


def test_import_qwen2lib_loads_neither_the_trainer_nor_a_later_stage():
    code = "import sys, qwen2lib; print(' '.join(sorted(m for m in sys.modules if m.startswith('qwen2lib'))))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = loaded.stdout.split()
    assert "qwen2lib.model.tiny" in modules, "the check must see the modules import qwen2lib loads"
    heavy = [m for m in modules if m.endswith(("train_tiny", "tiny_shipping", "corpus"))
             or m.split(".")[1:2] in (["scratch"], ["compile"], ["serve"], ["deploy"])]
    assert not heavy, f"import qwen2lib loads {heavy}: the trainer and later stages load only when used"


def test_generation_loads_the_graph_runtime_and_no_graph_compiler():
    """Serving a compiled graph needs onnxruntime and the runtime, not the builder, its verification or the
    deploy package's patches (issue 34: generation imports only the graph runtime)."""
    code = ("import sys, qwen2lib.serve.generation; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('qwen2lib'))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = loaded.stdout.split()
    assert "qwen2lib.compile.runtime" in modules, "the check must see what generation loads"
    runtime = {"qwen2lib.compile.runtime", "qwen2lib.compile.manifest"}  # the graph's runner and what it reads
    compiler = [m for m in modules if m.split(".")[1:2] == ["deploy"]
                or (m.startswith("qwen2lib.compile.") and m not in runtime)]
    assert not compiler, f"qwen2lib.serve.generation loads {compiler}"
