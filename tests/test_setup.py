"""The set-up promises of the README: two commands, one place for pins, CI runs the README's test command."""
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def pins(lines):
    return {m.group(1).lower(): m.group(2) for line in lines if (m := re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line))}


def test_environment_yml_lists_the_same_pins():
    requirements = pins((ROOT / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pins(pip_section) == requirements
    assert requirements["torch"] == "2.13.0", "torch must stay pinned to the CPU build on disk"
    assert all(requirements.values()), "every requirement is pinned"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)[0].strip().splitlines()
    commands = [c.split("#")[0].strip() for c in commands if c.strip() and not c.startswith("#")]
    assert commands == ["python3 tasks.py workbook", "python3 tasks.py test"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == ["python3 tasks.py test"]


def tracked_text(path: Path, root: Path = ROOT) -> str:
    """The notebook as git will commit it (the index), not as JupyterLab last autosaved it in the working tree.

    Working in JupyterLab saves outputs and widget state into notebooks/ (so reopened widgets come back); that
    must not fail the suite, while staging those outputs must. Outside a git checkout (a source archive) or for a
    file git does not know yet, the file itself is what would be committed.
    """
    try:
        run = subprocess.run(["git", "show", f":{path.relative_to(root).as_posix()}"], cwd=root, capture_output=True)
    except FileNotFoundError:  # no git at all
        return path.read_text(encoding="utf-8")
    return run.stdout.decode("utf-8") if run.returncode == 0 else path.read_text(encoding="utf-8")


def notebook_problems(text: str, name: str) -> list[str]:
    import nbformat

    nb = nbformat.reads(text, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    problems = [f"{name} has outputs"] if any(c.get("outputs") or c.get("execution_count") for c in code) else []
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        return problems + [f"{name}: exactly one cell tagged parameters"]
    return problems + [f"{name}: {p} typed and commented" for p in ("model", "dtype", "weights", "workdir", "seed")
                       if not re.search(rf"^{p}\s*:\s*\w+\s*=.*#", tagged[0].source, flags=re.M)]


def test_notebooks_are_committed_without_outputs_and_with_parameters():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks, "no notebooks"
    for path in notebooks:
        assert notebook_problems(tracked_text(path), path.name) == []


def test_hygiene_reads_what_git_would_commit_not_the_autosaved_file(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        'model: str = "tiny"  # m\ndtype: str = "float32"  # d\nweights: str = "auto"  # w\nworkdir: str = ""  # r\n'
        'seed: int = 0  # s', metadata={"tags": ["parameters"]})])
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    git = lambda *args: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                                       check=True, capture_output=True)
    git("init", "-q")
    git("add", "nb.ipynb")
    git("commit", "-qm", "clean")
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="hello")]
    nb.cells[0].execution_count = 1
    nbformat.write(nb, path)  # what a JupyterLab autosave does
    assert notebook_problems(tracked_text(path, tmp_path), "nb") == []
    git("add", "nb.ipynb")  # about to be committed: now it is a problem
    assert notebook_problems(tracked_text(path, tmp_path), "nb") == ["nb has outputs"]
