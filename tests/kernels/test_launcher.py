"""The fast Triton launch path (`_launcher.Launch`), on the CPU with a fake kernel.

A fake stands in for a JITFunction: `fn[grid](*args, **kw)` records the call and
returns a real `CompiledKernel` object whose launcher records what it is handed. The
launch path must match what `JITFunction.run` hands the launcher: grid, stream,
function, metadata, no launch metadata or hooks, then every argument in signature
order (pointers as raw ints, constexprs included).
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")

from kflume.kernels import _launcher  # noqa: E402
from kflume.kernels._launcher import Launch  # noqa: E402


class FakeLauncher:
    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


class FakeKernel:
    """`kernel(A, B, x, n, m, C1, C2)`: two pointers, a float, two ints, two constexprs."""

    def __init__(self, names=("A", "B", "x", "n", "m", "C1", "C2"), n_const=2):
        from triton.compiler import CompiledKernel

        self.params = [types.SimpleNamespace(name=nm, is_constexpr=i >= len(names) - n_const)
                       for i, nm in enumerate(names)]
        self.slow_calls = []
        self.launcher = FakeLauncher()
        compiled = CompiledKernel.__new__(CompiledKernel)
        compiled._run, compiled.function, compiled.packed_metadata = self.launcher, 77, (4, 1, 0)
        compiled.module = None  # (CompiledKernel.__del__ reads it)
        self.compiled = compiled

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.slow_calls.append((grid, args, kwargs))
            return self.compiled
        return run


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(_launcher, "_fast_capable", lambda fn, device: True)
    monkeypatch.setattr(Launch, "stream_of", staticmethod(lambda index: 5))
    hooks = {"on": False}
    monkeypatch.setattr(Launch, "hooks_active", staticmethod(lambda: hooks["on"]))
    return hooks


def tensors():
    a = torch.randn(64)
    b = torch.randn(32)
    assert a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
    return a, b


def test_second_call_of_a_key_launches_directly(fast):
    fn = FakeKernel()
    launch = Launch(fn, torch.device("cuda", 3), num_warps=4, num_stages=2, C2=9, C1=True)
    a, b = tensors()
    launch((2, 3, 1), (a, b), (0.5,), (7, 16))
    assert len(fn.slow_calls) == 1 and not fn.launcher.calls
    grid, args, kwargs = fn.slow_calls[0]
    assert grid == (2, 3, 1) and args == (a, b, 0.5, 7, 16)
    assert kwargs == {"C2": 9, "C1": True, "num_warps": 4, "num_stages": 2}
    a2, b2 = tensors()  # other tensors, same key
    launch((5, 1, 1), (a2, b2), (0.25,), (7, 16))
    assert len(fn.slow_calls) == 1
    # constexprs in signature order (C1, C2), whatever order they were given in
    assert fn.launcher.calls == [(5, 1, 1, 5, 77, (4, 1, 0), None, None, None,
                                  a2.data_ptr(), b2.data_ptr(), 0.25, 7, 16, True, 9)]


def test_new_ints_unaligned_pointers_and_hooks_go_through_triton(fast):
    fn = FakeKernel()
    launch = Launch(fn, torch.device("cuda", 0), num_warps=1, C1=1, C2=2)
    a, b = tensors()
    launch((1, 1, 1), (a, b), (1.0,), (3, 4))
    launch((1, 1, 1), (a, b), (1.0,), (3, 5))  # another int value: another key
    assert len(fn.slow_calls) == 2
    odd = torch.empty(40, dtype=torch.uint8)[1:]  # not 16-byte aligned
    launch((1, 1, 1), (a, odd), (1.0,), (3, 4))
    launch((1, 1, 1), (a, odd), (1.0,), (3, 4))
    assert len(fn.slow_calls) == 4
    fast["on"] = True  # a profiler's launch hook must see every launch
    launch((1, 1, 1), (a, b), (1.0,), (3, 4))
    assert len(fn.slow_calls) == 5
    fast["on"] = False
    launch((1, 1, 1), (a, b), (1.0,), (3, 5))
    assert len(fn.slow_calls) == 5 and len(fn.launcher.calls) == 1


def test_unknown_launch_protocols_turn_the_fast_path_off(fast, monkeypatch):
    a, b = tensors()
    old = FakeKernel()
    old.launcher = old.compiled._run = lambda *args: pytest.fail("no fast launch expected")
    launch = Launch(old, torch.device("cuda", 0), num_warps=1, C1=1, C2=2)
    with monkeypatch.context() as m:  # Triton < 3.3: its launchers take no constexprs
        m.setattr(_launcher, "_launcher_takes_constexprs", lambda: False)
        for _ in range(2):
            launch((1, 1, 1), (a, b), (1.0,), (3, 4))
    assert not launch.fast and len(old.slow_calls) == 2
    odd_order = FakeKernel(names=("A", "C1", "B", "x", "n", "m", "C2"), n_const=0)
    odd_order.params[1].is_constexpr = odd_order.params[6].is_constexpr = True
    launch = Launch(odd_order, torch.device("cuda", 0), num_warps=1, C1=1, C2=2)
    for _ in range(2):  # a constexpr amid the runtime arguments
        launch((1, 1, 1), (a, b), (1.0,), (3, 4))
    assert not launch.fast and not odd_order.launcher.calls
    future = FakeKernel()
    future.compiled = object()  # e.g. an async-compile future
    launch = Launch(future, torch.device("cuda", 0), num_warps=1, C1=1, C2=2)
    launch((1, 1, 1), (a, b), (1.0,), (3, 4))
    assert not launch.fast


def test_cpu_tensors_and_the_interpreter_never_take_the_fast_path():
    assert not _launcher._fast_capable(object(), torch.device("cuda", 0))  # not a JITFunction
    from kflume.kernels import _merge_triton

    assert not _launcher._fast_capable(_merge_triton.merge_kernel, torch.device("cpu"))
