"""Attention that reads the paged cache directly: `decode` and `prefill` over a `PagedKV`, in any block format.

Two backends with one signature, tested against each other:

- `Backend.TRITON` (`triton_attention`): split-K flash attention kernels that read the blocks in their stored
  format and dequantize in registers. Needs CUDA tensors and shapes the kernels tile (`triton_attention.
  unsupported_shape`: powers of two >= 16 for head_dim, quantized block and value group; >= 16-channel packed
  parts). Without the attention mass it reads nothing on the host, so a decode step can be captured in a CUDA
  graph (eager launches cost ~100 us of host time each call; see benchmarks/results/attention_notes.md).
- `Backend.REFERENCE` (`reference`): gathers, dequantizes and runs fp32 softmax attention in pure torch; any
  device, any shape. It syncs with the device (it reads lengths on the host) and copies the cache densely.

`Backend.AUTO` (the default) picks Triton when the query is on a CUDA device, `triton` imports and the shapes suit
the kernels; the reference otherwise (CPU, MPS, other head sizes). Importing this package imports neither torch
kernels nor triton; the Triton modules load on first use.

    out = attention.decode(query, kv)                                   # [batch, q_heads, head_dim]
    out, mass = attention.prefill(query, kv, return_attention_mass=True)  # mass [batch, q_heads, seq_len]
"""

from __future__ import annotations

import importlib
import sys
from enum import Enum
from types import ModuleType
from typing import Literal, overload

import torch

from kv_cache.attention import reference
from kv_cache.attention.paged_kv import AttentionOptions, AttentionOutput, PagedKV, QuantizedKV
from kv_cache.errors import CacheValidationError

__all__ = ["AttentionOptions", "Backend", "PagedKV", "QuantizedKV", "decode", "prefill", "select_backend"]


class Backend(str, Enum):
    """Which implementation runs `decode`/`prefill`."""

    AUTO = "auto"
    TRITON = "triton"
    REFERENCE = "reference"


@overload
def decode(
    query: torch.Tensor,
    kv: PagedKV,
    *,
    scale: float | None = ...,
    sliding_window: int | None = ...,
    sink_tokens: int = ...,
    return_attention_mass: Literal[False] = ...,
    backend: Backend | str = ...,
) -> torch.Tensor: ...
@overload
def decode(
    query: torch.Tensor,
    kv: PagedKV,
    *,
    scale: float | None = ...,
    sliding_window: int | None = ...,
    sink_tokens: int = ...,
    return_attention_mass: Literal[True],
    backend: Backend | str = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def decode(
    query: torch.Tensor,
    kv: PagedKV,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    sink_tokens: int = 0,
    return_attention_mass: bool = False,
    backend: Backend | str = Backend.AUTO,
) -> AttentionOutput:
    """Attention of one new query token per sequence over its paged cache (the token is already cached).

    query: `[batch, q_heads, head_dim]` fp32/fp16/bf16, q_heads = kv.kv_heads x group.
    scale: softmax scale, default head_dim ** -0.5. sliding_window / sink_tokens: each query sees the last
    `sliding_window` cache indices up to itself, plus the first `sink_tokens` (both in tokens).
    Returns the output `[batch, q_heads, head_dim]` in the query dtype; with `return_attention_mass` also the
    softmax weight of every cached token, `[batch, q_heads, seq_len]` fp32 (rows sum to 1; seq_len = the longest
    sequence, shorter rows padded with 0).
    """
    module = select_backend(query, kv, backend)
    return module.decode(
        query,
        kv,
        scale=scale,
        sliding_window=sliding_window,
        sink_tokens=sink_tokens,
        return_attention_mass=return_attention_mass,
    )


@overload
def prefill(
    query: torch.Tensor,
    kv: PagedKV,
    *,
    scale: float | None = ...,
    sliding_window: int | None = ...,
    sink_tokens: int = ...,
    return_attention_mass: Literal[False] = ...,
    backend: Backend | str = ...,
) -> torch.Tensor: ...
@overload
def prefill(
    query: torch.Tensor,
    kv: PagedKV,
    *,
    scale: float | None = ...,
    sliding_window: int | None = ...,
    sink_tokens: int = ...,
    return_attention_mass: Literal[True],
    backend: Backend | str = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def prefill(
    query: torch.Tensor,
    kv: PagedKV,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    sink_tokens: int = 0,
    return_attention_mass: bool = False,
    backend: Backend | str = Backend.AUTO,
) -> AttentionOutput:
    """Causal attention of each sequence's last q_len tokens (already cached) over its paged cache.

    query: `[batch, q_heads, q_len, head_dim]`; query i of a row of seq_len tokens sees cache indices
    <= seq_len - q_len + i (and the window/sinks as in `decode`). Returns `[batch, q_heads, q_len, head_dim]` in
    the query dtype; with `return_attention_mass` also the weights averaged over the q_len queries,
    `[batch, q_heads, seq_len]` fp32 (rows sum to 1).
    """
    module = select_backend(query, kv, backend)
    return module.prefill(
        query,
        kv,
        scale=scale,
        sliding_window=sliding_window,
        sink_tokens=sink_tokens,
        return_attention_mass=return_attention_mass,
    )


def select_backend(query: torch.Tensor, kv: PagedKV, backend: Backend | str = Backend.AUTO) -> ModuleType:
    """The backend module that `decode`/`prefill` would run for these inputs (rules in the module docstring)."""
    try:
        choice = backend if isinstance(backend, Backend) else Backend(backend)
    except ValueError:
        raise CacheValidationError(f"backend={backend!r} is not known; use 'auto', 'triton' or 'reference'") from None
    if choice is Backend.REFERENCE:
        return reference
    if choice is Backend.TRITON:
        module = _triton_backend()
        if module is None:
            raise CacheValidationError("backend='triton' needs the triton package; install kv-cache-engine[triton]")
        return module
    on_cuda = isinstance(query, torch.Tensor) and query.device.type == "cuda"
    module = _triton_backend() if on_cuda else None
    if module is not None and isinstance(kv, PagedKV) and module.shapes_supported(kv):
        return module
    return reference


TRITON_MODULE = "kv_cache.attention.triton_attention"


def _triton_backend() -> ModuleType | None:
    """`triton_attention`, imported on first use (then from `sys.modules`); None when triton is not installed."""
    module = sys.modules.get(TRITON_MODULE)  # the per-call path: a dict lookup, not the import machinery
    if module is not None:
        return module
    try:
        return importlib.import_module(TRITON_MODULE)
    except ImportError:
        return None
