"""Device resolution: turn a device spec ("auto", "cpu", "cuda:1", "mps") into an available `torch.device`.

Nothing here runs at import time; CUDA and MPS are only queried when a spec is resolved.
"""

from __future__ import annotations

import torch

from kv_cache.errors import CacheDeviceError


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
