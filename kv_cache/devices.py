"""Device resolution: turn a device spec ("auto", "cpu", "cuda:1", "mps") into an available `torch.device`.

Nothing here runs at import time; CUDA and MPS are only queried when a spec is resolved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kv_cache.errors import CacheDeviceError, CacheValidationError


def device_tensor(data: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(data, dtype=dtype)` on `device`. For CUDA it is built in page-locked memory and copied without
    blocking the host: `torch.tensor(..., device="cuda")` copies from pageable memory, which makes the host wait
    until the GPU has drained its queue (the per-step block tables and slots would stall every decode step)."""
    return to_device(torch.tensor(data, dtype=dtype), device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; for CUDA through page-locked memory, without blocking the host (see
    `device_tensor`)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def available_devices() -> list[str]:
    """Names of the devices this process can use, e.g. `["cuda:0", "cuda:1", "cpu"]`."""
    names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if torch.backends.mps.is_available():
        names.append("mps")
    names.append("cpu")
    return names


def resolve_device(spec: str | torch.device) -> torch.device:
    """Resolve `spec` to a usable device: "auto" picks CUDA, then MPS, then CPU.

    Raises `CacheDeviceError` naming the device and what is available when an explicit device cannot be used.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise CacheDeviceError(
            f"device={spec!r} is not a device name; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from exc
    usable = (
        device.type == "cpu"
        or (device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count())
        or (device.type == "mps" and torch.backends.mps.is_available())
    )
    if not usable:
        raise CacheDeviceError(
            f"device={spec!r} is not available on this machine; available: {', '.join(available_devices())} "
            "(or use device='auto')"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def get_device_info(spec: str | torch.device = "auto") -> dict[str, object]:
    """What `spec` resolves to here: `device`, `type`, `name`, and memory in bytes where the backend reports it.

    `total_memory`/`free_memory` come from CUDA (`torch.cuda.mem_get_info`); on CPU and MPS they are None.
    """
    device = resolve_device(spec)
    info: dict[str, object] = {
        "device": str(device),
        "type": device.type,
        "name": "cpu",
        "total_memory": None,
        "free_memory": None,
        "available": available_devices(),
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        info.update(name=torch.cuda.get_device_name(device), total_memory=total, free_memory=free)
    elif device.type == "mps":
        info["name"] = "Apple MPS"
    return info


def speed_settings() -> dict[str, bool]:
    """The process-wide torch settings that trade exactness for speed, as they are now.

    `tf32_matmul` / `tf32_conv`: fp32 matmuls / cuDNN convolutions may run in TF32 on Ampere and later GPUs
    (10-bit mantissa); `cudnn_benchmark`: cuDNN autotunes its algorithms (not deterministic). PyTorch's defaults:
    False, True, False.
    """
    matmul, conv = _tf32_flags()
    return {"tf32_matmul": matmul, "tf32_conv": conv, "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


def enable_speed_settings(tf32: bool = True, cudnn_benchmark: bool = True) -> dict[str, bool]:
    """Opt in to TF32 (fp32 matmuls and cuDNN) and cuDNN autotuning for the whole process; returns
    `speed_settings()` after the change. kv_cache never changes these on import or behind a config: this call is
    the only switch, and every cache's `get_stats()["speed_settings"]` reports the current values. Note that
    PyTorch itself allows TF32 in cuDNN convolutions by default; `tf32=False` turns that off too."""
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    return speed_settings()


def _tf32_flags() -> tuple[bool, bool]:
    """Whether fp32 matmuls and cuDNN may use TF32. Read through torch's legacy flags (what
    `enable_speed_settings` sets); a process that mixed them with the per-backend `fp32_precision` API makes
    those raise, and then the per-backend values answer."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        backends: Any = torch.backends
        return backends.cuda.matmul.fp32_precision == "tf32", backends.cudnn.conv.fp32_precision == "tf32"


def safe_device_transfer(tensor: torch.Tensor, device: str | torch.device, non_blocking: bool = True) -> torch.Tensor:
    """`tensor` on `device` (resolved like a config's device: "auto", "cuda:1", ...); the same tensor if it is
    there already.

    The copy is asynchronous only where that is safe: host-to-device from pinned memory (the host buffer stays
    alive in the returned tensor's stream order). Device-to-host copies are synchronous, because a non-blocking
    one returns before the bytes land and a host read would see garbage.
    """
    if not isinstance(tensor, torch.Tensor):
        raise CacheValidationError(f"tensor must be a torch.Tensor; got {type(tensor).__name__}")
    target = resolve_device(device)
    if tensor.device == target:
        return tensor
    asynchronous = non_blocking and tensor.device.type == "cpu" and tensor.is_pinned() and target.type == "cuda"
    return tensor.to(target, non_blocking=asynchronous)
