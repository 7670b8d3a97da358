"""The project describes the product as it is now: no log of its own development (work
sessions, rounds of tuning, branches, issue numbers, superseded figures) in the docs, the
code's comments or the scripts. Git keeps the history."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "docs").rglob("*.ipynb"),
         *(p for d in ("kflume", "benchmarks", "examples") for p in (ROOT / d).rglob("*")
           if p.suffix in (".py", ".sh", ".md", ".json"))]
HISTORY = re.compile(
    r"(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth)"
    r" session|\bissue #?\d+|\bgit branch\b|"
    r"\bbranch `|\bround \d\b|\bearlier code\b|\bbefore the fix\b|\(was \d", re.I)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_development_history(path):
    text = path.read_text(errors="replace")
    hits = [m.group(0) for m in HISTORY.finditer(text)]
    assert not hits, f"{path.relative_to(ROOT)} speaks of its own history: {hits[:5]}"
