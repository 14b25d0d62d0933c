"""The documentation cannot drift from the code: a strict build, every example run, every code block an example.

* ``mkdocs build --strict`` (docs/mkdocs.yml; warnings fail; offline) builds the site, API reference included;
* every example in ``docs/examples`` runs as a whole program in a fresh folder and prints what its page shows
  (``<example>.out``: text exactly, numbers to 2%, rounding-level numbers below 1e-9; docs/run_examples.py);
* every fenced code block of the pages is an included example or its output (``--8<--``), except the two install
  commands, which must be the README's; the README's own Python block is ``docs/examples/quickstart.py`` verbatim,
  so it runs here too; every example is shown on some page.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
import run_examples  # noqa: E402

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
INSTALL = re.compile(r"^pip install .*")


def _pages():
    return sorted((DOCS / "src").rglob("*.md"))


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return [b.strip() for lang, b in FENCE.findall(text) if lang.strip() == "bash"]


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the test extra installs it)")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings-python is not installed")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "docs/mkdocs.yml", "-d",
                        str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    page = (tmp_path / "site" / "tutorials" / "hunt" / "index.html").read_text()
    assert "YBondBump" in page and "worst found" in page  # the example and its output are in the page
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "assert_equivariant" in api and "lie_penalty" in api


def test_every_code_block_is_a_run_example():
    shown = set()
    commands = _readme_commands()
    for page in _pages():
        for lang, body in FENCE.findall(page.read_text()):
            inc = re.findall(r'^--8<-- "examples/([^"]+)"$', body.strip(), re.M)
            if inc:
                assert body.strip() == f'--8<-- "examples/{inc[0]}"', f"{page}: a block mixes an include and code"
                shown.add(inc[0])
                continue
            assert lang.strip() == "bash" and body.strip() in commands, \
                f"{page.relative_to(ROOT)}: a code block that is not an example of docs/examples:\n{body[:300]}"
    for name in list(run_examples.EXAMPLES) + list(run_examples.SUPPORT):
        assert name in shown, f"docs/examples/{name} is shown on no page"
        if name in run_examples.EXAMPLES:
            assert name + ".out" in shown, f"the output of {name} is shown on no page"
    on_disk = {p.name for p in (DOCS / "examples").iterdir() if p.suffix in (".py", ".sh")}
    assert on_disk == set(run_examples.EXAMPLES) | set(run_examples.SUPPORT)


def test_readme_blocks():
    """The README: its two commands (install and run the demo; install and test), and one Python block that is the
    quickstart example verbatim."""
    text = (ROOT / "README.md").read_text()
    blocks = FENCE.findall(text)
    py = [b for lang, b in blocks if lang.strip() == "python"]
    assert py == [(DOCS / "examples" / "quickstart.py").read_text()]
    cmds = _readme_commands()
    assert len(cmds) == 2 and all(INSTALL.match(c) for c in cmds)
    assert cmds[0].endswith("geolie demo") and cmds[1].endswith("python -m pytest -q tests")
    assert all(lang.strip() in ("python", "bash", "text") for lang, _ in blocks)


def test_differences_rule():
    """The comparison the examples are held to: text exact, numbers to 2%, rounding-level numbers free."""
    d = run_examples.differences
    assert d("a 1.0e-03 b", "a 1.01e-03 b") == []
    assert d("a 1.0e-03 b", "a 1.1e-03 b")
    assert d("floor 3.1e-15", "floor 7.4e-16") == []
    assert d("at floor", "BREAKS")
    assert d("x\ny", "x")


@pytest.mark.parametrize("name", list(run_examples.EXAMPLES))
def test_example_runs_and_prints_what_the_docs_show(name):
    why = run_examples.missing(run_examples.EXAMPLES[name])
    if why:
        pytest.skip(f"{name}: {why}")
    out, err, rc = run_examples.run(name)
    assert rc == 0, err[-3000:]
    expected = (DOCS / "examples" / (name + ".out")).read_text()
    diff = run_examples.differences(expected, out)
    assert not diff, f"{name} prints something else than its page shows:\n  " + "\n  ".join(diff)
