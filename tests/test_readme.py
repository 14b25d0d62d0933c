"""The README's API example runs as written, and its test command is the one .ci/run calls."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    ns = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    assert ns["L"][1].shape == (6, 3, 3)
    assert ns["report"].outputs["1"].at_floor.all()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = "python -m pytest -q tests"
    assert cmd in readme and cmd.replace("python ", "python3 ") in ci
