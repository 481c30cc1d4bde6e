"""KVCacheConfig: validation of every field, and dict/JSON round trips."""

from __future__ import annotations

import pytest
import torch

from kv_cache import CacheDeviceError, CacheMode, CacheStrategy, CacheValidationError, KVCacheConfig


def test_defaults_are_valid_and_round_trip() -> None:
    config = KVCacheConfig()
    assert KVCacheConfig.from_dict(config.to_dict()) == config
    assert KVCacheConfig.from_json(config.to_json()) == config


def test_non_default_round_trip() -> None:
    config = KVCacheConfig(
        max_tokens=100,
        block_size=32,
        memory_budget_mb=1.5,
        dtype="bf16",
        device="cpu",
        cache_strategy="lfu",
        cache_mode=CacheMode.INFERENCE,
        enable_profiling=True,
        history_size=7,
    )
    assert config.dtype is torch.bfloat16
    assert config.cache_strategy is CacheStrategy.LFU
    data = config.to_dict()
    assert data["dtype"] == "bfloat16" and data["cache_strategy"] == "lfu"
    assert KVCacheConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_tokens", 0, "max_tokens=0"),
        ("max_tokens", 1.5, "max_tokens=1.5"),
        ("max_tokens", True, "max_tokens=True"),
        ("block_size", 12, "power of two"),
        ("block_size", 2048, "block_size=2048"),
        ("num_blocks", 0, "num_blocks=0"),
        ("memory_budget_mb", -1.0, "memory_budget_mb=-1.0"),
        ("memory_budget_mb", float("nan"), "memory_budget_mb=nan"),
        ("dtype", "int8", "dtype='int8'"),
        ("dtype", torch.int32, "dtype=torch.int32"),
        ("cache_strategy", "fifo", "cache_strategy='fifo'"),
        ("cache_mode", "serving", "cache_mode='serving'"),
        ("enable_profiling", "yes", "enable_profiling='yes'"),
        ("history_size", 0, "history_size=0"),
        ("device", 3, "device=3"),
    ],
)
def test_bad_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(CacheValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        KVCacheConfig(**{field: value})  # type: ignore[arg-type]


def test_num_blocks_and_budget_are_exclusive() -> None:
    with pytest.raises(CacheValidationError, match="set only one"):
        KVCacheConfig(num_blocks=4, memory_budget_mb=1.0)


def test_unknown_keys_are_rejected() -> None:
    with pytest.raises(CacheValidationError, match="unknown config keys"):
        KVCacheConfig.from_dict({"max_tokens": 8, "use_magic": True})


def test_unavailable_device_raises_device_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CacheDeviceError, match=r"device='cuda'.*available: .*cpu"):
        KVCacheConfig(device="cuda")
    with pytest.raises(CacheDeviceError, match="not a device name"):
        KVCacheConfig(device="tpu-ish")


def test_auto_device_resolves_to_an_available_device() -> None:
    device = KVCacheConfig(device="auto").resolved_device()
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert device.type == expected
