"""Triton attention over paged K/V: `decode` and `prefill` with the reference's signature, and their launcher.

One split-K kernel (`triton_kernels.paged_attention_kernel`) serves both: decode is a query tile of one token
whose GQA group fills the rows, prefill tiles the query tokens too. Layouts are in `paged_kv`; this module adds the
kernels' requirements, checked before launch (CacheValidationError otherwise):

- CUDA tensors, or CPU tensors when the kernels were imported under `TRITON_INTERPRET=1` (Triton's interpreter);
- caches, codes, scales, zeros and lengths contiguous; block tables with unit stride along blocks; the query's
  last dimension contiguous;
- head_dim, the quantized block size and the value group size powers of two >= 16, and packed parts and value
  chunks of >= 16 channels (`tl.arange`, `tl.dot` tiles; `unsupported_shape` says which rule fails).

Without `return_attention_mass` the launch reads no data on the host (no device sync), so it can be captured in
a CUDA graph. The mass needs the longest sequence length for its width: one sync, then a second pass.

Host cost per call: these checks, the kernel configuration, the grid and the kernels' scalar and constexpr
arguments depend only on the tensors' shapes, strides, dtypes and devices and on the options, so `cached_plan`
computes them once per distinct key (`LaunchPlan`) and a call then costs a key, a dict lookup, its buffers
(allocated per call: the output is the caller's) and the launches, which after a plan's first go straight to the
compiled kernels' launchers (`launches.Launches`: Triton's own binding of ~50 arguments is skipped).
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from kv_cache.attention import triton_kernels as kernels
from kv_cache.attention.launches import Launches
from kv_cache.attention.paged_kv import AttentionOptions, AttentionOutput, PagedKV, QuantizedKV, validate
from kv_cache.errors import CacheValidationError
from kv_cache.quantizer import SUPPORTED_BITS

LOG2_E = 1.4426950408889634
PROGRAMS_PER_SM = 4  # decode: split until the grid has about this many programs per multiprocessor
PREFILL_PROGRAMS_PER_SM = 1  # prefill: query tiles already fill the GPU, and each split adds a reduce
MIN_TILES_PER_SPLIT = 2
# Decode over quantized blocks: one warp per program over 16-token tiles, just the GQA group's rows (the dot pads
# M to 16 inside the instruction), so nothing crosses warps; as many warps per multiprocessor as 4 programs of 4.
SMALL_TILE_ROWS = 4
SMALL_TILE_TOKENS = 16
SMALL_PROGRAMS_PER_SM = 16
MAX_QUANT_SPLITS = 128  # keeps the reduce kernel's tile of splits (the next power of two) at <= 256 rows


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. `choose_config` picks them; tests and benchmarks may pass their own.

    block_m: query rows per program (GQA heads x query tokens, >= 16, a power of two).
    tile_n: tail tokens per tile (a power of two >= 16). A quantized tile is one quantized block.
    quant_splits, tail_splits: programs per (sequence, KV head, query tile) over the quantized blocks and the tail.
    """

    block_m: int
    tile_n: int
    quant_splits: int
    tail_splits: int
    num_warps: int = 4
    num_stages: int = 2


def decode(
    query: torch.Tensor,
    kv: PagedKV,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    sink_tokens: int = 0,
    return_attention_mass: bool = False,
) -> AttentionOutput:
    """Attention of one new query token per sequence; same contract as `reference.decode`.

    query: `[batch, q_heads, head_dim]`. Returns `[batch, q_heads, head_dim]` in the query dtype (and the mass
    `[batch, q_heads, seq_len]` fp32 if asked).
    """
    plan = cached_plan(query, kv, (scale, sliding_window, sink_tokens))
    output, mass = run(plan, query, kv, return_attention_mass)
    return (output, mass) if mass is not None else output


def prefill(
    query: torch.Tensor,
    kv: PagedKV,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    sink_tokens: int = 0,
    return_attention_mass: bool = False,
) -> AttentionOutput:
    """Causal attention of the last q_len cached tokens; same contract as `reference.prefill`.

    query: `[batch, q_heads, q_len, head_dim]`. Returns `[batch, q_heads, q_len, head_dim]` in the query dtype
    (and the mass averaged over the queries, `[batch, q_heads, seq_len]` fp32, if asked).
    """
    plan = cached_plan(query, kv, (scale, sliding_window, sink_tokens), query_dims=4)
    output, mass = run(plan, query, kv, return_attention_mass)
    return (output, mass) if mass is not None else output


