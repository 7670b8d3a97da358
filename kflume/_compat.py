"""Earlier module paths, still importable: each import warns and names the new one.

`import kflume.cluster` gives kflume.weight.cluster (and so on for the modules listed
in `MOVED`) with a DeprecationWarning. The public names of `kflume.__all__` did not move.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "kflume.cluster": "kflume.weight.cluster",
    "kflume.client": "kflume.weight.client",
    "kflume.remote": "kflume.weight.remote",
    "kflume.pipeline": "kflume.weight.pipeline",
    "kflume.captured": "kflume.graph.captured",
    "kflume.server": "kflume.node.server",
    "kflume.launch": "kflume.node.process",
    "kflume.node_graph": "kflume.node.graphs",
    "kflume.segments": "kflume.node.segments",
}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; import that instead",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    if not any(isinstance(f, _Moved) for f in sys.meta_path):
        sys.meta_path.append(_Moved())
