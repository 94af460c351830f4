"""The patch machinery: a ``Patch`` is a named, documented ``str -> str`` transformation of one upstream file.

Most patches are lists of anchored ``Edit``s: each anchor must occur exactly as often as stated in the installed
transformers' source, so a patch whose anchor no longer matches a newer release fails loudly (naming the patch and
the version it was written for) instead of silently drifting. Applying patches in order records each one's own
diff (``AppliedPatch``), which notebook 01 shows.

The code a patch adds beyond call sites lives in a real qwen2lib module (``CopiedModule``): copied into the package
beside the modeling file, and imported there by one line the patch inserts, so lint, coverage and unit tests reach it.
"""
from __future__ import annotations

import difflib
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import transformers

from ..errors import Qwen2LibError

# The transformers release whose qwen2 source the anchors were copied from.
PATCHES_WRITTEN_FOR = "5.24.0"

IMPORT_WIDTH = 116  # the import lines the patches add wrap like qwen2lib's own
MODELING_FILE = "modeling_qwen2.py"
CONFIGURATION_FILE = "configuration_qwen2.py"


class PatchAnchorError(Qwen2LibError, RuntimeError):
    """A patch's anchor text is not (exactly once) in the upstream source: transformers changed under it."""


@dataclass(frozen=True)
class Patch:
    """One documented transformation of one upstream file's source text."""

    name: str
    description: str
    file: str  # the upstream file it edits: MODELING_FILE or CONFIGURATION_FILE
    apply: Callable[[str], str] = field(repr=False)
    # (package file, its source under qwen2lib/) of each module the patched code imports: the package carries a copy
    copies: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Edit:
    """Replace ``anchor`` (which must occur exactly ``count`` times) by ``replacement``."""

    anchor: str
    replacement: str
    count: int = 1


@dataclass(frozen=True)
class AppliedPatch:
    """A patch together with the text before and after it: its own diff."""

    patch: Patch
    before: str
    after: str

    @property
    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self.before.splitlines(keepends=True),
                self.after.splitlines(keepends=True),
                fromfile=f"a/{self.patch.file}",
                tofile=f"b/{self.patch.file}",
            )
        )

    @property
    def lines_added(self) -> int:
        return sum(1 for line in self.diff.splitlines() if line.startswith("+") and not line.startswith("+++"))

    @property
    def lines_removed(self) -> int:
        return sum(1 for line in self.diff.splitlines() if line.startswith("-") and not line.startswith("---"))


def installed_transformers_version() -> str:
    return transformers.__version__


def anchor_error(patch_name: str, file: str, problem: str) -> PatchAnchorError:
    return PatchAnchorError(
        f"patch {patch_name!r} no longer matches {file} of the installed transformers "
        f"{installed_transformers_version()}: {problem}. The patches were written for transformers "
        f"{PATCHES_WRITTEN_FOR}: install transformers=={PATCHES_WRITTEN_FOR}, or update the anchor of "
        f"{patch_name!r} in qwen2lib/deploy/patches/ to the new source."
    )


def apply_edits(source: str, edits: Sequence[Edit], *, patch_name: str, file: str) -> str:
    for edit in edits:
        found = source.count(edit.anchor)
        if found != edit.count:
            first_line = edit.anchor.strip().splitlines()[0]
            problem = f"expected {edit.count} occurrence(s) of {first_line!r}, found {found}"
            raise anchor_error(patch_name, file, problem)
        source = source.replace(edit.anchor, edit.replacement)
    return source


def anchored_patch(name: str, description: str, file: str, edits: Sequence[Edit]) -> Patch:
    edits = tuple(edits)
    return Patch(name, description, file, lambda source: apply_edits(source, edits, patch_name=name, file=file))


@dataclass(frozen=True)
class CopiedModule:
    """A qwen2lib module whose functions a patch's call sites use. The package carries it as ``<stem>_<target>.py``,
    byte for byte under a header, so it imports only torch and transformers; the patch adds the import line."""

    source: str  # the file under qwen2lib/, e.g. "deploy/inserted/causal_mask.py"
    names: tuple[str, ...]  # what the modeling file imports from it

    def module(self, target: str) -> str:
        return f"{Path(self.source).stem}_{target}"

    def import_edit(self, target: str) -> Edit:
        # Above the configuration import that patch 1 wrote, so the patches' import lines stay in patch order
        config_import = f"from .configuration_qwen2_{target} import "
        note = f"# {self.module(target)}.py is qwen2lib/{self.source}, copied into the package\n"
        return Edit(config_import, note + import_line(self.module(target), self.names) + "\n" + config_import)


def import_line(module: str, names: Sequence[str]) -> str:
    """``from .module import a, b``, wrapped in parentheses past IMPORT_WIDTH characters."""
    line = f"from .{module} import " + ", ".join(names)
    if len(line) <= IMPORT_WIDTH:
        return line
    head = f"from .{module} import ("
    wrapped = textwrap.fill(", ".join(names), IMPORT_WIDTH - 1, initial_indent=head, subsequent_indent=" " * len(head))
    return wrapped + ")"


def patch_with_module(name: str, description: str, file: str, module: CopiedModule, target: str,
                      edits: Sequence[Edit]) -> Patch:
    """``anchored_patch`` whose code calls ``module``: its import line first, then ``edits``; the package copies it."""
    patch = anchored_patch(name, description, file, (module.import_edit(target), *edits))
    return replace(patch, copies=((f"{module.module(target)}.py", module.source),))


def apply_patches(source: str, patches: Sequence[Patch]) -> tuple[str, list[AppliedPatch]]:
    """Apply ``patches`` in order; each one's diff is taken against the output of the one before."""
    applied = []
    for patch in patches:
        patched = patch.apply(source)
        applied.append(AppliedPatch(patch, source, patched))
        source = patched
    return source, applied


