"""The README stays true: its commands are the ones CI runs, its op table the backend table."""
import os
import re

import pytest

from kdops.backend import OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def _commands_after(text, comment):
    """The command line that follows ``# <comment>`` in a README code block."""
    match = re.search(rf"^# {re.escape(comment)}.*\n(.+)$", text, flags=re.MULTILINE)
    assert match, f"README has no command under '# {comment}'"
    return match.group(1).strip()


@pytest.mark.parametrize("comment", ["set up", "run the tests"])
def test_ci_runs_the_readme_commands(comment):
    command = _commands_after(_read("README.md"), comment)
    ci_lines = [line.strip() for line in _read(".ci/run").splitlines()]
    assert command in ci_lines, f".ci/run does not run the README's '{comment}' command: {command}"


def test_ops_table_matches_backend_table():
    readme = _read("README.md")
    table = readme.split("<!-- ops-table:begin -->")[1].split("<!-- ops-table:end -->")[0]
    rows = [line for line in table.strip().splitlines()[2:]]
    backends = ("reference", "cpu", "cuda", "triton")
    seen = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        name = re.match(r"`(\w+)\(", cells[0]).group(1)
        seen[name] = {b: cells[-4 + i] == "✓" for i, b in enumerate(backends)}
    assert set(seen) == set(OPS)
    for name, marks in seen.items():
        for b, marked in marks.items():
            implemented = b == "reference" or OPS[name].implementation_path(b) is not None
            assert marked == implemented, f"README says {name} on {b} is {marked}, backend.py says {implemented}"
