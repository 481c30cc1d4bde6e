"""Tests of the Triton backend (`kv_cache.attention.triton_attention`) against fp64 dense attention.

On a machine with CUDA they run the compiled kernels on the GPU. Without CUDA they run in Triton's CPU
interpreter, which Triton chooses by reading `TRITON_INTERPRET` when `@triton.jit` wraps a function: for its own
library (`tl.zeros_like`, `tl.sum`, ...) when `triton` is first imported, for our kernels when
`kv_cache.attention.triton_kernels` is, and again when it lazily imports submodules at the first launch. Setting
the variable once triton is loaded is too late, and unsetting it afterwards breaks those lazy imports. So:

- in process (the usual case): `_load_backend` sets `TRITON_INTERPRET=1` before importing triton and leaves it set
  for the rest of this pytest process. On a machine without CUDA that only means triton code is interpreted, the
  one way it can run there (torch's inductor reads the variable only on its GPU path);
- in a child process (when something earlier in this pytest process already imported triton compiled): every test
  here skips, and `test_interpreter_in_child_process` reruns this file in a fresh `python -m pytest` with
  `TRITON_INTERPRET=1` set from the start, failing with the child's output if any case fails.

Interpreter cost is ~0.1 s per launch plus a few ms per (program x tile), so cases are tiny (head_dim 32, two
sequences, <= 4 blocks, one KV head in the big grid) and the file stays well under a minute on two cores.

Tolerances (atol = rtol) are float rounding: the tail's dot takes its operands in the cache dtype, the quantized
path rounds q * key_scale and p * value_scale to fp16 before its dots (the codes themselves are exact in fp16).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest
import torch
from test_attention import (
    BITS,
    FORMATS,
    LENGTHS,
    CaseSpec,
    call,
    check_against_dense,
    make_case,
    shape_errors,
    spec_for,
)

from kv_cache.attention import launches, reference
from kv_cache.attention.paged_kv import AttentionOptions
from kv_cache.errors import CacheValidationError

KERNEL_MODULES = ("kv_cache.attention.triton_kernels", "kv_cache.attention.triton_attention")
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2, "int8": 1e-2, "int4": 1e-2, "int2": 1e-2}


class Backend(NamedTuple):
    module: ModuleType | None  # triton_attention, or None when the tests run in a child process
    device: str


def _load_backend() -> Backend:
    """Import the Triton backend compiled (CUDA) or interpreted (CPU); see the module docstring."""
    if torch.cuda.is_available():
        pytest.importorskip("triton")
        return Backend(importlib.import_module("kv_cache.attention.triton_attention"), "cuda")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros_like, InterpretedFunction):  # triton was imported compiled before this module
        os.environ.pop("TRITON_INTERPRET") if previous is None else os.environ.update(TRITON_INTERPRET=previous)
        return Backend(None, "cpu")
    module = importlib.import_module("kv_cache.attention.triton_attention")
    if not module.kernels_interpreted():  # our kernels were imported before the variable was set
        for name in KERNEL_MODULES:
            sys.modules.pop(name, None)
        module = importlib.import_module("kv_cache.attention.triton_attention")
    return Backend(module, "cpu")


BACKEND = _load_backend()


@pytest.fixture
def triton_attention() -> ModuleType:
    """The Triton backend module; skips when this file's tests run in a child process instead."""
    if BACKEND.module is None:
        pytest.skip(
            "triton was imported compiled earlier in this process; test_interpreter_in_child_process runs these"
        )
    return BACKEND.module


