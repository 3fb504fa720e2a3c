"""``python -m kdops.info`` tells the truth: the default column follows KDOPS_BACKEND, and
Triton is not "yes" where its kernels cannot run."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kdops import backend, info


def _rows(report: str) -> dict[str, dict[str, str]]:
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op "))
    header = lines[start].split("  ")
    header = [h.strip() for h in header if h.strip()]
    rows = {}
    for line in lines[start + 2:]:
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


@pytest.fixture
def fused_cpu_op():
    """An op whose CPU kernel is built, whatever the state of the other families."""
    if backend.unavailable_reason("channel_kl", "cpu", "cpu", torch.float32) is not None:
        pytest.skip("kdops._C is not built here")
    return "channel_kl"


def test_default_column_follows_kdops_backend(monkeypatch, fused_cpu_op):
    monkeypatch.delenv("KDOPS_BACKEND", raising=False)
    report = info.report()
    assert "default backend: auto (KDOPS_BACKEND not set)" in report
    assert _rows(report)[fused_cpu_op]["default on cpu"] == "cpu"

    monkeypatch.setenv("KDOPS_BACKEND", "reference")
    report = info.report()
    assert "default backend: KDOPS_BACKEND=reference" in report
    assert {row["default on cpu"] for row in _rows(report).values()} == {"reference"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine can run the cuda backend")
def test_a_default_backend_that_cannot_run_says_so(monkeypatch):
    monkeypatch.setenv("KDOPS_BACKEND", "cuda")
    assert {row["default on cpu"] for row in _rows(info.report()).values()} == {"cuda: cannot run"}


def test_triton_cell_on_a_machine_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with_triton = [op for op in backend.OPS if backend.OPS[op].triton is not None]
    assert with_triton, "no op has a Triton kernel"
    op = with_triton[0]
    monkeypatch.setattr(info, "status", lambda o, b: "yes")  # as if triton were installed
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert info.backend_cell(op, "triton") == "no GPU"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert info.backend_cell(op, "triton") == "yes"


def test_backend_cell_not_implemented(monkeypatch):
    monkeypatch.setitem(backend.OPS, "channel_kl", replace(backend.OPS["channel_kl"], cuda=None))
    assert info.backend_cell("channel_kl", "cuda") == "not implemented"


def test_main_prints_the_report(capsys, monkeypatch):
    monkeypatch.setenv("KDOPS_BACKEND", "reference")
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "default backend: KDOPS_BACKEND=reference" in out
    assert set(_rows(out)) == set(backend.OPS)


def test_readme_table_option(capsys):
    assert info.main(["--readme-table"]) == 0
    out = capsys.readouterr().out
    for name, body in info.readme_blocks().items():
        assert f"<!-- {name}:begin -->\n{body}\n<!-- {name}:end -->" in out


def test_update_readme_option(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- fused:begin -->\nold\n<!-- fused:end -->\n<!-- ops-table:begin -->\n"
                      "<!-- ops-table:end -->\nrest\n", encoding="utf-8")
    assert info.main(["--update-readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("rest\n")
    assert info.readme_ops_table() in text and info.readme_fused() in text
    assert info.main(["--update-readme", str(readme)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("already up to date")
    (tmp_path / "bad.md").write_text("no blocks\n")
    assert info.main(["--update-readme", str(tmp_path / "bad.md")]) == 2
