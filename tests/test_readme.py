"""The README stays true: its commands are the ones CI runs, its op table and what it says is
fused come from the backend table, its links resolve, its training-loop example runs."""
import os
import re

import pytest
import torch

from kdops import info
from kdops.backend import OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _commands_after(text, comment):
    """The command line that follows ``# <comment>`` in a README code block."""
    match = re.search(rf"^# {re.escape(comment)}.*\n(.+)$", text, flags=re.MULTILINE)
    assert match, f"README has no command under '# {comment}'"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_set_up_and_test_commands():
    readme = _read("README.md")
    expected = [_commands_after(readme, "set up"), _commands_after(readme, "run the tests")]
    commands = [line.strip() for line in _read(".ci/run").splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert commands == expected


def test_plain_install_has_no_triton_and_the_test_command_installs_it():
    """``pip install -e .`` must not pull triton (285 MB, useless without a GPU); the test
    command must, or CI would skip the Triton kernels."""
    readme = _read("README.md")
    set_up, test = _commands_after(readme, "set up"), _commands_after(readme, "run the tests")
    assert "[test]" not in set_up and "triton" not in set_up
    setup_py = _read("setup.py")
    install_requires = re.search(r"install_requires=\[(.*?)\]", setup_py, flags=re.DOTALL).group(1)
    assert "triton" not in install_requires
    assert "-r requirements-test.txt" in test
    requirements = [line.split(">=")[0].strip() for line in _read("requirements-test.txt").splitlines()]
    assert {"pytest", "triton"} <= set(requirements)


def _block(text, name):
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, name
    return text.split(begin)[1].split(end)[0].strip("\n")


@pytest.mark.parametrize("name", info.README_BLOCKS)
def test_generated_blocks_are_up_to_date(name):
    """Regenerate with ``python -m kdops.info --update-readme`` after changing kdops/backend.py."""
    assert _block(_read("README.md"), name) == info.readme_blocks()[name], (
        "README is stale: run python -m kdops.info --update-readme")


def test_ops_table_marks_what_backend_py_implements():
    # Independent of the generator: parse the README's table and compare with OPS.
    rows = _block(_read("README.md"), "ops-table").splitlines()[2:]
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


def test_fused_sentence_names_exactly_the_fused_ops():
    sentence = _block(_read("README.md"), "fused")
    fused = {op for op in OPS if any(OPS[op].implementation_path(b) for b in ("cpu", "cuda", "triton"))}
    assert set(re.findall(r"`(\w+)`", sentence)) == fused
    assert f"{len(fused)} of the {len(OPS)} ops" in sentence


def test_update_readme_rewrites_a_stale_table():
    readme = _read("README.md")
    stale = readme.replace(_block(readme, "ops-table"), "| old |")
    assert info.update_readme(stale) == readme
    with pytest.raises(ValueError, match="fused:begin"):
        info.update_readme(readme.replace("<!-- fused:begin -->", ""))


def test_every_op_has_a_readme_row():
    assert set(info.OP_DOCS) == set(OPS)


def test_relative_links_resolve():
    readme = _read("README.md")
    links = [link for link in re.findall(r"\]\(([^)#][^)]*)\)", readme) if "://" not in link]
    assert "docs/design.md" in links
    for link in links:
        assert os.path.exists(os.path.join(ROOT, link)), f"README links to {link}, which is not in the repository"


def _shared_design():
    # The project's shared design, where this checkout sits beside it (main or a worktree).
    for candidate in ("../shared/DESIGN.md", "../../shared/DESIGN.md"):
        path = os.path.normpath(os.path.join(ROOT, candidate))
        if os.path.isfile(path):
            return path
    return None


@pytest.mark.skipif(_shared_design() is None, reason="no shared DESIGN.md beside this checkout (a clone: "
                    "docs/design.md is the design)")
def test_docs_design_is_a_copy_of_the_shared_design():
    with open(_shared_design(), encoding="utf-8") as f:
        shared = f.read()
    assert _read("docs/design.md") == shared, "docs/design.md is stale: cp ../shared/DESIGN.md docs/design.md"


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_own_training_loop_example_runs_and_trains_the_adapter(capsys, monkeypatch):
    # Inductor's C++ code generation takes a minute on a small CPU machine (it is tested in
    # tests/ops/test_compile.py); here the example's graph capture is what matters, with no
    # graph break allowed.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: compile_(fn, backend="aot_eager", fullgraph=True))
    section = _read("README.md").split("### Use it in your own training loop")[1].split("\n## ")[0]
    (code,) = _python_blocks(section)
    namespace = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    printed = capsys.readouterr().out
    assert re.fullmatch(r"loss \d+\.\d{3}\n", printed), printed
    adapter = namespace["cwd_fusion"].adapter.weight
    before = adapter.detach().clone()
    loss = namespace["train_step"](namespace["images"], namespace["labels"])
    assert torch.isfinite(torch.tensor(loss))
    assert not torch.equal(adapter.detach(), before), "the adapter's parameters are not in the optimizer"


def test_main_job_output_is_consistent_with_the_defaults():
    """The README shows a real run of the main job on its defaults: its gain line is the
    difference of its rows, and it names the default models, step counts and data. (The run
    prints its wall time: a benchmark, not a test.)"""
    from kdops.train import cli

    block = _block(_read("README.md"), "main-job")
    rows = {}
    for line in block.splitlines():
        match = re.match(r"(\S+(?: \+ \w+)?)\s+(teacher|student|distilled)\s+(\d+\.\d)\s", line)
        if match:
            rows[match.group(2)] = (match.group(1), float(match.group(3)))
    teacher, student = "/".join(cli.DEFAULT_TEACHER), "/".join(cli.DEFAULT_STUDENT)
    assert rows["teacher"][0] == teacher and rows["student"][0] == student
    assert rows["distilled"][0] == f"{student} + cwd"
    gain = float(re.search(r"distillation: ([+-]\d+\.\d) mIoU", block).group(1))
    assert gain == pytest.approx(rows["distilled"][1] - rows["student"][1], abs=1e-9)
    assert gain >= 2.0
    assert f"{cli.DEFAULT_TEACHER_STEPS} steps" in block and f"{cli.DEFAULT_STEPS} steps" in block
    size = cli.DEFAULT_SYNTHETIC_SIZE
    assert f"{cli.DEFAULT_SYNTHETIC_SAMPLES[0]} train / {cli.DEFAULT_SYNTHETIC_SAMPLES[1]} val, {size}x{size}" in block
    assert re.search(r"wall time: \d+ s", block)
