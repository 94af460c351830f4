"""Stage 1 (notebook 01): patch Hugging Face's own Qwen2 source into a deploy package, as code instead of a
hand-edited copy.

The deployment guide this workbook follows edits ``modeling_qwen2.py`` before compiling. Here each edit is a
named ``Patch`` (``patch.py``: the machinery; ``patches/``: one file per patch, in order) applied to the source
text of the installed transformers; the code the patches call is real modules (``inserted/``, and
``scratch/dual_chunk.py`` for Dual Chunk Attention) that the package carries as copies. ``package.py`` writes the
deploy package and checks its generated code before anything imports it; ``proof.py`` checks its logits against
upstream; ``report.py`` shows the diffs (``qwen2lib patch`` is in ``qwen2lib/cli/stages.py``).

The names below are the package's public face, the ones notebook 01 and the later stages use.
"""
from .package import (PackageCodeError, build_deploy_package, ensure_patched, load_deploy_package, package_auto_map,
                      package_target, patched_sources, record_metrics, upstream_source, verify_package_code)
from .patch import (CONFIGURATION_FILE, MODELING_FILE, PATCHES_WRITTEN_FOR, AppliedPatch, Edit, Patch,
                    PatchAnchorError, apply_patches)
from .patches import configuration_patches, modeling_patches
from .proof import insert_slice_table, load_reference, measure_insert_slice, prove_package
from .report import patch_html, patch_report, patch_table, show_patch_diffs

__all__ = [
    "AppliedPatch", "CONFIGURATION_FILE", "Edit", "MODELING_FILE", "PATCHES_WRITTEN_FOR", "PackageCodeError", "Patch",
    "PatchAnchorError", "apply_patches", "build_deploy_package", "configuration_patches", "ensure_patched",
    "insert_slice_table", "load_deploy_package", "load_reference", "measure_insert_slice", "modeling_patches",
    "package_auto_map", "package_target", "patch_html", "patch_report", "patch_table", "patched_sources",
    "prove_package", "record_metrics", "show_patch_diffs", "upstream_source", "verify_package_code",
]
