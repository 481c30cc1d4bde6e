"""`Launches`: repeat launches of a jitted Triton kernel without Triton's per-launch argument binding.

`kernel[grid](*args)` runs `JITFunction.run`, which binds, types and specialises every argument and builds a cache
key on every launch: for the attention kernel's ~50 arguments that measured 91 us of host time per launch on the
H100's host under cProfile, against 12 us for the launcher itself (generate_h100.txt, run J). A `Launches` keeps
what the first launch of a key compiled and hands later launches of that key straight to the compiled kernel's
launcher.

The caller's key must fix everything Triton specialises on except what this module adds: the integer arguments'
values, the constexprs and launch options, the tensors' dtypes (a `triton_attention.LaunchPlan` does). Added here:
the current device, Triton's debug and instrumentation switches, and whether each tensor's address is 16-byte
aligned (Triton's pointer specialisation).

Only Triton >= 3.3 is taken this way, where a compiled kernel's launcher takes every parameter of its source's
signature, constexprs included, in order (checked against the kernel's parameter names on the first launch);
other versions, tensors off CUDA (the CPU interpreter) and a first launch go through `kernel[grid]`, as does a
caller's key of None.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Hashable
from importlib import metadata
from typing import Any

import torch


def _fast_launch_supported() -> bool:
    """Triton >= 3.3 (read from its metadata: importing triton here would fix its interpreter mode too early)."""
    try:
        version = re.match(r"(\d+)\.(\d+)", metadata.version("triton"))
    except metadata.PackageNotFoundError:
        return False
    return version is not None and (int(version[1]), int(version[2])) >= (3, 3)


FAST_LAUNCH = _fast_launch_supported()

Runner = Callable[..., Any]


class Launches:
    """Compiled launchers by (caller's key, device, alignments). Thread-safe; entries are never stale, since the key
    fixes the compiled kernel."""

    def __init__(self) -> None:
        self._runners: dict[Hashable, tuple[Runner, tuple[int | None, ...], tuple[Any, ...]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Compiled launchers held."""
        return len(self._runners)

    def launch(
        self, kernel: Any, grid: tuple[int, ...], args: tuple[Any, ...], constants: dict[str, Any], key: Hashable
    ) -> None:
        """`kernel[grid](*args, **constants)`; `args` are the kernel's leading parameters in order (tensors, None,
        numbers), `constants` the rest by name plus `num_warps`/`num_stages`. key: see the module docstring, or
        None to launch through `kernel[grid]` every time."""
        if key is None or not FAST_LAUNCH or not _on_cuda(args):
            kernel[grid](*args, **constants)
            return
        full_key = (key, torch.cuda.current_device(), _compile_knobs(), *(_aligned(arg) for arg in args))
        entry = self._runners.get(full_key)
        if entry is None:
            compiled = kernel[grid](*args, **constants)
            entry = _runner(kernel, compiled, grid, len(args), constants)
            if entry is not None:
                with self._lock:
                    self._runners[full_key] = entry
            return
        runner, positions, template = entry
        values = list(template)
        for slot, index in enumerate(positions):
            if index is not None:
                values[slot] = args[index]
        runner(*values)


def _on_cuda(args: tuple[Any, ...]) -> bool:
    """Whether the launch's first tensor is on a CUDA device (the kernel then runs compiled, not interpreted)."""
    tensor = next((arg for arg in args if isinstance(arg, torch.Tensor)), None)
    return tensor is not None and tensor.device.type == "cuda"


def _compile_knobs() -> tuple[Any, ...]:
    """Triton's switches that change what a launch compiles (device-side asserts, instrumentation), where this
    Triton version has them: a kernel compiled with other settings is not reused."""
    import triton  # already imported by the kernel being launched

    knobs = getattr(triton, "knobs", None)
    runtime, compilation = getattr(knobs, "runtime", None), getattr(knobs, "compilation", None)
    return getattr(runtime, "debug", None), getattr(compilation, "instrumentation_mode", None)


def _aligned(arg: Any) -> bool | None:
    """Whether a tensor's address is a multiple of 16 (None for other arguments)."""
    return arg.data_ptr() % 16 == 0 if isinstance(arg, torch.Tensor) else None


def _runner(
    kernel: Any, compiled: Any, grid: tuple[int, ...], leading: int, constants: dict[str, Any]
) -> tuple[Runner, tuple[int | None, ...], tuple[Any, ...]] | None:
    """The compiled kernel's launcher for `grid`, which argument fills each of its slots (an index into the
    launch's `args`, or None for a constant) and the constants' values; None if the compiled kernel does not have
    the expected form (then every launch of the key goes through `kernel[grid]`)."""
    names = list(getattr(kernel, "arg_names", ()))
    signature = getattr(getattr(compiled, "src", None), "signature", None)
    if not names or not isinstance(signature, dict) or list(signature) != names or not hasattr(compiled, "run"):
        return None
    if any(name not in constants for name in names[leading:]):
        return None
    positions = tuple(index if index < leading else None for index in range(len(names)))
    template = tuple(None if index < leading else constants[name] for index, name in enumerate(names))
    return compiled[(*grid, 1, 1)[:3]], positions, template  # the launcher reads three grid dimensions
