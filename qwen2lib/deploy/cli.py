"""``qwen2lib patch``: the deploy package of notebook 01 from the command line."""
from __future__ import annotations

import json
import sys

import torch

from ..artifacts import stage_dir
from ..cli import add_model_args, workdir_of
from ..loading import checkpoint_dir
from .package import build_deploy_package
from .proof import prove_package


def cmd_patch(args) -> int:
    checkpoint = checkpoint_dir(args.model, args.weights, args.seed)
    package = build_deploy_package(checkpoint, stage_dir(workdir_of(args), "patched"),
                                   target=args.target, insert_slice=args.insert_slice)
    print(f"[patch] wrote {package}", file=sys.stderr)
    if not args.no_proof:
        prompt = torch.randint(json.loads((package / "config.json").read_text())["vocab_size"], (1, 32),
                               generator=torch.Generator().manual_seed(args.seed))
        proof = prove_package(package, checkpoint, prompt, dtype=args.dtype)
        print(json.dumps(proof, indent=2))
        if not proof["passed"]:
            return 1
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("patch", help="deploy package (patched transformers Qwen2 source) -> <workdir>/patched/")
    add_model_args(p)
    p.add_argument("--target", default="onnx", help="suffix of the patched files (default: onnx)")
    p.add_argument("--insert-slice", action="store_true", help="slice to the last position before lm_head")
    p.add_argument("--no-proof", action="store_true", help="skip the logits comparison with upstream")
    p.set_defaults(func=cmd_patch)