def launch(
    query: torch.Tensor, kv: PagedKV, options: AttentionOptions, config: KernelConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernels with `config` (tests, benchmarks), or with the cached plan (config None: `choose_config`).

    query: `[batch, q_heads, q_len, head_dim]`. Returns (output like query, mass `[batch, q_heads, seq_len]` fp32
    or None).
    """
    if config is None:
        plan = cached_plan(query, kv, (options.scale, options.sliding_window, options.sink_tokens), query_dims=4)
    else:
        validate(query, kv, query_dims=4)
        plan = make_plan(query, kv, options, config)
    return run(plan, query, kv, options.return_attention_mass)


@dataclass(frozen=True)
class LaunchPlan:
    """What a launch needs beyond the tensors: everything that follows from their shapes, dtypes, devices and
    strides and from the options, computed (and checked) once per distinct key by `cached_plan`.

    direct: one split over full-precision blocks, so the kernel writes the output itself (no partials, no
    reduce). rows: query rows, batch x q_heads x q_len. split_args: the kernel's integer and float arguments
    after the tensors, with mass_len (the only one read from data) at `MASS_LEN_ARG`. constants: its constexprs
    and launch options, MODE excepted. launches: the compiled kernels of this plan's launches (`Launches`: the
    plan fixes every argument Triton specialises on but the tensors' alignment, which `Launches` adds).
    """

    config: KernelConfig
    grid: tuple[int, int, int]
    direct: bool
    rows: int
    head_dim: int
    output_shape: tuple[int, ...]
    split_args: tuple[float, ...]
    constants: dict[str, Any]
    launches: Launches = field(default_factory=Launches, compare=False, repr=False)

    @property
    def num_splits(self) -> int:
        return self.config.quant_splits + self.config.tail_splits


MASS_LEN_ARG = 7  # index of mass_len in `LaunchPlan.split_args`
PLAN_CACHE_SIZE = 64  # plans kept, newest last: decode meets a new block-table width every block_size tokens
_PLANS: dict[tuple, LaunchPlan] = {}
_PLANS_LOCK = threading.Lock()  # inserts and evictions (threads may decode with different caches at once)


def cached_plan(
    query: torch.Tensor, kv: PagedKV, options: tuple[float | None, int | None, int], query_dims: int = 3
) -> LaunchPlan:
    """The launch plan of these inputs, built (after `validate` and `check_kernel_inputs`) on the first call with
    their key, then looked up: validity depends only on what the key holds (no check here reads data).

    query: `[batch, q_heads, head_dim]` (query_dims=3) or `[batch, q_heads, q_len, head_dim]` (4);
    options: (scale, sliding_window, sink_tokens) as `decode` takes them.
    """
    key = _plan_key(query, kv, options, query_dims)
    try:
        plan = _PLANS.get(key) if key is not None else None
    except TypeError:  # an unhashable option: validation rejects it
        key = plan = None
    if plan is None:
        validate(query, kv, query_dims=query_dims)
        plan = make_plan(query, kv, AttentionOptions(*options))
        if key is not None:
            with _PLANS_LOCK:
                while len(_PLANS) >= PLAN_CACHE_SIZE:
                    del _PLANS[next(iter(_PLANS))]
                _PLANS[key] = plan
    return plan


def _plan_key(query: torch.Tensor, kv: PagedKV, options: tuple, query_dims: int) -> tuple | None:
    """Shape, strides, dtype and device of every tensor, and the options with their types; None for inputs that
    are not tensors and a `PagedKV` (validation says why)."""
    if not isinstance(query, torch.Tensor) or type(kv) is not PagedKV:
        return None
    part = kv.quantized
    tensors = [query, kv.key_cache, kv.value_cache, kv.block_table, kv.seq_lens]
    if part is not None:
        if type(part) is not QuantizedKV:
            return None
        tensors += [part.key_codes, part.key_scale, part.key_zero, part.value_codes, part.value_scale]
        tensors += [part.value_zero, part.block_table, part.seq_lens]
    try:
        layout = tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors)
    except (AttributeError, TypeError):
        return None
    return query_dims, layout, options, tuple(map(type, options))


def make_plan(
    query: torch.Tensor, kv: PagedKV, options: AttentionOptions, config: KernelConfig | None = None
) -> LaunchPlan:
    """Check what the kernels need on top of `paged_kv.validate` and plan the launch (see `LaunchPlan`).

    query: `[batch, q_heads, head_dim]` or `[batch, q_heads, q_len, head_dim]`; it must have passed `validate`.
    """
    check_kernel_inputs(query, kv)
    query4 = query if query.dim() == 4 else query.unsqueeze(2)
    batch, q_heads, q_len, head_dim = query4.shape
    config = config or choose_config(query4, kv)
    group = q_heads // kv.kv_heads
    group_pad = triton.next_power_of_2(group)
    part = kv.quantized
    window = options.sliding_window
    qtable_stride = part.block_table.stride(0) if part is not None else 0
    grid = (
        batch * kv.kv_heads,
        config.quant_splits + config.tail_splits,
        math.ceil(q_len / (config.block_m // group_pad)),
    )
    split_args = (
        *query4.stride()[:3], kv.block_table.stride(0), qtable_stride, kv.kv_heads, q_len, 0,
        options.softmax_scale(head_dim) * LOG2_E, window or 0, options.sink_tokens,
        config.quant_splits, config.tail_splits,
    )  # fmt: skip
    constants = dict(
        GROUP=group, GROUP_PAD=group_pad, BLOCK_M=config.block_m, HEAD_DIM=head_dim, BLOCK_SIZE=kv.block_size,
        TILE_N=config.tile_n, QBLOCK=part.block_size if part else 16, BITS=part.bits if part else 8,
        VGROUP=part.group_size if part else 16, VCHUNK=_value_chunk(part, head_dim), HAS_QUANT=part is not None,
        HAS_WINDOW=window is not None, DOT_DTYPE=_dot_dtype(kv.key_cache.dtype),
        PRECISION="ieee" if kv.key_cache.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    direct = part is None and config.quant_splits + config.tail_splits == 1
    rows = batch * q_heads * q_len
    return LaunchPlan(config, grid, direct, rows, head_dim, tuple(query.shape), split_args, constants)


def run(
    plan: LaunchPlan, query: torch.Tensor, kv: PagedKV, return_attention_mass: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch `plan` on these tensors: (output `plan.output_shape` in the query dtype, mass or None).

    Every buffer is allocated per call (the output is the caller's; the partials are cheap from the caching
    allocator, and per-call buffers stay correct across streams and inside CUDA graphs): lse `[rows]` fp32
    (log2), and unless `plan.direct` the splits' accumulators `[rows * splits, head_dim]` fp32 with their
    (max, sum) `[rows * splits, 2]`. Reads no data on the host unless `return_attention_mass`.
    """
    device = query.device
    output = torch.empty(plan.output_shape, dtype=query.dtype, device=device)
    lse = torch.empty(plan.rows, dtype=torch.float32, device=device)
    partial = stats = None
    if not plan.direct:
        partial = torch.empty((plan.rows * plan.num_splits, plan.head_dim), dtype=torch.float32, device=device)
        stats = torch.empty((plan.rows * plan.num_splits, 2), dtype=torch.float32, device=device)
    part = kv.quantized
    # Unused pointers are None: Triton binds them as constexprs (no pointer specialization, not passed on).
    quant = (
        (part.key_codes, part.key_scale, part.key_zero, part.value_codes, part.value_scale, part.value_zero,
         part.block_table, part.seq_lens) if part is not None else (None,) * 8
    )  # fmt: skip
    tensors = (kv.key_cache, kv.value_cache, kv.block_table, kv.seq_lens, *quant)
    mode = (kernels.MODE_DIRECT if plan.direct else kernels.MODE_SPLIT).value
    plan.launches.launch(
        kernels.paged_attention_kernel, plan.grid, (query, output, lse, partial, stats, None, *tensors,
        *plan.split_args), {"MODE": mode, **plan.constants}, key=mode,
    )  # fmt: skip
    if partial is not None:
        plan.launches.launch(
            kernels.reduce_splits_kernel, (plan.rows,), (partial, stats, output, lse, plan.num_splits),
            {"HEAD_DIM": plan.head_dim, "SPLITS_PAD": triton.next_power_of_2(plan.num_splits)}, key="reduce",
        )  # fmt: skip
    if not return_attention_mass:
        return output, None
    batch, q_heads = plan.output_shape[:2]
    mass_len = int(kv.total_lens().max()) if batch else 0
    mass = torch.zeros((batch, q_heads, mass_len), dtype=torch.float32, device=device)
    args = (*plan.split_args[:MASS_LEN_ARG], mass_len, *plan.split_args[MASS_LEN_ARG + 1 :])
    kernels.paged_attention_kernel[plan.grid](
        query, None, lse, None, None, mass, *tensors, *args, MODE=kernels.MODE_MASS.value, **plan.constants
    )
    return output, mass


def _dot_dtype(cache_dtype: torch.dtype) -> tl.dtype:
    """The dtype the tail's dot operands take: the cache's, except bf16 under the interpreter.

    Triton 3.9's interpreter returns garbage for a bf16 `tl.dot` (its loads and stores of bf16 are right), so
    there the operands go to fp32, which holds every bf16 value exactly.
    """
    if cache_dtype == torch.bfloat16:
        return tl.float32 if kernels_interpreted() else tl.bfloat16
    return tl.float16 if cache_dtype == torch.float16 else tl.float32


def _value_chunk(part: QuantizedKV | None, head_dim: int) -> int:
    """Channels per value accumulator: within one packed part and one scale group."""
    if part is None:
        return 16
    return min(head_dim * part.bits // 8, part.group_size)


def choose_config(query: torch.Tensor, kv: PagedKV) -> KernelConfig:
    """Launch parameters from the shapes alone (no data read): split until the grid fills the GPU.

    query: `[batch, q_heads, q_len, head_dim]`. Row tiles stay at 16 rows for fp32 caches (bigger ones spill
    registers; checked with the sm_90 compiler's resource report), else up to 64 rows over 4 warps. Quantized tiles
    of <= 4 rows (decode with GQA groups <= 4) take one warp each (see the constants above): at INT4, B=8, T=16k
    that measured 105 us against 173 us for 16-row tiles over 4 warps (attention_notes.md). Prefill of 512 tokens
    after 2048 (H100, prefill sweep in attention_h100.txt): 64 rows, 4 warps and one split measured 75 us in bf16
    (= SDPA; 8 warps and 2 splits: 115 us) and 201 us in INT4 (16 rows: 454 us; 128 rows over 8 warps: 245 us).
    """
    batch, q_heads, q_len, _ = query.shape
    group_pad = triton.next_power_of_2(q_heads // kv.kv_heads)
    fp32 = kv.key_cache.dtype == torch.float32
    quantized = kv.quantized is not None
    min_rows = SMALL_TILE_ROWS if quantized else 16
    max_rows = 16 if fp32 else 64
    block_m = max(min_rows, min(group_pad * triton.next_power_of_2(q_len), max(max_rows, group_pad)))
    small = quantized and block_m <= SMALL_TILE_ROWS
    num_warps = 1 if small else 8 if fp32 else 4
    per_sm = SMALL_PROGRAMS_PER_SM if small else PROGRAMS_PER_SM if q_len == 1 else PREFILL_PROGRAMS_PER_SM
    query_tiles = math.ceil(q_len / (block_m // group_pad))
    # One wave: as many splits as fill the GPU without a partial second wave (measured on the H100, bf16 at B=32:
    # 2 splits 0.97x SDPA where the rounded-up 3 gave 0.87x; attention_notes.md, run 6).
    wanted = max(1, per_sm * _multiprocessors(query.device) // (batch * kv.kv_heads * query_tiles))
    tile_n = SMALL_TILE_TOKENS if small else 64 if kv.block_table.shape[1] * kv.block_size > 64 and not fp32 else 32
    tail_tiles = math.ceil(kv.block_table.shape[1] * kv.block_size / tile_n)
    tail_splits = max(1, min(wanted, math.ceil(tail_tiles / MIN_TILES_PER_SPLIT)))
    quant_splits = 0
    if kv.quantized is not None:
        blocks = kv.quantized.block_table.shape[1]
        quant_splits = max(1, min(wanted, MAX_QUANT_SPLITS, math.ceil(blocks / MIN_TILES_PER_SPLIT)))
        tail_splits = max(1, min(tail_splits, math.ceil(tail_tiles / 4)))  # the tail is short: few splits
    return KernelConfig(block_m, tile_n, quant_splits, tail_splits, num_warps=num_warps)


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one: fewer is faster
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def kernels_interpreted() -> bool:
    """Whether the kernels were built by Triton's CPU interpreter (`TRITON_INTERPRET=1` when imported)."""
    return bool(kernels.INTERPRETED.value)


def check_kernel_inputs(query: torch.Tensor, kv: PagedKV) -> None:
    """Raise CacheValidationError unless the kernels can read these tensors (see the module docstring)."""
    if query.device.type != "cuda" and not kernels_interpreted():
        raise CacheValidationError(
            f"the Triton backend runs on CUDA tensors, got {query.device}; use backend='reference', or set "
            "TRITON_INTERPRET=1 before importing kv_cache.attention's Triton modules to interpret them on the CPU"
        )
    if query.stride(-1) != 1:
        raise CacheValidationError("query must be contiguous in head_dim (stride 1); call .contiguous()")
    reason = unsupported_shape(kv)
    if reason is not None:
        raise CacheValidationError(f"the Triton backend cannot run this cache: {reason}; use backend='reference'")
    tensors = {"key_cache": kv.key_cache, "value_cache": kv.value_cache, "seq_lens": kv.seq_lens}
    tables = {"block_table": kv.block_table}
    if kv.quantized is not None:
        part = kv.quantized
        tensors.update({name: getattr(part, name) for name in part.__dataclass_fields__ if name != "block_table"})
        tables["quantized.block_table"] = part.block_table
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise CacheValidationError(f"{name} must be contiguous for the Triton backend; call .contiguous()")
    for name, table in tables.items():
        if table.shape[1] > 1 and table.stride(1) != 1:
            raise CacheValidationError(f"{name} must have stride 1 along blocks; call .contiguous()")


def shapes_supported(kv: PagedKV) -> bool:
    """Whether the kernels can take these shapes (see `unsupported_shape`)."""
    return unsupported_shape(kv) is None


def unsupported_shape(kv: PagedKV) -> str | None:
    """Why the kernels cannot take these shapes, or None.

    head_dim, the quantized block size and the value group size must be powers of two >= 16 (`tl.arange`), and
    every `tl.dot` needs >= 16 along each side: a packed part (head_dim * bits / 8 channels) and a value chunk
    (one part within one group) must hold >= 16 channels, with at most 4 chunks per head.
    """
    part = kv.quantized
    if part is None:
        return _unsupported_sizes(kv.key_cache.shape[-1], None)
    codes = part.key_codes.shape
    return _unsupported_sizes(kv.key_cache.shape[-1], (codes[1], codes[-1], part.value_scale.shape[-1]))


@functools.lru_cache(maxsize=64)
def _unsupported_sizes(head_dim: int, quantized: tuple[int, int, int] | None) -> str | None:
    """`unsupported_shape` from the sizes alone; quantized: (block_size, packed_dim, value groups) or None."""
    if not _is_tile_size(head_dim):
        return f"head_dim={head_dim} must be a power of two >= 16"
    if quantized is None:
        return None
    block_size, packed, groups = quantized
    bits = packed * 8 // head_dim
    if bits not in SUPPORTED_BITS or packed * 8 != head_dim * bits:
        return f"packed_dim={packed} packs head_dim={head_dim} at no supported width"
    group_size = head_dim // groups if groups else 0
    for name, size in {"quantized block_size": block_size, "value group_size": group_size}.items():
        if not _is_tile_size(size):
            return f"{name}={size} must be a power of two >= 16"
    chunk = min(packed, group_size)
    if packed < 16 or chunk < 16 or chunk * 4 < head_dim:
        return (
            f"INT{bits} with head_dim={head_dim} and value group_size={group_size} gives packed parts of {packed} "
            f"channels and value chunks of {chunk}; both must be >= 16 and >= head_dim / 4"
        )
    return None


def _is_tile_size(value: int) -> bool:
    return value >= 16 and value & (value - 1) == 0
