"""Patch 1: relative imports."""
from __future__ import annotations

import re

from ..patch import MODELING_FILE, Patch, anchor_error


PARENT_PACKAGE_IMPORT = re.compile(r"^from \.\.\.(\w[\w.]*) import ", flags=re.MULTILINE)
OWN_CONFIG_IMPORT = "from .configuration_qwen2 import "


def rewrite_relative_imports(source: str, *, target: str, file: str) -> str:
    # Inside transformers the file is transformers/models/qwen2/x.py; as remote code it sits alone in a
    # model folder, so "..." means nothing there and the config module carries the target suffix.
    if not PARENT_PACKAGE_IMPORT.search(source):
        raise anchor_error("relative_imports", file, "no 'from ...module import' lines to rewrite")
    source = PARENT_PACKAGE_IMPORT.sub(r"from transformers.\1 import ", source)
    if file == MODELING_FILE:
        if source.count(OWN_CONFIG_IMPORT) != 1:
            raise anchor_error("relative_imports", file, f"expected one {OWN_CONFIG_IMPORT.strip()!r} line")
        source = source.replace(OWN_CONFIG_IMPORT, f"from .configuration_qwen2_{target} import ")
    leftover = re.findall(r"^from \.\S* import .*$", source, flags=re.MULTILINE)
    unexpected = [line for line in leftover if not line.startswith(f"from .configuration_qwen2_{target} import ")]
    if unexpected:
        problem = f"relative imports left that a model folder cannot resolve: {unexpected}"
        raise anchor_error("relative_imports", file, problem)
    return source


def relative_imports_patch(file: str, target: str) -> Patch:
    return Patch(
        "relative_imports",
        "Make the file importable from a model folder (trust_remote_code): `from ...x import` becomes "
        f"`from transformers.x import`, and `.configuration_qwen2` becomes the package's own "
        f"`.configuration_qwen2_{target}`.",
        file,
        lambda source: rewrite_relative_imports(source, target=target, file=file),
    )


