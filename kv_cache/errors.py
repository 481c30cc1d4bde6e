"""The exceptions kv_cache raises.

Every error names what was given, what is allowed, and what to change, so a user can fix the call without
reading our source. All of them derive from `CacheError`, so `except CacheError` catches everything we raise.
"""

from __future__ import annotations


class CacheError(RuntimeError):
    """Base class of every error kv_cache raises."""


class CacheValidationError(CacheError, ValueError):
    """A configuration value or an input tensor is not acceptable (wrong shape, dtype, device, range...)."""


class CacheMemoryError(CacheError, MemoryError):
    """The cache ran out of blocks (or device memory) and could not recover by evicting or offloading."""


class CacheDeviceError(CacheError):
    """A requested device is not available, or tensors live on a device the cache was not built for."""