def test_interpreter_in_child_process() -> None:
    if BACKEND.module is not None:
        pytest.skip("the kernels run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(command, env=env, cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]


def triton_spec(fmt: str, mode: str, group: int, length: str, **changes) -> CaseSpec:
    """`spec_for` with the kernels' usual case for quantized formats: a half-precision tail and query, and
    head_dim 64 (at head_dim 32 an INT2 part holds 8 channels, too few for a `tl.dot` on the GPU)."""
    quantized = {"dtype": torch.float16, "head_dim": 64} if fmt in BITS else {}
    return spec_for(fmt, mode, group, length, **{**quantized, **changes})


def test_kernels_are_interpreted_without_cuda(triton_attention: ModuleType) -> None:
    assert triton_attention.kernels_interpreted() == (BACKEND.device == "cpu")


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_dense(triton_attention: ModuleType, fmt: str, mode: str, group: int, length: str) -> None:
    case = make_case(triton_spec(fmt, mode, group, length, kv_heads=1), BACKEND.device)
    check_against_dense(triton_attention, case, mode, AttentionOptions(), TOLERANCE[fmt], with_mass=False)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("fmt", ["bf16", "int4", "int2"])
def test_repeated_launches_match_dense(
    triton_attention: ModuleType, monkeypatch: pytest.MonkeyPatch, fmt: str, mode: str
) -> None:
    """A plan's later launches (on CUDA: straight to the compiled launchers, `launches.Launches`) give what its first
    did, on fresh inputs of the same layout; with a split, the reduce kernel's launches too."""
    monkeypatch.setattr(triton_attention, "_PLANS", {})
    case = make_case(triton_spec(fmt, mode, 4, "several", seed=3), BACKEND.device)
    for _ in range(3):
        check_against_dense(triton_attention, case, mode, AttentionOptions(), TOLERANCE[fmt], with_mass=False)
        case.query.copy_(torch.randn_like(case.query))
    (plan,) = triton_attention._PLANS.values()
    held = 0 if BACKEND.device == "cpu" or not launches.FAST_LAUNCH else 1 if plan.direct else 2
    assert len(plan.launches) == held  # the attention kernel's launcher, and the reduce kernel's after a split


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_attention_mass(triton_attention: ModuleType, fmt: str, mode: str) -> None:
    case = make_case(triton_spec(fmt, mode, 4, "several"), BACKEND.device)
    check_against_dense(triton_attention, case, mode, AttentionOptions(), TOLERANCE[fmt])


@pytest.mark.parametrize("fmt", ["fp16", "int4"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize(("window", "sinks"), [(7, 0), (20, 3)])
def test_sliding_window_and_sinks(triton_attention: ModuleType, fmt: str, mode: str, window: int, sinks: int) -> None:
    case = make_case(triton_spec(fmt, mode, 4, "several", seed=3), BACKEND.device)
    options = AttentionOptions(scale=0.3, sliding_window=window, sink_tokens=sinks)
    check_against_dense(triton_attention, case, mode, options, TOLERANCE[fmt])


@pytest.mark.parametrize("fmt", ["bf16", "int2"])
def test_more_splits_than_tiles(triton_attention: ModuleType, fmt: str) -> None:
    """Splits that own no tile store max -inf and sum 0 and must weigh nothing in the reduction."""
    case = make_case(triton_spec(fmt, "decode", 4, "block+1"), BACKEND.device)
    query = case.query
    config = triton_attention.KernelConfig(block_m=16, tile_n=16, quant_splits=3 if fmt in BITS else 0, tail_splits=5)
    output, _ = triton_attention.launch(query, case.kv, AttentionOptions(), config)
    expected = reference.prefill(query, case.kv)
    torch.testing.assert_close(output, expected, atol=TOLERANCE[fmt], rtol=TOLERANCE[fmt])


def test_quantized_decode_config(triton_attention: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantized decode runs one-warp programs over the GQA group's rows, and never more splits than the reduce
    kernel's tile was sized for, however many multiprocessors and blocks there are."""
    case = make_case(triton_spec("int4", "decode", 4, "several"), BACKEND.device)
    wide = torch.zeros((case.kv.batch, 4096), dtype=torch.int32)
    kv = replace(case.kv, quantized=replace(case.kv.quantized, block_table=wide))
    monkeypatch.setattr(triton_attention, "_multiprocessors", lambda device: 10_000)
    config = triton_attention.choose_config(case.query, kv)
    assert (config.block_m, config.num_warps, config.tile_n) == (4, 1, 16)
    assert config.quant_splits == triton_attention.MAX_QUANT_SPLITS


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_prefill_config(triton_attention: ModuleType, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """Prefill takes 64-row tiles over 4 warps in every format but fp32, and splits only until each
    multiprocessor has one program (the sweep in attention_h100.txt)."""
    case = make_case(replace(triton_spec(fmt, "prefill", 4, "several"), q_len=40), BACKEND.device)
    tiles = case.kv.batch * case.kv.kv_heads * 3  # 40 tokens x 4 heads: three 64-row tiles per KV head
    splits = {}
    for multiprocessors in (tiles, 4 * tiles):
        monkeypatch.setattr(triton_attention, "_multiprocessors", lambda device, m=multiprocessors: m)
        config = triton_attention.choose_config(case.query, case.kv)
        assert (config.block_m, config.num_warps) == (64, 4)
        splits[multiprocessors] = config.quant_splits if fmt == "int4" else config.tail_splits
    assert splits[tiles] == 1
    assert fmt != "int4" or splits[4 * tiles] > 1  # (the bf16 case's cache is too short to split)


def test_prefill_spanning_query_tiles(triton_attention: ModuleType) -> None:
    """q_len 20 with a group of 4 fills two 64-row query tiles."""
    spec = replace(triton_spec("int4", "prefill", 4, "several"), q_len=20)
    case = make_case(spec, BACKEND.device)
    check_against_dense(triton_attention, case, "prefill", AttentionOptions(), TOLERANCE["int4"])


def test_quantized_with_bf16_tail(triton_attention: ModuleType) -> None:
    spec = replace(spec_for("int8", "decode", 8, "several"), dtype=torch.bfloat16)
    check_against_dense(
        triton_attention, make_case(spec, BACKEND.device), "decode", AttentionOptions(), TOLERANCE["bf16"]
    )


def test_empty_sequence_attends_to_nothing(triton_attention: ModuleType) -> None:
    case = make_case(CaseSpec(fmt="fp16", lengths=(0, 5)), BACKEND.device)
    output, mass = call(triton_attention, case, "decode", AttentionOptions())
    assert torch.all(output[0] == 0) and torch.all(mass[0] == 0)
    assert not torch.isnan(output).any()


@pytest.mark.parametrize("label", list(shape_errors()))
def test_shape_errors_raise(triton_attention: ModuleType, label: str) -> None:
    case = make_case(spec_for("int4", "prefill", 4, "several"), BACKEND.device)
    with pytest.raises(CacheValidationError):
        shape_errors()[label](triton_attention, case)


def test_unsupported_kernel_shapes_raise(triton_attention: ModuleType) -> None:
    case = make_case(CaseSpec(fmt="fp16", lengths=(5,), head_dim=24), BACKEND.device)
    with pytest.raises(CacheValidationError, match="power of two"):
        triton_attention.decode(case.query[:, :, 0], case.kv)
    case = make_case(CaseSpec(fmt="int2", lengths=(40,), head_dim=32), BACKEND.device)
    assert not triton_attention.shapes_supported(case.kv)
    with pytest.raises(CacheValidationError, match=">= 16"):
        triton_attention.decode(case.query[:, :, 0], case.kv)
    case = make_case(CaseSpec(fmt="fp16", lengths=(5,)), BACKEND.device)
    strided = replace(case.kv, key_cache=case.kv.key_cache.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(CacheValidationError, match="contiguous"):
        triton_attention.decode(case.query[:, :, 0], strided)


def test_plan_is_reused_and_bad_inputs_still_raise(
    triton_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second call with the same layout skips validation, returns a fresh output equal to the first; a call
    whose layout or options differ is validated again."""
    case = make_case(triton_spec("fp16", "decode", 4, "several", seed=5), BACKEND.device)
    query = case.query[:, :, 0]
    validated = []
    monkeypatch.setattr(triton_attention, "validate", lambda *args, **kw: validated.append(args))
    monkeypatch.setattr(triton_attention, "_PLANS", {})
    first = triton_attention.decode(query, case.kv, scale=0.5)
    second = triton_attention.decode(query, case.kv, scale=0.5)
    assert len(validated) == 1 and second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    monkeypatch.undo()
    with pytest.raises(CacheValidationError, match="scale"):
        triton_attention.decode(query, case.kv, scale=-0.5)
    with pytest.raises(CacheValidationError, match="sliding_window"):
        triton_attention.decode(query, case.kv, scale=0.5, sliding_window=True)
    with pytest.raises(CacheValidationError, match="batch"):
        triton_attention.decode(query[:1], case.kv, scale=0.5)


def test_plan_cache_stays_bounded_under_threads(triton_attention: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads decoding with different caches insert and evict plans at once: no error, the bound holds."""
    case = make_case(triton_spec("fp16", "decode", 4, "several", seed=6), BACKEND.device)
    query = case.query[:, :, 0]
    monkeypatch.setattr(triton_attention, "_PLANS", {})
    monkeypatch.setattr(triton_attention, "PLAN_CACHE_SIZE", 2)
    errors: list[BaseException] = []

    def plan_many(worker: int) -> None:
        try:
            for step in range(200):
                triton_attention.cached_plan(query, case.kv, (0.1 + (worker * 200 + step) * 1e-3, None, 0))
        except BaseException as error:  # the test reports it
            errors.append(error)

    threads = [threading.Thread(target=plan_many, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(triton_attention._PLANS) <= 2
