"""Facts about tensors for users and reports: memory, a one-line description, and key/value shape validation.

format_memory_size(3 * 2**30)                      # '3.00 GiB'
calculate_tensor_memory_mb(key, value)             # MiB of their elements
get_tensor_info(key)                               # shape, dtype, device, memory, layout flags
validate_tensor_shapes(key, value, kv_heads=8)     # CacheValidationError naming what is wrong
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kv_cache.block_io import StateSpec, check_states
from kv_cache.errors import CacheValidationError

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_memory_size(num_bytes: float) -> str:
    """`num_bytes` in binary units with two decimals ("512 B", "1.50 KiB", "3.00 GiB"); negative sizes keep
    their sign."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, (int, float)) or not math.isfinite(num_bytes):
        raise CacheValidationError(f"num_bytes={num_bytes!r} must be a finite number of bytes")
    size, unit = abs(float(num_bytes)), 0
    while size >= 1024 and unit < len(_UNITS) - 1:
        size, unit = size / 1024, unit + 1
    sign = "-" if num_bytes < 0 else ""
    return f"{sign}{int(size)} B" if unit == 0 else f"{sign}{size:.2f} {_UNITS[unit]}"


def calculate_tensor_memory_mb(*tensors: torch.Tensor) -> float:
    """MiB of the elements of `tensors` (numel x element size: what they hold, not the storage they view)."""
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise CacheValidationError(f"tensors[{index}] must be a torch.Tensor; got {type(tensor).__name__}")
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def get_tensor_info(tensor: torch.Tensor) -> dict[str, Any]:
    """`shape`, `dtype`, `device`, `numel`, `memory_mb`, `memory` (formatted), `contiguous`, `requires_grad`,
    `pinned` (host memory page-locked) of one tensor; dtype and device as strings, so the dict is JSON-ready."""
    memory_mb = calculate_tensor_memory_mb(tensor)
    return {
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "device": str(tensor.device),
        "numel": tensor.numel(),
        "memory_mb": memory_mb,
        "memory": format_memory_size(memory_mb * 2**20),
        "contiguous": tensor.is_contiguous(),
        "requires_grad": tensor.requires_grad,
        "pinned": tensor.device.type == "cpu" and tensor.is_pinned(),
    }


def validate_tensor_shapes(
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    batch: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
) -> None:
    """Raise `CacheValidationError` unless `key` and `value` are what a cache accepts: dense float tensors
    (fp32/fp16/bf16, the same dtype and device) of one shape `[batch, kv_heads, tokens, head_dim]`, matching
    the given `batch`, `kv_heads` and `head_dim` where they are not None. The caches run the same check."""
    check_states(key, value, StateSpec(batch=None, block_format=None, dtype=None, device=None, finite=False))
    if key.device != value.device:
        raise CacheValidationError(f"key is on {key.device} but value on {value.device}; expected one device")
    expectations = (("batch", batch, 0), ("kv_heads", kv_heads, 1), ("head_dim", head_dim, 3))
    for name, expected, got in ((name, expected, key.shape[dim]) for name, expected, dim in expectations):
        if expected is not None and got != expected:
            raise CacheValidationError(f"key has {name}={got}; expected {name}={expected}")
