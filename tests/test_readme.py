"""The README's test command is the one .ci/run calls (its Python block is docs/examples/quickstart.py verbatim, run
by tests/test_docs.py)."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = "python -m pytest -q tests"
    assert cmd in readme and cmd.replace("python ", "python3 ") in ci


def test_readme_output_is_the_quickstart_output():
    """The output the README shows is lines of what the quickstart printed (docs/examples/quickstart.py.out)."""
    import re

    readme = (ROOT / "README.md").read_text()
    shown = re.findall(r"```text\n(.*?)```", readme, re.S)[0].splitlines()
    printed = (ROOT / "docs" / "examples" / "quickstart.py.out").read_text().splitlines()
    assert shown and all(line in printed for line in shown)
