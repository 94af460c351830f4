"""The patch machinery: a ``Patch`` is a named, documented ``str -> str`` transformation of one upstream file.

Most patches are lists of anchored ``Edit``s: each anchor must occur exactly as often as stated in the installed
transformers' source, so a patch whose anchor no longer matches a newer release fails loudly (naming the patch and
the version it was written for) instead of silently drifting. Applying patches in order records each one's own
diff (``AppliedPatch``), which notebook 01 shows.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import transformers

from ..errors import Qwen2LibError

# The transformers release whose qwen2 source the anchors were copied from.
PATCHES_WRITTEN_FOR = "5.24.0"

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


def apply_patches(source: str, patches: Sequence[Patch]) -> tuple[str, list[AppliedPatch]]:
    """Apply ``patches`` in order; each one's diff is taken against the output of the one before."""
    applied = []
    for patch in patches:
        patched = patch.apply(source)
        applied.append(AppliedPatch(patch, source, patched))
        source = patched
    return source, applied


