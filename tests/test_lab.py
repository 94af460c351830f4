"""``python3 tasks.py lab``: the server is loopback-only, its kernel imports this checkout's qwen2lib even when the
user has another ``python3`` kernelspec, and widget state is saved with the notebook."""
import asyncio
import json
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from qwen2lib.cli import lab

ROOT = Path(__file__).resolve().parent.parent
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """JupyterLab as tasks.py starts it, for a user whose own python3 kernelspec names a Python without qwen2lib."""
    home = tmp_path_factory.mktemp("home")
    spec = home / "data" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f",
                                                           "{connection_file}"], "display_name": "elsewhere",
                                                  "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        for name, sub in (("JUPYTER_DATA_DIR", "data"), ("JUPYTER_CONFIG_DIR", "config"),
                          ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                          ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
            mp.setenv(name, str(home / sub))
        log = open(home / "lab.log", "wb")
        proc, port, token = lab.start(log=log)
    yield f"http://127.0.0.1:{port}", token
    lab.stop(proc)
    log.close()


def get(server, path):
    url, token = server
    return json.loads(NO_PROXY.open(f"{url}{path}?token={token}", timeout=120).read())


def test_the_server_listens_on_loopback_only_and_prints_its_url():
    command = lab.lab_command(8888)
    assert "--ServerApp.ip=127.0.0.1" in command and command[:2] == [sys.executable, "-m"]
    assert lab.lab_url(8888, "abc") == "http://127.0.0.1:8888/lab/tree/notebooks?token=abc"


def test_widget_state_is_saved_with_the_notebook(server):
    settings = get(server, "/lab/api/settings/@jupyter-widgets/jupyterlab-manager:plugin")
    # JupyterLab applies overrides.json by changing the schema's default; the page composes it with user settings
    assert settings["schema"]["properties"]["saveState"]["default"] is True, settings["schema"]
    assert "saveState" not in settings["settings"], "the test user has no settings of their own"


async def run_in_kernel(server, code: str) -> str:
    """Open notebook 00's kernel (python3) through the server and return what ``code`` prints."""
    import aiohttp

    url, token = server
    async with aiohttp.ClientSession(trust_env=False) as http:
        # a session for a notebook, as opening it in JupyterLab makes: the kernel starts in notebooks/
        body = {"path": "notebooks/00_architecture.ipynb", "type": "notebook", "name": "", "kernel": {"name": "python3"}}
        async with http.post(f"{url}/api/sessions?token={token}", json=body) as response:
            session = await response.json()
            kernel = session["kernel"]["id"]
        try:
            async with http.ws_connect(f"{url.replace('http', 'ws')}/api/kernels/{kernel}/channels?token={token}") as ws:
                msg_id = uuid.uuid4().hex
                await ws.send_json({"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                                               "session": uuid.uuid4().hex, "version": "5.3"},
                                    "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                                    "content": {"code": code, "silent": False, "store_history": False,
                                                "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}})
                out = []
                async with asyncio.timeout(300):
                    async for frame in ws:
                        msg = frame.json()
                        if msg.get("parent_header", {}).get("msg_id") != msg_id:
                            continue
                        kind = msg["header"]["msg_type"]
                        if kind == "stream":
                            out.append(msg["content"]["text"])
                        elif kind == "error":
                            raise AssertionError(f"{msg['content']['ename']}: {msg['content']['evalue']}")
                        elif kind == "status" and msg["content"]["execution_state"] == "idle":
                            return "".join(out)
        finally:
            await http.delete(f"{url}/api/sessions/{session['id']}?token={token}")


def test_the_kernel_is_this_environment_and_imports_this_checkouts_qwen2lib(server):
    printed = asyncio.run(run_in_kernel(server, "import os, sys, qwen2lib; print(sys.prefix, qwen2lib.__file__, os.getcwd())"))
    prefix, module, cwd = printed.split()
    assert Path(cwd) == ROOT / "notebooks"
    assert Path(prefix) == Path(sys.prefix), "the kernel runs another Python than the project's environment"
    assert Path(module) == ROOT / "qwen2lib" / "__init__.py"
