"""Host (Python) time of one decode attention call per layer, measured on the CPU without launching kernels.

The Triton launcher runs on CPU tensors when its kernels were imported under `TRITON_INTERPRET=1` (set below,
before triton is imported). The two jitted kernels are replaced by a recorder whose `[grid](...)` stores the
launch's arguments and returns, so what is timed is everything up to the launch: dispatch, validation,
configuration, buffers and the argument lists. Triton's own share of a launch is then estimated by timing its
argument binder (specialization and cache key; Triton's `JITFunction.run` does this every launch) on the
recorded arguments, compiled for sm_90. Its C launcher and the driver call are not measured (no GPU here).

Shape: the generate benchmark's decode step (B=32, 32 query / 8 KV heads, head_dim 64, 1,100 cached tokens),
bf16 (16-token blocks) and INT4 (64-token blocks, the newest 128 to 191 tokens in bf16).

    TRITON_INTERPRET=1 is set by this script:  .venv/bin/python benchmarks/attention_host.py
    (from a copy of the repository: PYTHONPATH=. so that its `kv_cache` is imported, not the installed one)

With `--cuda` (on a GPU; the interpreter is not set) the same two decode calls run for real, kernels launched:
the best over repeats of the mean wall time per call of `triton_attention.decode` with its cached plan, i.e. the
whole host path including Triton's launches (the GPU keeps up at this size: the call is host-bound).
"""

from __future__ import annotations

import os
import sys

if "--cuda" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the launcher accepts CPU tensors

import argparse
import dataclasses
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

BATCH, Q_HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 64
TOKENS = 1100
H100_MULTIPROCESSORS = 132


class LaunchRecorder:
    """Stands in for a jitted kernel: `kernel[grid](*args, **kwargs)` records the launch and returns."""

    def __init__(self) -> None:
        self.launches: list[tuple[tuple, tuple, dict]] = []

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.launches.append((grid, args, kwargs))
            del self.launches[:-1]  # the last launch only

        return launch


