"""Every Python snippet in the README and docs/ runs as written, in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def snippets() -> list:
    return list(_snippets())


def _snippets():
    for path in DOCS:
        for m in FENCE.finditer(path.read_text()):
            line = path.read_text()[: m.start()].count("\n") + 1
            yield pytest.param(m.group(1), id=f"{path.name}:{line}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("code", snippets())
def test_snippet_runs_as_written(code):
    if "transformers" in code:
        pytest.importorskip("transformers")
    if "kind=\"local\"" in code or "Cluster.local" in code:
        pytest.importorskip("ucxx", reason="the snippet starts node processes over UCX")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, f"the snippet failed:\n{code}\n{p.stdout[-2000:]}{p.stderr[-3000:]}"


def test_docs_have_snippets():
    assert len(snippets()) >= 5
