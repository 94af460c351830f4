"""The set-up promises of the README: two commands, one place for pins, CI runs the README's test command."""
import re
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


def test_notebooks_are_committed_without_outputs_and_with_parameters():
    import nbformat

    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks, "no notebooks"
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in code), f"{path.name} has outputs"
        tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: exactly one cell tagged parameters"
        for name in ("model", "dtype", "weights", "workdir", "seed"):
            assert re.search(rf"^{name}\s*:\s*\w+\s*=.*#", tagged[0].source, flags=re.M), f"{path.name}: {name} typed and commented"