def make_kv(fmt: str) -> tuple[torch.Tensor, Any]:
    """query `[BATCH, Q_HEADS, HEAD_DIM]` bf16 and a `PagedKV` of TOKENS tokens per row in `fmt` (bf16 or int4)."""
    from kv_cache.attention import PagedKV, QuantizedKV

    query = torch.randn(BATCH, Q_HEADS, 1, HEAD_DIM, dtype=torch.bfloat16).transpose(1, 2)[:, 0]  # as HF slices
    block = 16 if fmt == "bf16" else 64
    quant_tokens = 0 if fmt == "bf16" else (TOKENS - 128) // 64 * 64
    tail_blocks = -(-(TOKENS - quant_tokens) // block)
    pool = torch.zeros(BATCH * tail_blocks, block, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    table = torch.arange(BATCH * tail_blocks, dtype=torch.int64).reshape(BATCH, tail_blocks)
    lens = torch.full((BATCH,), TOKENS - quant_tokens, dtype=torch.int32)
    quantized = None
    if quant_tokens:
        blocks = quant_tokens // 64
        codes = torch.zeros(BATCH * blocks, 64, KV_HEADS, HEAD_DIM // 2, dtype=torch.uint8)
        stats = torch.zeros(BATCH * blocks, KV_HEADS, HEAD_DIM, dtype=torch.float16)
        value_stats = torch.zeros(BATCH * blocks, 64, KV_HEADS, 1, dtype=torch.float16)
        quantized = QuantizedKV(
            codes,
            stats,
            stats.clone(),
            codes.clone(),
            value_stats,
            value_stats.clone(),
            torch.arange(BATCH * blocks, dtype=torch.int64).reshape(BATCH, blocks),
            torch.full((BATCH,), quant_tokens, dtype=torch.int32),
        )
    return query, PagedKV(pool, pool.clone(), table, lens, quantized)


def per_call_us(function: Callable[[], object], calls: int, repeats: int) -> float:
    """The best over `repeats` of the mean time of `calls` calls, in microseconds (the machine is shared)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            function()
        times.append((time.perf_counter_ns() - start) / calls / 1000)
    return min(times)


def triton_binder_us(recorder: LaunchRecorder, jitted: Any, calls: int, repeats: int) -> float:
    """Triton's per-launch argument binding + cache key for the recorded launch, on an sm_90 backend."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    function = JITFunction(jitted.fn)
    binder = create_function_from_signature(
        function.signature, function.params, make_backend(GPUTarget("cuda", 90, 32))
    )
    _, args, kwargs = recorder.launches[-1]
    key_cache: dict = {}

    def bind() -> None:
        _, specialization, options = binder(*args, **kwargs)
        compute_cache_key(key_cache, specialization, options)

    return per_call_us(bind, calls, repeats)


def hf_call(query: torch.Tensor, kv: Any) -> Callable[[], object]:
    """`hf_attention.paged_attention` of one decode layer over a stand-in cache whose store returns `kv`."""
    from kv_cache import hf_attention

    store = SimpleNamespace(paged_kv=lambda seq_ids, layer: kv)
    cache = SimpleNamespace(
        seq_ids=list(range(BATCH)), store=store, evictor=None, config=None, graph_step=None, low_rank=None
    )
    module = SimpleNamespace(layer_idx=3)
    hf_query = query[:, :, None]  # [batch, q_heads, 1, head_dim]

    def call() -> object:
        hf_attention.hand_off(cache, 3)  # type: ignore[arg-type]
        return hf_attention.paged_attention(module, hf_query, hf_query, hf_query, None, scaling=0.125)  # type: ignore[arg-type]

    return call


def on_cuda(value: Any) -> Any:
    """A tensor, or a dataclass of tensors (`PagedKV`, `QuantizedKV`), moved to the GPU."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: on_cuda(getattr(value, f.name)) for f in dataclasses.fields(value)}
        )
    return value.cuda() if isinstance(value, torch.Tensor) else value


def cuda_main(calls: int, repeats: int) -> None:
    """Wall time per real decode call on the GPU, per format."""
    from kv_cache.attention import triton_attention

    print(f"host us per decode call on {torch.cuda.get_device_name()}, kernels launched (B={BATCH}, {TOKENS} tokens)")
    for fmt in ("bf16", "int4"):
        query, kv = make_kv(fmt)
        query, kv = query.cuda(), on_cuda(kv)

        def call(q: torch.Tensor = query, k: Any = kv) -> object:
            return triton_attention.decode(q, k, scale=0.125)

        us = per_call_us(call, calls, repeats)
        torch.cuda.synchronize()
        print(f"{fmt:8}{us:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cuda", action="store_true", help="launch on the GPU (see the module docstring)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cuda:
        cuda_main(args.calls, args.repeats)
        return

    from kv_cache import attention
    from kv_cache.attention import triton_attention
    from kv_cache.attention import triton_kernels as kernels

    jitted = {"paged_attention_kernel": kernels.paged_attention_kernel, "reduce": kernels.reduce_splits_kernel}
    split, reduce = LaunchRecorder(), LaunchRecorder()
    kernels.paged_attention_kernel, kernels.reduce_splits_kernel = split, reduce  # type: ignore[assignment]
    triton_attention._multiprocessors = lambda device: H100_MULTIPROCESSORS  # the device's split choice
    real = {name: getattr(attention, name) for name in ("decode", "prefill", "select_backend")}

    def auto_as_on_cuda(query: torch.Tensor, kv: Any, backend: Any = None) -> Any:
        """Backend.AUTO's choice as on a CUDA device (the device check aside): Triton, if the shapes suit it."""
        module = attention._triton_backend()
        assert module is not None and isinstance(kv, attention.PagedKV) and module.shapes_supported(kv)
        return module

    print(f"host us per decode call (B={BATCH}, {Q_HEADS}/{KV_HEADS} heads, head_dim {HEAD_DIM}, {TOKENS} tokens)")
    print(f"{'format':8}{'backend':>10}{'dispatch':>10}{'hf total':>10}{'hf own':>8}{'binder':>8}{'args':>6}")
    for fmt in ("bf16", "int4"):
        query, kv = make_kv(fmt)
        backend = per_call_us(
            lambda q=query, k=kv: triton_attention.decode(q, k, scale=0.125), args.calls, args.repeats
        )
        attention.select_backend = auto_as_on_cuda  # type: ignore[assignment]
        dispatch = per_call_us(lambda q=query, k=kv: attention.decode(q, k, scale=0.125), args.calls, args.repeats)
        hf_total = per_call_us(hf_call(query, kv), args.calls, args.repeats)
        attention.decode = attention.prefill = lambda q, k, **o: q  # type: ignore[assignment]
        hf_own = per_call_us(hf_call(query, kv), args.calls, args.repeats)
        for name, function in real.items():
            setattr(attention, name, function)
        binder = triton_binder_us(split, jitted["paged_attention_kernel"], args.calls, args.repeats)
        if reduce.launches:
            binder += triton_binder_us(reduce, jitted["reduce"], args.calls, args.repeats)
        launched = [*split.launches[-1:], *reduce.launches[-1:]]
        arg_count = sum(len(a) + len(k) for _, a, k in launched)
        print(f"{fmt:8}{backend:10.1f}{dispatch:10.1f}{hf_total:10.1f}{hf_own:8.1f}{binder:8.1f}{arg_count:6d}")
    print(
        "backend: triton_attention.decode up to the launches; dispatch: attention.decode with Backend.AUTO choosing\n"
        "Triton as on CUDA; hf total: hf_attention.paged_attention with that dispatch; hf own: the same with\n"
        "attention.decode/prefill stubbed;\n"
        "binder: Triton's argument binding + cache key for the launches (not measured above); args: their count."
    )


if __name__ == "__main__":
    main()
