"""Which source files build a stage: the import closure of the modules that build it, read from the code itself.

A stage's rebuild key holds a hash of each of these files, so editing any module the stage's code can reach
(``model/model_config.py`` for a compiled graph, ``model/corpus.py`` for calibration) rebuilds that stage and
everything after it, and editing a module it cannot reach rebuilds nothing. The list is derived, never kept by
hand: a hand-kept list drifts as modules gain imports.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT_PACKAGE = "qwen2lib"


def module_file(root: Path, module: str) -> Path | None:
    """``qwen2lib.model.loading`` -> ``root/model/loading.py`` (or the package's ``__init__.py``); None if absent."""
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join((ROOT_PACKAGE, *parts))


def _package_of(root: Path, path: Path) -> str:
    name = module_name(root, path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imported_modules(root: Path, path: Path) -> set[str]:
    """The qwen2lib modules ``path`` imports anywhere in it (a function's import runs when the stage builds too)."""
    package = _package_of(root, path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == ROOT_PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != ROOT_PACKAGE:
                continue
            found.add(target)
            # `from . import x` imports the module x when there is one
            found.update(f"{target}.{a.name}" for a in node.names if module_file(root, f"{target}.{a.name}"))
    return found


def _with_parents(module: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a`` and ``a.b`` first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@lru_cache(maxsize=64)
def _closure(root: Path, entries: tuple[str, ...], stamp: tuple) -> tuple[Path, ...]:
    seen: dict[str, Path] = {}
    todo = [m for e in entries for m in _with_parents(e)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = module_file(root, module)
        if path is None:
            continue
        seen[module] = path
        todo.extend(m for imported in imported_modules(root, path) for m in _with_parents(imported))
    return tuple(sorted(set(seen.values())))


def import_closure(root: Path, entries: tuple[str, ...]) -> list[Path]:
    """Every source file of ``root`` (the qwen2lib folder) that importing ``entries`` runs, sorted."""
    root = Path(root).resolve()
    # the cache holds while no source file changed (tests edit a copy of the library)
    stamp = tuple((p.as_posix(), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*.py")))
    return list(_closure(root, tuple(entries), stamp))
