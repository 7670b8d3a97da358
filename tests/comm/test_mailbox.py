"""Mailbox: a peer's copy and doorbell land where the owner reads them; the Triton
delivery (run by CUDA nodes) checked on CPU under the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kflume.comm import shm as mb
from kflume.comm.mailbox import Mailbox, MailboxView


def test_a_view_in_another_process_writes_bytes_then_doorbell():
    box = Mailbox(rows=3, row_bytes=12, words=4)
    desc = box.describe()
    code = (
        "import sys, torch\n"
        "from kflume.comm.mailbox import MailboxView\n"
        f"v = MailboxView({desc!r}, 'cpu')\n"
        "v.deliver(torch.arange(6, dtype=torch.int32), 12, 2, 77)\n"
        "v.close()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert box.ready(2, 77) and not box.ready(1, 77)
    assert torch.equal(box.buffer[1:3].reshape(-1).view(torch.int32), torch.arange(6))
    assert (box.buffer[0] == 0).all()
    box.clear(0, 4)
    assert not box.ready(2, 77)
    path = os.path.join("/dev/shm", desc["bells"])
    box.close()
    assert not os.path.exists(path)  # the owner's files go with it


def test_bad_descriptions_and_ranges_are_refused():
    box = Mailbox(rows=2, row_bytes=8, words=2)
    with pytest.raises(ValueError, match="mailbox of host 'x'"):
        MailboxView({**box.describe(), "host": "x"}, "cpu")
    with pytest.raises(ValueError, match="needs host, rows"):
        MailboxView({"rows": 1}, "cpu")
    with pytest.raises(ValueError, match="not a kflume mailbox name"):
        MailboxView({**box.describe(), "bells": "../etc/passwd"}, "cpu")
    v = MailboxView(box.describe(), "cpu")
    with pytest.raises(ValueError, match="out of its 16 bytes and 2 words"):
        v.deliver(torch.zeros(3, dtype=torch.int32), 8, 0, 1)  # 12 bytes from 8
    with pytest.raises(ValueError, match="out of its"):
        v.deliver(torch.zeros(1, dtype=torch.int32), 0, 2, 1)
    assert not box.ready(0, 1)  # nothing written by a refused delivery
    v.close()
    box.close()


def test_stale_files_go_host_memory_needs_x86_and_values_never_repeat(monkeypatch):
    dead = os.path.join("/dev/shm", "kflume-999999999-deadbeef0000")  # no such pid
    with open(dead, "wb") as f:
        f.write(b"x")
    box = Mailbox(rows=1, row_bytes=4, words=1)
    assert not os.path.exists(dead)  # a killed owner's file is swept at the next creation
    a, b = box.next_value(), box.next_value()
    assert b == a + 1 and a != Mailbox(rows=1, row_bytes=4, words=1).next_value() - 1
    monkeypatch.setattr(mb.platform, "machine", lambda: "aarch64")
    assert not mb.supported("cpu") and mb.supported("cuda")
    with pytest.raises(ValueError, match="an x86 host"):
        Mailbox(rows=1, row_bytes=4, words=1)
    monkeypatch.setattr(mb.sys, "platform", "darwin")
    assert not mb.supported("cuda")
    box.close()


@pytest.mark.timeout(300)
def test_triton_delivery_under_the_interpreter():
    """The kernels CUDA nodes run: bytes at an offset, sizes over one to many programs
    (the last to finish raises the word, to a value given or read from memory), and the
    query fetch; run on CPU tensors with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from kflume.comm import _deliver_triton as d\n"
        "d.BLOCK = 16\n"
        "g = torch.Generator().manual_seed(0)\n"
        "count = torch.zeros(1, dtype=torch.int32)\n"
        "for n, off in ((4, 0), (260, 12), (1000, 4), (64, 8)):\n"
        "    src = torch.randint(0, 255, (n,), dtype=torch.uint8, generator=g)\n"
        "    buf = torch.zeros(1100, dtype=torch.uint8)\n"
        "    bells = torch.zeros(3, dtype=torch.int64)\n"
        "    d.deliver(src, buf, off, bells, 1, 2**33 + n, count)\n"
        "    assert torch.equal(buf[off:off + n], src), n\n"
        "    assert buf[:off].eq(0).all() and buf[off + n:].eq(0).all(), n\n"
        "    assert bells.tolist() == [0, 2**33 + n, 0], bells\n"
        "    assert count.item() == 0  # back at 0 for the next delivery\n"
        "    value = torch.tensor([2**40 + n])  # read from memory, as captured graphs do\n"
        "    d.deliver(src, buf, off, bells, 2, value, count)\n"
        "    assert bells.tolist() == [0, 2**33 + n, 2**40 + n], bells\n"
        "    got = torch.zeros(n, dtype=torch.uint8)\n"
        "    d.fetch(got, buf, off)  # the other way: a query read from the mailbox\n"
        "    assert torch.equal(got, src), n\n"
        "for bad in (lambda: d.deliver(torch.zeros(6, dtype=torch.uint8), buf, 0, bells, 0,\n"
        "                              1, count),\n"
        "            lambda: d.fetch(torch.zeros(6, dtype=torch.uint8), buf, 0),\n"
        "            lambda: d.fetch(torch.zeros(8, dtype=torch.uint8), buf, 2)):\n"
        "    try:\n"
        "        bad()\n"
        "    except ValueError as e:\n"
        "        assert 'multiple of 4' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('unaligned bytes accepted')\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=280, env=env)


def test_shared_words_left_unclosed_are_released():
    """Shared words (and their file) dropped without close() go when collected; on a GPU
    each was registered with CUDA and is unregistered before it is unmapped, so the next
    mapping at the same address registers (a stale registration refused it, error 712)."""
    import gc

    cuda = torch.cuda.is_available()
    paths = []
    for _ in range(20):  # same size, one after another: addresses come back
        w = mb.SharedWords(6, cuda=cuda)
        w.tensor[5] = 7
        paths.append(w.path)
        assert os.path.exists(paths[-1])
        del w
        gc.collect()
    assert not any(os.path.exists(p) for p in paths)
