"""``qwen2lib train-tiny``: rerun the embedded model's training recipe (``qwen2lib.model.train_tiny``) in full.

``tiny`` ships with the package, trained once (``qwen2lib/model/tiny_shipped/``); this is how that file is made
again after the recipe changed (``--write-shipped``), or how to train a copy to compare with it (``--out DIR``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..artifacts import atomic_dir
from ..model.tiny import SHIPPED_DIR
from ..model.tiny_shipping import write_shipped
from ..model.train_tiny import train_tiny

# What the command prints of the card: enough to compare runs, not the loss curve.
SUMMARY_KEYS = ("recipe_hash", "steps", "final_train_loss", "heldout_perplexity", "heldout_perplexities",
                "train_seconds", "build_seconds", "matmul_dtype", "shipped")


def cmd_train_tiny(args) -> int:
    if args.write_shipped:
        card = write_shipped(SHIPPED_DIR, progress=not args.quiet)
        print(f"[train-tiny] rewrote {SHIPPED_DIR}: commit it (git add {SHIPPED_DIR})", file=sys.stderr)
    else:
        with atomic_dir(Path(args.out)) as tmp:
            card = train_tiny(tmp, progress=not args.quiet)
        print(f"[train-tiny] wrote {args.out}", file=sys.stderr)
    print(json.dumps({k: card[k] for k in SUMMARY_KEYS if k in card}, indent=2))
    return 0


def register_train_tiny(sub) -> None:
    p = sub.add_parser("train-tiny", help="retrain the embedded model 'tiny' by its recipe (minutes; it ships trained)",
                       description=__doc__)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--write-shipped", action="store_true",
                       help=f"rewrite the shipped compact file and its model card in {SHIPPED_DIR}")
    where.add_argument("--out", metavar="DIR", help="write the trained checkpoint (with model_card.json) into DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_tiny)
