"""JupyterLab on the workbook, set up so that working in it matches the headless runs: ``python3 tasks.py lab``.

- **the kernel is this environment's Python** (the project's ``.venv``): the server runs on it, the
  environment's kernelspecs are preferred over a user-wide ``python3`` that may point at another Python, and
  this checkout is on ``PYTHONPATH``, so ``import qwen2lib`` in a cell is the library next to the notebooks;
- **loopback only** (127.0.0.1), a fresh token, a free port; the URL is printed;
- **widgets come back** when a saved notebook is reopened: ``jupyter/lab-settings/overrides.json`` (committed)
  turns on ``@jupyter-widgets/jupyterlab-manager``'s ``saveState``, which stores widget state in the notebook.

Outputs JupyterLab autosaves into ``notebooks/`` stay in the working tree: the hygiene test reads what git
tracks, not the file on disk. Extra arguments go to ``jupyter lab``.
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_DIR = ROOT / "jupyter" / "lab-settings"  # holds overrides.json: JupyterLab's defaults for this project
LOOPBACK = "127.0.0.1"


def free_port(preferred: int = 8888) -> int:
    """``preferred`` if nothing listens there, else any free port the system hands out."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def lab_environment(token: str) -> dict[str, str]:
    env = dict(os.environ)
    env["JUPYTER_TOKEN"] = token  # not on the command line, where every local user's `ps` would show it
    # The environment's share/jupyter (its python3 kernelspec runs the server's own interpreter) before the
    # user's ~/.local/share/jupyter, whose python3 kernelspec may name another Python without qwen2lib.
    # jupyter_core already does so inside a venv; explicit so that a conda base environment does too.
    env["JUPYTER_PREFER_ENV_PATH"] = "1"
    # the kernel starts in notebooks/; without this it would import whichever qwen2lib pip installed, which for a
    # second checkout (a git worktree) sharing one environment is the other checkout's
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def lab_command(port: int, extra: list[str] = (), open_browser: bool = True, root_dir: Path = ROOT) -> list[str]:
    """``jupyter lab`` run by this interpreter, so the server and its default kernel are this environment."""
    return [sys.executable, "-m", "jupyter", "lab",
            f"--ServerApp.ip={LOOPBACK}", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={root_dir}", "--LabApp.default_url=/lab/tree/notebooks",
            f"--LabApp.app_settings_dir={SETTINGS_DIR}", *([] if open_browser else ["--no-browser"]),
            # containers (CI's among them) run as root, which Jupyter refuses unless told; it still serves loopback only
            *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []), *extra]


def lab_url(port: int, token: str, path: str = "notebooks") -> str:
    return f"http://{LOOPBACK}:{port}/lab/tree/{path}?token={token}"


def start(port: int | None = None, token: str | None = None, extra: list[str] = (), open_browser: bool = False,
          log=None, timeout_s: float = 300, root_dir: Path = ROOT) -> tuple[subprocess.Popen, int, str]:
    """Start the server in the background and wait until it answers: (process, port, token). Tests use this
    (``root_dir``: a copy of the checkout's notebooks, so that autosaves leave the tracked ones alone)."""
    port = port or free_port()
    token = token or secrets.token_hex(24)
    proc = subprocess.Popen(lab_command(port, list(extra), open_browser, root_dir), env=lab_environment(token), cwd=ROOT,
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            no_proxy.open(f"http://{LOOPBACK}:{port}/api/status?token={token}", timeout=10).read()
            return proc, port, token
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"JupyterLab did not start on port {port} (exit code {proc.poll()})") from None
            time.sleep(0.5)


def stop(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Stop a server from ``start``: asked first, killed if it does not leave within ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    port, token = free_port(), secrets.token_hex(24)
    print(f"[lab] JupyterLab on the workbook, loopback only: {lab_url(port, token)}", flush=True)
    print(f"[lab] kernel: {sys.executable}; Ctrl-C stops the server", flush=True)
    try:
        return subprocess.call(lab_command(port, argv), env=lab_environment(token), cwd=ROOT)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
