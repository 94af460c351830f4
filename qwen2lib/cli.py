"""``qwen2lib`` command line: one subcommand per workbook stage.

Every subcommand takes --model/--weights/--workdir like the notebooks' parameters, prints its
progress, and on bad input exits 2 with a one-line reason.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import zipfile
from pathlib import Path

from .errors import DEBUG_VARIABLE, Qwen2LibError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="registry name, hub id or checkpoint folder (default: tiny)")
    parser.add_argument("--weights", default="auto", choices=("auto", "random"),
                        help="auto: local folder/HF cache/hub; random: real shape, seeded random weights")
    parser.add_argument("--workdir", default=None, help="run folder (default: runs/<model>)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--seed", type=int, default=0)


def workdir_of(args) -> Path:
    from .artifacts import default_workdir

    return Path(args.workdir) if args.workdir else default_workdir(args.model)


def cmd_models(args) -> int:
    import pandas as pd

    from .registry import list_models

    table = list_models()
    if args.json:
        print(table.to_json(orient="records", indent=2))
    else:
        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
            print(table.to_string(index=False))
    return 0


def cmd_checkpoint(args) -> int:
    from .loading import checkpoint_dir

    print(checkpoint_dir(args.model, args.weights, args.seed))
    return 0


# Stage modules add their own subcommands: each defines ``register_cli(subparsers)`` and may use
# ``add_model_args`` and ``workdir_of`` from here. Listed in workbook order; imported when the parser is built
# (they import this module for those helpers, so not at its top).
STAGE_MODULES = ("deploy.cli", "calibration", "quantization", "compile", "export", "generation", "chat",
                 "server", "bench", "evaluate")


def _register_stages(sub) -> None:
    for name in STAGE_MODULES:
        importlib.import_module(f"qwen2lib.{name}").register_cli(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2lib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("checkpoint", help="print (building or finding it first) the local checkpoint folder of a model")
    add_model_args(p)
    p.set_defaults(func=cmd_checkpoint)

    _register_stages(sub)
    return parser


def one_line_reason(exc: BaseException) -> str:
    """What went wrong, in one line: an OS error names its path and the system's reason."""
    if isinstance(exc, OSError) and not isinstance(exc, Qwen2LibError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        line = f"{where}{exc.strerror}" + (f" (-> {exc.filename2})" if exc.filename2 is not None else "")
    else:
        text = str(exc).strip()
        line = text.splitlines()[0] if text else type(exc).__name__
    return line.encode("utf-8", "backslashreplace").decode("utf-8")  # a non-UTF-8 argument must not break the print


# What bad input raises: refused in one line, exit 2 (ValueError covers JSON and Unicode errors).
BAD_INPUT = (Qwen2LibError, OSError, ValueError, zipfile.BadZipFile)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"qwen2lib {args.command}: interrupted", file=sys.stderr)
        return 130
    except BAD_INPUT as exc:
        if os.environ.get(DEBUG_VARIABLE):
            traceback.print_exc()
        print(f"qwen2lib {args.command}: error: {one_line_reason(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not bad input: still one line, the traceback on request
        if os.environ.get(DEBUG_VARIABLE):
            traceback.print_exc()
        print(f"qwen2lib {args.command}: internal error: {type(exc).__name__}: {one_line_reason(exc)} "
              f"(rerun with {DEBUG_VARIABLE}=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
