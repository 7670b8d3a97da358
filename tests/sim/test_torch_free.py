"""kflume.scale and kflume.sim import neither torch nor the rest of kflume."""

from __future__ import annotations

import ast
import subprocess
import sys

from .conftest import ROOT

PACKAGES = ("scale", "sim")


def test_no_torch_or_kflume_core_imports_in_the_source():
    for pkg in PACKAGES:
        for path in (ROOT / "kflume" / pkg).glob("*.py"):
            for n in ast.walk(ast.parse(path.read_text())):
                if isinstance(n, ast.Import):
                    names = [a.name for a in n.names]
                elif isinstance(n, ast.ImportFrom):
                    names = [("." * n.level) + (n.module or "")]
                else:
                    continue
                for name in names:
                    assert name.split(".")[0] not in ("torch", "triton"), (path, name)
                    if name.startswith(".."):  # kflume.sim may use kflume.scale only
                        assert name.startswith("..scale"), (path, name)


def test_import_without_torch_in_a_fresh_process():
    # kflume/__init__ imports torch; load kflume.scale and kflume.sim beneath a bare
    # package with torch, matplotlib and tqdm blocked.
    code = f"""
import sys, types, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'triton', 'matplotlib', 'tqdm'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
pkg = types.ModuleType('kflume'); pkg.__path__ = [{str(ROOT / 'kflume')!r}]
sys.modules['kflume'] = pkg
import kflume.scale, kflume.sim, kflume.sim.cli
from kflume.sim import SimConfig, build_workload, load_trace, simulate
w = build_workload(load_trace({str(ROOT / 'kflume/data/traces/tracelab_round_trace.jsonl')!r}))
print(sorted(simulate(w, SimConfig(systems=('instance', 'kflume')))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['instance', 'kflume']" in out.stdout
