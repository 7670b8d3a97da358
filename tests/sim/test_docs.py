"""Every snippet of docs/simulation.md runs as written (from the repository root)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil

import pytest

from kflume.cli import main as kflume_main
from kflume.sim.calibration import main as calibration_main

from .conftest import ROOT

DOC = ROOT / "docs" / "simulation.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture()
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    yield
    shutil.rmtree(ROOT / "out", ignore_errors=True)  # what the snippets write (git-ignored)


def test_the_doc_has_snippets():
    assert len(blocks("python")) >= 2 and len(blocks("bash")) >= 1
    assert "issue" not in DOC.read_text().lower()  # the product as it is, not its history


@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_python_snippets(in_root, i):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks("python")[i], f"{DOC}:python[{i}]", "exec"), {})
    assert out.getvalue()


def test_bash_snippets(in_root):
    pytest.importorskip("matplotlib", reason="a snippet plots: the sim extra")
    for block in blocks("bash"):
        for line in block.splitlines():
            cmd = shlex.split(line.split("#")[0])
            if not cmd:
                continue
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                if cmd[0] == "kflume":
                    assert kflume_main(cmd[1:]) == 0, line
                elif cmd[:3] == ["python", "-m", "kflume.sim.calibration"]:
                    assert calibration_main() == 0
                else:
                    raise AssertionError(f"a snippet this test cannot run: {line!r}")
    assert (ROOT / "out" / "sim.json").exists() and (ROOT / "out" / "cost.png").exists()
    assert os.path.isdir(ROOT / "out")
