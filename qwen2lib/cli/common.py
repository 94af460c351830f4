"""What every subcommand shares: the model arguments (the notebooks' parameters), the run folder, and the long-context
settings (``--dca``, ``--yarn``) that generate, bench, eval and chat accept."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..artifacts import default_workdir
from ..model.loading import checkpoint_dir
from ..model.long_context import LongContextError, long_context_overrides
from ..model.registry import read_folder_config


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="registry name, hub id or checkpoint folder (default: tiny)")
    parser.add_argument("--weights", default="auto", choices=("auto", "random"),
                        help="auto: local folder/HF cache/hub; random: real shape, seeded random weights")
    parser.add_argument("--workdir", default=None, help="run folder (default: runs/<model>)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--seed", type=int, default=0)


def workdir_of(args) -> Path:
    return Path(args.workdir) if args.workdir else default_workdir(args.model)


def add_long_context_args(parser) -> None:
    parser.add_argument("--dca", default=None, metavar="CHUNK,LOCAL[,ORIGINAL]",
                        help="Dual Chunk Attention: chunk_size and local_size (sets dual_chunk_attention_config)")
    parser.add_argument("--yarn", default=None, metavar="FACTOR[,ORIGINAL]",
                        help="YaRN rope scaling by FACTOR over ORIGINAL trained positions (default: the checkpoint's "
                             "max_position_embeddings); max_position_embeddings becomes FACTOR x ORIGINAL")


def long_context_of(args) -> dict:
    """The config.json overrides of --dca/--yarn ({} without them), checked against the checkpoint's config."""
    if not (getattr(args, "dca", None) or getattr(args, "yarn", None)):
        return {}
    if getattr(args, "stage", None):
        raise LongContextError("--dca/--yarn apply to --backend runs; a --stage is built from the checkpoint's own "
                               "config (drop --stage, or put the settings in the checkpoint's config.json)")
    config = read_folder_config(checkpoint_dir(args.model, args.weights, args.seed))
    return long_context_overrides(args.dca, args.yarn, config)
