#!/usr/bin/env python3
"""The two set-up commands of the README, with nothing but Python 3.11 and pip required.

    python3 tasks.py workbook   # run every notebook in order on the embedded model -> executed/
    python3 tasks.py test       # run the test suite (what CI runs)
    python3 tasks.py lab        # JupyterLab on the notebooks, with the project's kernel, loopback only

Each first creates or refreshes the local virtual environment ``.venv`` from requirements.txt.
Extra arguments go to the underlying tool: ``python3 tasks.py test -k tokenizer``,
``python3 tasks.py workbook -p model Qwen2-0.5B -p weights random``, ``python3 tasks.py lab --no-browser``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".qwen2lib-installed"


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("requirements.txt", "pyproject.toml"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_venv() -> None:
    """Create .venv if needed and (re)install when requirements.txt or pyproject.toml changed."""
    if not PYTHON.exists():
        print(f"[tasks] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print("[tasks] installing pinned requirements into .venv (first run takes a few minutes)", flush=True)
    subprocess.run(pip + ["-r", str(ROOT / "requirements.txt")], check=True)
    subprocess.run(pip + ["--no-deps", "-e", str(ROOT)], check=True)
    STAMP.write_text(_fingerprint())


def ensure_browser() -> None:
    """The browser test drives Chromium from the Debian packages: install it where it is missing and we may."""
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("[tasks] installing chromium (Debian package) for the browser test", flush=True)
        quiet = dict(stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "update", "-q"], check=False, **quiet)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), **quiet)
    else:
        print("[tasks] chromium is missing, so tests/test_browser.py will fail: `sudo apt-get install chromium`",
              flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("test", "workbook", "lab"):
        print(__doc__)
        return 2
    ensure_venv()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if argv[0] == "test":
        ensure_browser()
        cmd = [str(PYTHON), "-m", "pytest", *argv[1:]]
    elif argv[0] == "lab":
        cmd = [str(PYTHON), "-m", "qwen2lib.cli.lab", *argv[1:]]
    else:
        cmd = [str(PYTHON), "-m", "qwen2lib", "workbook", *argv[1:]]
    try:
        return subprocess.call(cmd, cwd=ROOT, env=env)
    except KeyboardInterrupt:  # Ctrl-C reached the child too (JupyterLab, a test run): no traceback from here
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
