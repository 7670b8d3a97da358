"""Kernel back ends under test and the float64 checks they share.

`backends()` names every way a kernel runs in this process: the public function on the
CPU (torch reference), the Triton launchers on the CPU under TRITON_INTERPRET=1, and the
public function on CUDA (Triton) when a GPU is present.
"""

from __future__ import annotations

import os

import pytest

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "interpret",
        id="interpret",
        marks=[
            pytest.mark.interpret,
            pytest.mark.skipif(
                not (INTERPRET and triton_available()),
                reason="Triton interpreter runs only when TRITON_INTERPRET=1 at start "
                "(set by conftest without a GPU)",
            ),
        ],
    ),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"
