"""Launching a Triton kernel with little host work, and CUDA's grid limits.

`kernel[grid](*args)` binds and specialises every argument, builds a cache key from
them, looks the compiled kernel up and asks the driver about every pointer, on every
call. A `Launch` does that once per *launch key* and then hands the compiled kernel's
launcher the raw pointers, as `JITFunction.run` itself does at its end.

What Triton specialises a compiled kernel on, and so what a launch key must fix: the
constexprs and launch options, the device and the dtypes of the pointer arguments (all
fixed per `Launch`: make one per set of dtypes, as `cached_launch` does), every integer
argument's value (is it 1, a multiple of 16, beyond int32: the key holds the exact
values) and each pointer's 16-byte alignment (the fast path takes only calls whose
pointers are all aligned). Float arguments are not specialised on.

The first call of a key goes through `kernel[grid]` (which compiles or finds the
kernel and returns it); so do calls under TRITON_INTERPRET=1, calls on CPU tensors,
calls with an unaligned pointer and calls while a Triton launch hook (a profiler) is
installed. No allocation and no host sync on either path: both are capturable.
"""

from __future__ import annotations

import torch

__all__ = ["Launch", "MAX_GRID", "cached_launch", "check_grid"]

# CUDA's limits on gridDim (x, y, z).
MAX_GRID = (2**31 - 1, 65535, 65535)
# Distinct integer-argument tuples kept per Launch (a node's page tables change width).
MAX_KEYS = 256


def check_grid(grid: tuple[int, ...], what: str) -> tuple[int, int, int]:
    """`grid` padded to three dimensions; ValueError naming `what` if it exceeds CUDA's
    limits (2^31 - 1, 65535, 65535) or has an empty dimension."""
    g = (*grid, 1, 1)[:3]
    for n, lim, axis in zip(g, MAX_GRID, "xyz"):
        if not 1 <= n <= lim:
            raise ValueError(f"{what}: grid {g} has {n} programs along {axis}; CUDA allows "
                             f"1 to {lim} (shrink the batch or split the call)")
    return g


_RUNTIME_KNOBS = []  # triton.knobs.runtime, imported on first use (triton is optional)


def _hooks_active() -> bool:
    """True while a Triton launch hook (a profiler such as proton) is installed."""
    if not _RUNTIME_KNOBS:
        from triton import knobs

        _RUNTIME_KNOBS.append(knobs.runtime)
    rt = _RUNTIME_KNOBS[0]
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(leave, "calls", leave))


def _raw_stream(device_index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device_index)


class Launch:
    """One Triton kernel with fixed constexprs, launch options and device.

    Call it as `launch(grid, tensors, floats, ints)`: the kernel's parameters must be
    its pointer arguments, then its float arguments, then its integer arguments, then
    its constexprs (the `**constexprs` given here). The pointer dtypes must be the same
    on every call (callers check them); floats must be Python floats and ints
    Python ints (Triton types them by their Python type). `grid` is a 3-tuple within
    `MAX_GRID` (`check_grid`).
    """

    __slots__ = ("fn", "constexprs", "options", "device_index", "fast", "_entries",
                 "_const_vals")

    # Seams for the host-overhead benchmark and the CPU tests of the fast path.
    stream_of = staticmethod(_raw_stream)
    hooks_active = staticmethod(_hooks_active)

    def __init__(self, fn, device: torch.device, *, num_warps: int, num_stages: int | None = None,
                 **constexprs):
        self.fn = fn
        self.constexprs = constexprs
        self.options = {"num_warps": num_warps}
        if num_stages is not None:
            self.options["num_stages"] = num_stages
        self.device_index = device.index if device.index is not None else 0
        self.fast = _fast_capable(fn, device)
        self._entries: dict = {}
        self._const_vals: tuple | None = None

    def __call__(self, grid, tensors: tuple, floats: tuple, ints: tuple) -> None:
        if self.fast:
            ptrs = [t.data_ptr() for t in tensors]
            bits = 0
            for p in ptrs:
                bits |= p
            if not bits & 15 and not self.hooks_active():
                entry = self._entries.get(ints)
                if entry is not None:
                    run, function, packed = entry
                    run(grid[0], grid[1], grid[2], self.stream_of(self.device_index), function,
                        packed, None, None, None, *ptrs, *floats, *ints, *self._const_vals)
                    return
                self._slow(grid, tensors, floats, ints, ints)
                return
        self._slow(grid, tensors, floats, ints, None)

    def _slow(self, grid, tensors, floats, ints, key) -> None:
        compiled = self.fn[grid](*tensors, *floats, *ints, **self.constexprs, **self.options)
        if key is not None:
            self._remember(compiled, len(tensors) + len(floats) + len(ints), key)

    def _remember(self, compiled, n_args: int, key: tuple) -> None:
        """Keep the compiled kernel's launcher for `key` if this Triton's launch protocol
        is the one the fast path speaks (else launch through `kernel[grid]` always)."""
        from triton.compiler import CompiledKernel

        if not isinstance(compiled, CompiledKernel):
            self.fast = False
            return
        if self._const_vals is None:
            params = list(self.fn.params)
            tail = params[n_args:]
            if (len(params) != n_args + len(self.constexprs)
                    or any(p.is_constexpr for p in params[:n_args])
                    or any(not p.is_constexpr or p.name not in self.constexprs for p in tail)):
                self.fast = False
                return
            self._const_vals = tuple(self.constexprs[p.name] for p in tail)
        if not _launcher_takes_constexprs():
            self.fast = False
            return
        run = compiled.run  # loads the module on first use
        if len(self._entries) >= MAX_KEYS:
            self._entries.clear()
        self._entries[key] = (run, compiled.function, compiled.packed_metadata)


def _launcher_takes_constexprs() -> bool:
    """Triton >= 3.3: a compiled kernel's launcher takes every argument, constexprs
    included, and drops them itself (`JITFunction.run` passes `*bound_args.values()`);
    older launchers take a different argument list, which the fast path does not speak."""
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 3)


def _fast_capable(fn, device: torch.device) -> bool:
    """A compiled (not interpreted) Triton kernel launched on CUDA tensors."""
    if device.type != "cuda":
        return False
    try:
        from triton import knobs
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return isinstance(fn, JITFunction) and not knobs.runtime.interpret


_LAUNCHES: dict[tuple, Launch] = {}


def cached_launch(fn, device: torch.device, dtypes: tuple, *, num_warps: int,
                  **constexprs) -> Launch:
    """The `Launch` of `fn` for pointer arguments of these `dtypes`, with these
    constexprs, on `device`, kept across calls."""
    # id(fn): kernels are module-level objects; JITFunction's own hash is its source hash
    key = (id(fn), device, dtypes, num_warps, *constexprs.items())
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) >= MAX_KEYS:
            _LAUNCHES.clear()
        launch = _LAUNCHES[key] = Launch(fn, device, num_warps=num_warps, **constexprs)
    return launch
