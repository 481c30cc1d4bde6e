"""`Launches` (kv_cache.attention.launches) with a stand-in kernel: which launches go through `kernel[grid]` (Triton's
binding) and which straight to the compiled launcher, with every argument in its slot. The real kernels take this
path on CUDA (test_triton_attention.py, whose second and later launches of a plan use the compiled launcher)."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kv_cache.attention import launches
from kv_cache.attention.launches import Launches

NAMES = ["X", "Y", "n", "scale", "BLOCK", "MODE"]


class FakeKernel:
    """`kernel[grid](*args, **constants)` records the call and returns a compiled stand-in whose launcher records
    its arguments."""

    arg_names = NAMES

    def __init__(self, signature: list[str] = NAMES) -> None:
        self.bound: list[tuple[tuple, tuple, dict]] = []
        self.launched: list[tuple[tuple, tuple]] = []
        self.signature = signature

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def bind(*args: Any, **constants: Any) -> Any:
            self.bound.append((grid, args, constants))
            return Compiled(self, self.signature)

        return bind


class Compiled:
    """A compiled kernel's stand-in: its source's signature, and `[grid]` giving a launcher that records."""

    def __init__(self, kernel: FakeKernel, signature: list[str]) -> None:
        self.kernel = kernel
        self.src = SimpleNamespace(signature={name: "t" for name in signature})

    def run(self) -> None:  # present on Triton's compiled kernels
        raise AssertionError("launches go through compiled[grid]")

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        assert len(grid) == 3, "Triton's launcher reads three grid dimensions"
        return lambda *values: self.kernel.launched.append((grid, values))


@pytest.fixture
def on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the path a CUDA machine with Triton >= 3.3 takes."""
    monkeypatch.setattr(launches, "FAST_LAUNCH", True)
    monkeypatch.setattr(launches, "_on_cuda", lambda args: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # triton.knobs' shape: importing the real triton here would fix its interpreter mode for the other tests
    knobs = SimpleNamespace(runtime=SimpleNamespace(debug=False), compilation=SimpleNamespace(instrumentation_mode=""))
    monkeypatch.setitem(sys.modules, "triton", SimpleNamespace(knobs=knobs))


def launch(cache: Launches, kernel: FakeKernel, x: torch.Tensor, key: Any = "k", mode: int = 0) -> None:
    cache.launch(kernel, (4, 2), (x, None, 7, 0.5), {"BLOCK": 16, "MODE": mode, "num_warps": 1}, key=key)


def test_first_launch_binds_later_ones_go_to_the_launcher(on_cuda: None) -> None:
    kernel, cache = FakeKernel(), Launches()
    first, second = torch.zeros(8), torch.ones(8)
    launch(cache, kernel, first)
    launch(cache, kernel, second)
    launch(cache, kernel, first)
    assert [args[0] is first for _, args, _ in kernel.bound] == [True]
    assert kernel.bound[0][2] == {"BLOCK": 16, "MODE": 0, "num_warps": 1}
    assert len(kernel.launched) == 2
    grid, values = kernel.launched[0]
    assert grid == (4, 2, 1) and values[0] is second and values[1:] == (None, 7, 0.5, 16, 0)
    assert kernel.launched[1][1][0] is first


def test_each_key_and_alignment_is_bound_once(on_cuda: None) -> None:
    kernel, cache = FakeKernel(), Launches()
    storage = torch.zeros(64)
    aligned, misaligned = storage[:8], storage[1:9]  # 4-byte offset: Triton specialises on 16-byte alignment
    for x, key, mode in [(aligned, "a", 0), (aligned, "b", 1), (misaligned, "a", 0), (aligned, "a", 0)]:
        launch(cache, kernel, x, key, mode)
    assert len(kernel.bound) == 3 and len(kernel.launched) == 1
    assert kernel.bound[2][1][0] is misaligned


def test_unknown_forms_always_bind(on_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    renamed = FakeKernel(signature=["X", "Y", "n", "scale", "BLOCK"])  # a launcher without the constexprs
    cache = Launches()
    for _ in range(3):
        launch(cache, renamed, torch.zeros(8))
    assert len(renamed.bound) == 3 and not renamed.launched
    plain = FakeKernel()
    for _ in range(2):
        launch(cache, plain, torch.zeros(8), key=None)
    monkeypatch.setattr(launches, "FAST_LAUNCH", False)
    for _ in range(2):
        launch(cache, plain, torch.zeros(8), key="k2")
    assert len(plain.bound) == 4 and not plain.launched


def test_cpu_tensors_always_bind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU interpreter (and any tensor off CUDA) goes through `kernel[grid]` every time."""
    monkeypatch.setattr(launches, "FAST_LAUNCH", True)
    kernel, cache = FakeKernel(), Launches()
    for _ in range(3):
        launch(cache, kernel, torch.zeros(8))
    assert len(kernel.bound) == 3 and not kernel.launched


def test_a_changed_debug_switch_binds_again(on_cuda: None) -> None:
    """Triton's debug switch changes what a launch compiles: a launcher compiled without it is not reused."""
    kernel, cache = FakeKernel(), Launches()
    launch(cache, kernel, torch.zeros(8))
    sys.modules["triton"].knobs.runtime.debug = True  # the fixture's stand-in
    launch(cache, kernel, torch.zeros(8))
    launch(cache, kernel, torch.zeros(8))
    assert len(kernel.bound) == 2 and len(kernel.launched) == 1
