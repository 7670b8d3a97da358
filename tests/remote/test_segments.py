"""Segments: where a request's global positions sit among a node's local slots."""

from __future__ import annotations

import pytest

from kflume.node.segments import add_segment, locate


def test_contiguous_appends_merge_and_rewrites_add_nothing():
    segs: list[list[int]] = []
    add_segment(segs, 100, 110, 0)  # positions 100..109 at local 0..9
    add_segment(segs, 110, 111, 10)  # the next token: the segment grows
    assert segs == [[100, 111, 0]]
    add_segment(segs, 110, 111, 10)  # a retried step rewrites its token: no new segment
    assert segs == [[100, 111, 0]]
    add_segment(segs, 500, 503, 11)  # a migrated range lands after the local tokens
    assert segs == [[100, 111, 0], [500, 503, 11]]


def test_locate_maps_global_ranges_to_local_slots():
    segs = [[500, 503, 11], [100, 111, 0]]  # order of arrival does not matter
    assert locate(segs, 108, 111, "r") == [8, 9, 10]
    assert locate(segs, 501, 503, "r") == [12, 13]
    assert locate(segs, 100, 100, "r") == []
    with pytest.raises(ValueError, match=r"does not hold positions \[111, 112\)"):
        locate(segs, 109, 112, "r")
    with pytest.raises(ValueError, match=r"request 'r'"):
        locate(segs, 200, 201, "r")
