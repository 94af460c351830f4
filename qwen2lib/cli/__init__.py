"""The ``qwen2lib`` command line. argparse lives here only: this module builds the parser and turns errors into one
line; ``stages.py`` (patch .. export) and ``inference.py`` (generate .. eval) read each subcommand's arguments and
call the library, which never imports this package.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import zipfile
from pathlib import Path

import pandas as pd

from ..errors import DEBUG_VARIABLE, Qwen2LibError
from ..model.loading import checkpoint_dir
from ..model.registry import list_models
from ..workbook import CELL_TIMEOUT_S, ROOT as WORKBOOK_ROOT, __doc__ as workbook_doc, run_workbook
from . import inference, stages
from .common import add_model_args


DESCRIPTION = """qwen2lib: one subcommand per workbook stage.

Every subcommand takes --model/--weights/--workdir like the notebooks' parameters, prints its
progress, and on bad input exits 2 with a one-line reason."""


def cmd_models(args) -> int:
    table = list_models()
    if args.json:
        print(table.to_json(orient="records", indent=2))
    else:
        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
            print(table.to_string(index=False))
    return 0


def _parameter_value(value: str):
    """A ``-p NAME VALUE`` value as papermill's ``-p`` reads it: int, float, true/false, else the string."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def cmd_workbook(args) -> int:
    parameters = {name: _parameter_value(value) for name, value in args.parameter}
    return run_workbook(parameters, tuple(args.only), Path(args.output_dir), args.cell_timeout)


def register_workbook(sub) -> None:
    p = sub.add_parser("workbook", help="run the notebooks in order, headless (papermill), executed copies in executed/",
                       description=workbook_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a notebook parameter, e.g. -p model Qwen2-0.5B (repeatable)")
    p.add_argument("--only", action="append", default=[], help="run notebooks whose name starts with this (repeatable)")
    p.add_argument("--output-dir", default=str(WORKBOOK_ROOT / "executed"))
    p.add_argument("--cell-timeout", type=int, default=None, metavar="SECONDS",
                   help=f"time limit per cell, 0 for none (default: {CELL_TIMEOUT_S} on tiny, none on other models)")
    p.set_defaults(func=cmd_workbook)


def cmd_checkpoint(args) -> int:
    print(checkpoint_dir(args.model, args.weights, args.seed))
    return 0


# The subcommands, in workbook order: the stages (patch .. export), then inference (generate .. eval).
REGISTER = (stages.register_patch, stages.register_calibrate, stages.register_quantize, stages.register_compile,
            stages.register_export, inference.register_generate, inference.register_chat, inference.register_serve,
            inference.register_bench, inference.register_eval, register_workbook)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2lib", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("checkpoint", help="print (building or finding it first) the local checkpoint folder of a model")
    add_model_args(p)
    p.set_defaults(func=cmd_checkpoint)

    for register in REGISTER:
        register(sub)
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
