"""The ``qwen2lib`` command line. argparse lives here only: this module builds the parser and turns errors into one
line; ``stages.py`` (patch .. export) and ``inference.py`` (generate .. eval) read each subcommand's arguments and
call the library, which never imports this package.

Exit codes: 0 done; 2 the user's input refused (argparse's errors, ``Qwen2LibError`` and its kinds, an OSError
naming a path), one line; 1 an internal error (anything else: a bug), one line naming the file that holds its
traceback; 130 interrupted.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pandas as pd

from ..artifacts import default_workdir
from ..errors import DEBUG_VARIABLE, Qwen2LibError
from ..paths import cache_root
from ..model.loading import checkpoint_dir
from ..model.registry import list_models
from ..workbook import CELL_TIMEOUT_S, ROOT as WORKBOOK_ROOT, __doc__ as workbook_doc, run_workbook
from . import inference, stages, tiny
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
            inference.register_bench, inference.register_eval, register_workbook, tiny.register_train_tiny)


_PARSER = "_qwen2lib_parser"  # the namespace attribute naming the innermost parser that read the command line


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors in the one-line form every other error has (``qwen2lib compile: error: ... (see
    --help)``, exit 2), where argparse prints its usage block first; subcommand parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # a subcommand's parser returns before its parent's: the first to record itself is the innermost, the one
        # whose --help lists what the leftover arguments should have been
        if not hasattr(namespace, _PARSER):
            setattr(namespace, _PARSER, self)
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        parser = vars(namespace).pop(_PARSER, self)
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="qwen2lib", description=DESCRIPTION,
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


# An OSError without a path that is still the machine's state, not a bug: a full disk or quota.
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def is_users(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's to fix (exit 2): a ``Qwen2LibError``, or an OSError naming a path (the user's
    folder or file, or one under the run folder they chose) or a full disk. Anything else is a bug (exit 1):
    a plain ValueError or KeyError from inside the library must not read like bad input."""
    if isinstance(exc, Qwen2LibError):
        return True
    return isinstance(exc, OSError) and (exc.filename is not None or exc.errno in USER_ERRNOS)


def error_folder(args) -> Path:
    """Where an internal error's traceback goes: ``<run folder>/errors`` when the command has a run folder that
    exists, else ``<cache>/errors`` (``qwen2lib.paths.cache_root``)."""
    if getattr(args, "workdir", None) or getattr(args, "model", None):
        try:
            run = Path(args.workdir) if getattr(args, "workdir", None) else default_workdir(args.model)
            if run.is_dir():
                return run / "errors"
        except (OSError, ValueError):  # an unusable --workdir / --model: the cache still takes the report
            pass
    return cache_root() / "errors"


def write_traceback(args, argv: list[str] | None) -> Path | None:
    """Write the current exception's traceback, with the command line, to a new file; its path (the system's temp
    folder when the chosen one cannot be written; None when neither can)."""
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    text = (f"qwen2lib {' '.join(sys.argv[1:] if argv is None else argv)}\n"
            f"python {sys.version.split()[0]}, cwd {os.getcwd()}\n\n{traceback.format_exc()}")
    for folder in (error_folder(args), Path(tempfile.gettempdir()) / "qwen2lib-errors"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{stamp}-{args.command}.txt"
            path.write_text(text, encoding="utf-8", errors="backslashreplace")
            return path
        except OSError:
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"qwen2lib {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get(DEBUG_VARIABLE):
            traceback.print_exc()
        if is_users(exc):
            print(f"qwen2lib {args.command}: error: {one_line_reason(exc)}", file=sys.stderr)
            return 2
        # a bug, not bad input: one line still, and the traceback kept where it can be attached to a report
        path = write_traceback(args, argv)
        where = f"traceback written to {path}" if path else f"no folder took the traceback: rerun with {DEBUG_VARIABLE}=1"
        print(f"qwen2lib {args.command}: internal error: {type(exc).__name__}: {one_line_reason(exc)} "
              f"({where}; please report it)", file=sys.stderr)
        return 1
