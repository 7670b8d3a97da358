"""The demo's output check: logits compared where the greedy prefixes agree, partings
classified as near-ties or not."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kflume.demo import compare


def _run(tokens, logits):
    return SimpleNamespace(sequences=torch.tensor(tokens), logits=[torch.tensor(x) for x in logits])


def test_compare_stops_at_the_first_parting_and_measures_its_margin():
    p = [[7, 7]]  # a prompt of 2 tokens
    ref = _run([p[0] + [0, 1, 2]], [[[3.0, 1.0, 0.0]], [[0.0, 2.0, 1.9]], [[0.0, 0.0, 5.0]]])
    # Step 1: a near-tie flips (ref margin 0.1, logits 0.1 apart); step 2 comes after the
    # parting: its very different logits must not count.
    out = _run([p[0] + [0, 2, 0]], [[[3.0, 1.0, 0.0]], [[0.0, 1.9, 2.0]], [[9.0, 0.0, 0.0]]])
    c = compare(out, ref, 2, tol=0.1)
    assert c["agree"] == pytest.approx(1 / 3)
    (row, step, margin, dmax), = c["flips"]
    assert (row, step) == (0, 1)
    assert margin == pytest.approx(0.1) and dmax == pytest.approx(0.1)
    assert c["max_abs"] < 0.2  # step 2 (9 vs 0) was not compared


def test_compare_identical_runs():
    r = _run([[1, 4, 5]], [[[0.0, 1.0, 0.0, 0.0, 2.0, 0.0]], [[0.0] * 5 + [1.0]]])
    c = compare(r, r, 1, tol=1e-4)
    assert c == {"agree": 1.0, "max_abs": 0.0, "max_rel": 0.0, "flips": [], "tol": 1e-4}
