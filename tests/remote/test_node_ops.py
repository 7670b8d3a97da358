"""An AttentionNode under random sequences of its operations, against float64 attention
over each request's KV as written.

The node caches each batch's device page-table rows between calls (kflume/node.py,
`_rows_key`); these sequences take pages at staggered steps, refuse appends when full,
rewrite slots, append to some layers only, and free ids that come back at once (the
same slot, often the same page count), so a stale cached row would attend over another
request's pages.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kflume.node import AttentionNode, NodeCapacityError, NodeConfig

LAYERS, HKV, HQ, D, PAGE = 3, 2, 4, 16, 4
IDS = ["r0", "r1", "r2", "r3"]

OPS = st.one_of(
    st.tuples(st.just("new"), st.sampled_from(IDS), st.integers(1, 11)),
    st.tuples(st.just("step"), st.integers(1, 15), st.integers(1, 2)),
    st.tuples(st.just("layers"), st.sampled_from(IDS), st.integers(0, LAYERS - 1),
              st.integers(1, LAYERS), st.integers(1, 5)),
    st.tuples(st.just("free"), st.sampled_from(IDS)),
    st.tuples(st.just("attend"), st.integers(0, LAYERS - 1), st.integers(1, 15),
              st.booleans()),
)


class _Model:
    """What the node should hold: per request and layer, float64 `[n, Hkv, D]`."""

    def __init__(self) -> None:
        self.kv: dict[str, list[list[torch.Tensor]]] = {}

    def write(self, rid, layers, off, k, v) -> None:
        held = self.kv.setdefault(rid, [[torch.zeros(0, HKV, D, dtype=torch.float64)] * 2
                                        for _ in range(LAYERS)])
        for i, layer in enumerate(layers):
            for j, new in enumerate((k[i], v[i])):
                old = held[layer][j]
                held[layer][j] = torch.cat((old[:off], new.double(), old[off + len(new):]))

    def length(self, rid, layer) -> int:
        return len(self.kv[rid][layer][0])

    def attend(self, rid, layer, n, q) -> torch.Tensor:
        k, v = (t[:n] for t in self.kv[rid][layer])
        qi = q.double().view(HKV, HQ // HKV, D)
        s = torch.einsum("hgd,thd->hgt", qi, k) * D**-0.5
        return torch.einsum("hgt,thd->hgd", s.softmax(-1), v).reshape(HQ, D)


def _append(node, model, gen, rid_offs, layers, t):
    """One append_layers call of t tokens per request; both sides, or neither when the
    node refuses it (full)."""
    rids = [r for r, _ in rid_offs]
    offs = [o for _, o in rid_offs]
    k = torch.randn(len(rids), len(layers), t, HKV, D, generator=gen)
    v = torch.randn(len(rids), len(layers), t, HKV, D, generator=gen)
    try:
        node.append_layers(layers, rids, offs, offs, k, v)
    except NodeCapacityError:
        return False
    for i, (rid, off) in enumerate(rid_offs):
        model.write(rid, layers, off, k[i], v[i])
    return True


@settings(max_examples=150, deadline=None)
@given(st.lists(OPS, min_size=8, max_size=40), st.integers(0, 2**16))
def test_random_operation_sequences_attend_over_what_was_written(ops, seed):
    node = AttentionNode(NodeConfig(layers=LAYERS, kv_heads=HKV, head_dim=D,
                                    capacity_tokens=24 * PAGE, page_size=PAGE, dtype="float32"))
    model, gen = _Model(), torch.Generator().manual_seed(seed)
    every = range(LAYERS)
    for op in ops:
        live = [r for r in IDS if r in model.kv]
        if op[0] == "new" and op[1] not in model.kv:
            _append(node, model, gen, [(op[1], 0)], every, op[2])
        elif op[0] == "step" and live:  # a decode step of the requests in the mask
            chosen = [r for i, r in enumerate(live) if op[1] >> i & 1]
            if chosen:
                _append(node, model, gen,
                        [(r, min(model.length(r, x) for x in every)) for r in chosen],
                        every, op[2])
        elif op[0] == "layers" and op[1] in model.kv:  # some layers only (lengths differ)
            rid, first = op[1], op[2]
            layers = range(first, min(LAYERS, first + op[3]))
            off = min(model.length(rid, x) for x in layers)
            _append(node, model, gen, [(rid, off)], layers, op[4])
        elif op[0] == "free" and op[1] in model.kv:
            node.free([op[1]])
            del model.kv[op[1]]
        elif op[0] == "attend" and live:
            layer = op[1]
            chosen = [r for i, r in enumerate(live) if op[2] >> i & 1] or live[:1]
            # the whole history, or a prefix of it (what a range of a longer request is)
            lens = [model.length(r, layer) if op[3] else (model.length(r, layer) + 1) // 2
                    for r in chosen]
            q = torch.randn(len(chosen), HQ, D, generator=gen)
            out, lse = node.attend(layer, chosen, lens, q)
            for i, (rid, n) in enumerate(zip(chosen, lens)):
                if n == 0:
                    continue
                ref = model.attend(rid, layer, n, q[i])
                assert torch.isfinite(out[i]).all()
                assert (out[i].double() - ref).norm() <= 1e-5 * ref.norm(), (rid, layer, n)
    held = sum(-(-max(model.length(r, x) for x in every) // PAGE) for r in model.kv)
    assert node.stats()["pages_free"] == 24 - held


def test_an_id_back_in_its_old_slot_with_other_pages_attends_over_its_own():
    """r0 is freed, r1 takes r0's page, r0 comes back in its old slot with as many pages
    as before (others): the same attend as before r0 left must read r0's new pages."""
    node = AttentionNode(NodeConfig(layers=LAYERS, kv_heads=HKV, head_dim=D,
                                    capacity_tokens=24 * PAGE, page_size=PAGE, dtype="float32"))
    model, gen = _Model(), torch.Generator().manual_seed(0)
    every = range(LAYERS)
    for rid in ("r0", "r1"):
        assert _append(node, model, gen, [(rid, 0)], every, PAGE)
    q = torch.randn(1, HQ, D, generator=gen)
    node.attend(0, ["r0"], [PAGE], q)  # (its rows cached)
    node.free(["r0"])
    del model.kv["r0"]
    assert _append(node, model, gen, [("r1", PAGE)], every, 1)  # takes r0's page
    assert _append(node, model, gen, [("r0", 0)], every, PAGE)  # r0: its slot, a new page
    out, _ = node.attend(0, ["r0"], [PAGE], q)
    ref = model.attend("r0", 0, PAGE, q[0])
    assert (out[0].double() - ref).norm() <= 1e-5 * ref.norm()
    q2 = torch.randn(2, HQ, D, generator=gen)  # and r0's append went to its own page
    out, _ = node.attend(1, ["r1", "r0"], [PAGE + 1, PAGE], q2)
    for i, (rid, n) in enumerate((("r1", PAGE + 1), ("r0", PAGE))):
        ref = model.attend(rid, 1, n, q2[i])
        assert (out[i].double() - ref).norm() <= 1e-5 * ref.norm(), rid


def test_a_request_that_takes_a_page_attends_over_it():
    """A request's rows cached before it took a new page are not used after: its next
    token, in the new page, must not overwrite its first."""
    node = AttentionNode(NodeConfig(layers=LAYERS, kv_heads=HKV, head_dim=D,
                                    capacity_tokens=24 * PAGE, page_size=PAGE, dtype="float32"))
    model, gen = _Model(), torch.Generator().manual_seed(1)
    every = range(LAYERS)
    assert _append(node, model, gen, [("r0", 0)], every, PAGE)  # one full page
    q = torch.randn(1, HQ, D, generator=gen)
    node.attend(1, ["r0"], [PAGE], q)
    assert _append(node, model, gen, [("r0", PAGE)], every, 1)  # a second page
    out, _ = node.attend(1, ["r0"], [PAGE + 1], q)
    ref = model.attend("r0", 1, PAGE + 1, q[0])
    assert (out[0].double() - ref).norm() <= 1e-5 * ref.norm()
