"""Notebook 01's view of the patches: each one's diff as HTML and a summary table. A patch whose code lives in a copied
module (``Patch.copies``) shows its import line in the diff and a note naming the module the package carries."""
from __future__ import annotations

import html
from typing import Sequence

import pandas as pd

from .patch import AppliedPatch, Patch

DIFF_STYLES = {
    "+": "color:#116329;background:#dafbe1",
    "-": "color:#82071e;background:#ffebe9",
    "@": "color:#6e7781",
}


def copies_note(patch: Patch) -> str:
    """One sentence per module the patch's code imports, or "": the package carries a copy of it."""
    return " ".join(f"The package carries qwen2lib/{source} as {filename}: the code these call sites run."
                    for filename, source in patch.copies)


def patch_report(applied: Sequence[AppliedPatch]) -> str:
    """Plain text: each patch's name, description, copied modules and unified diff (for terminals and logs)."""
    parts = []
    for a in applied:
        heading = f"## {a.patch.name} ({a.patch.file}, +{a.lines_added} -{a.lines_removed})"
        note = f"\n{copies_note(a.patch)}" if a.patch.copies else ""
        parts.append(f"{heading}\n{a.patch.description}{note}\n\n{a.diff}")
    return "\n".join(parts)


def diff_html(diff_text: str) -> str:
    """A unified diff as coloured HTML (green added, red removed lines) for a notebook."""
    lines = []
    for line in diff_text.splitlines():
        is_header = line.startswith("+++") or line.startswith("---")
        style = "font-weight:bold" if is_header else DIFF_STYLES.get(line[:1], "")
        lines.append(f'<span style="{style}">{html.escape(line)}</span>')
    body = "\n".join(lines)
    return f'<pre style="font-size:12px;line-height:1.3;overflow-x:auto">{body}</pre>'


def patch_html(applied_patch: AppliedPatch) -> str:
    a = applied_patch
    counts = f"{html.escape(a.patch.file)}, +{a.lines_added} &minus;{a.lines_removed}"
    heading = f"<h4>{html.escape(a.patch.name)} <small>({counts})</small></h4>"
    note = f"<p><small>{html.escape(copies_note(a.patch))}</small></p>" if a.patch.copies else ""
    return heading + f"<p>{html.escape(a.patch.description)}</p>" + note + diff_html(a.diff)


def show_patch_diffs(applied: Sequence[AppliedPatch]) -> None:
    """Display every patch's coloured diff in Jupyter (prints the text report elsewhere)."""
    try:
        from IPython.display import HTML, display  # optional: present inside Jupyter only
    except ImportError:
        print(patch_report(applied))
        return
    for a in applied:
        display(HTML(patch_html(a)))


def patch_table(applied: Sequence[AppliedPatch]):
    """pandas DataFrame: patch, file, description, +lines, -lines, copies (the package modules its code imports)."""
    return pd.DataFrame(
        [
            {"patch": a.patch.name, "file": a.patch.file, "description": a.patch.description,
             "+lines": a.lines_added, "-lines": a.lines_removed,
             "copies": ", ".join(filename for filename, _ in a.patch.copies)}
            for a in applied
        ]
    )


