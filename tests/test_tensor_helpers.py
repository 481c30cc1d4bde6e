"""The seed's helper functions: memory sizes, tensor facts, key/value validation, device transfers, and the
opt-in speed settings (never changed on import; reported in every cache's stats)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kv_cache import (
    BaseKVCache,
    CacheDeviceError,
    CacheValidationError,
    KVCacheConfig,
    calculate_tensor_memory_mb,
    format_memory_size,
    get_tensor_info,
    safe_device_transfer,
    speed_settings,
    validate_tensor_shapes,
)
from kv_cache.devices import device_tensor


@pytest.mark.parametrize(
    ("num_bytes", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1536, "1.50 KiB"),
        (3 * 2**30, "3.00 GiB"),
        (-2048, "-2.00 KiB"),
        (2**60, "1024.00 PiB"),
    ],
)
def test_format_memory_size(num_bytes: int, text: str) -> None:
    assert format_memory_size(num_bytes) == text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "12", None, True])
def test_format_memory_size_refuses_what_is_not_a_size(bad: object) -> None:
    with pytest.raises(CacheValidationError, match=r"num_bytes=.* must be a finite number of bytes"):
        format_memory_size(bad)  # type: ignore[arg-type]


def test_tensor_memory_and_info() -> None:
    key = torch.zeros(2, 8, 1024, 64, dtype=torch.bfloat16)  # 2 MiB
    value = torch.zeros(2, 8, 1024, 64, dtype=torch.float32)  # 4 MiB
    assert calculate_tensor_memory_mb(key, value) == 6.0
    assert calculate_tensor_memory_mb(key[:, :, :512]) == 1.0  # what a view holds, not the storage it views
    info = get_tensor_info(key.transpose(1, 2))
    assert info == {
        "shape": [2, 1024, 8, 64],
        "dtype": "bfloat16",
        "device": "cpu",
        "numel": 2**20,
        "memory_mb": 2.0,
        "memory": "2.00 MiB",
        "contiguous": False,
        "requires_grad": False,
        "pinned": False,
    }
    json.dumps(info)
    with pytest.raises(CacheValidationError, match=r"tensors\[1\] must be a torch.Tensor; got list"):
        calculate_tensor_memory_mb(key, [1.0])  # type: ignore[arg-type]


def test_validate_tensor_shapes_accepts_what_a_cache_accepts() -> None:
    key = torch.randn(2, 4, 7, 16)
    validate_tensor_shapes(key, key.clone(), batch=2, kv_heads=4, head_dim=16)
    cache = BaseKVCache(KVCacheConfig(device="cpu"))
    cache.forward(key, key.clone())  # the same check, run by the cache


@pytest.mark.parametrize(
    ("key", "value", "expected", "message"),
    [
        (torch.randn(4, 7, 16), torch.randn(4, 7, 16), {}, r"expected 4 dims \[batch, kv_heads, tokens, head_dim\]"),
        (torch.randn(1, 4, 7, 16), torch.randn(1, 4, 6, 16), {}, "value shape .* differs from key shape"),
        (torch.randn(1, 4, 7, 16), torch.randn(1, 4, 7, 16).half(), {}, "dtypes are torch.float32/torch.float16"),
        (torch.ones(1, 4, 7, 16, dtype=torch.int32), torch.ones(1, 4, 7, 16, dtype=torch.int32), {}, "expected one of"),
        (
            torch.randn(1, 4, 7, 16),
            torch.randn(1, 4, 7, 16),
            {"kv_heads": 8},
            "key has kv_heads=4; expected kv_heads=8",
        ),
        (
            torch.randn(1, 4, 7, 16),
            torch.randn(1, 4, 7, 16),
            {"head_dim": 32},
            "key has head_dim=16; expected head_dim=32",
        ),
        (torch.randn(1, 4, 7, 16), torch.randn(1, 4, 7, 16), {"batch": 3}, "key has batch=1; expected batch=3"),
        ("key", torch.randn(1, 4, 7, 16), {}, "key and value must be tensors; got str, Tensor"),
    ],
)
def test_validate_tensor_shapes_names_what_is_wrong(
    key: torch.Tensor, value: torch.Tensor, expected: dict[str, int], message: str
) -> None:
    with pytest.raises(CacheValidationError, match=message):
        validate_tensor_shapes(key, value, **expected)


def test_safe_device_transfer() -> None:
    tensor = torch.randn(3, 5)
    assert safe_device_transfer(tensor, "cpu") is tensor  # already there: no copy
    assert safe_device_transfer(tensor, "auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CacheDeviceError, match="device='cuda:7' is not available"):
        safe_device_transfer(tensor, "cuda:7")
    with pytest.raises(CacheValidationError, match=r"tensor must be a torch\.Tensor; got ndarray"):
        safe_device_transfer(tensor.numpy(), "cpu")  # type: ignore[arg-type]


def test_speed_settings_are_off_and_reported_in_stats() -> None:
    cache = BaseKVCache(KVCacheConfig(device="cpu"))
    cache.forward(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    assert cache.get_stats()["speed_settings"] == speed_settings()


PROBE = """
import json, torch, kv_cache
before = kv_cache.speed_settings()
after = kv_cache.enable_speed_settings()
cache = kv_cache.BaseKVCache(kv_cache.KVCacheConfig(device="cpu"))
reported = cache.get_stats()["speed_settings"]
off = kv_cache.enable_speed_settings(tf32=False, cudnn_benchmark=False)
print(json.dumps({"before": before, "after": after, "reported": reported, "off": off,
                  "cudnn_benchmark": torch.backends.cudnn.benchmark}))
"""


def test_enable_speed_settings_is_one_explicit_call() -> None:
    """In a child process: the switch changes process-wide torch state, which this test process must not see."""
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120)
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    torch_defaults = {"tf32_matmul": False, "tf32_conv": True, "cudnn_benchmark": False}  # cuDNN TF32: torch's
    assert probe["before"] == torch_defaults
    assert probe["off"] == {"tf32_matmul": False, "tf32_conv": False, "cudnn_benchmark": False}
    assert probe["after"] == {"tf32_matmul": True, "tf32_conv": True, "cudnn_benchmark": True} == probe["reported"]


def test_device_tensor_builds_what_torch_tensor_builds() -> None:
    """On CPU the same tensor; on CUDA (checked on the lent GPU) a pinned staging copy sent without blocking."""
    got = device_tensor([[1, 2], [3, 4]], torch.int32, torch.device("cpu"))
    assert got.dtype == torch.int32 and torch.equal(got, torch.tensor([[1, 2], [3, 4]], dtype=torch.int32))
    if torch.cuda.is_available():
        on_gpu = device_tensor(list(range(1000)), torch.long, torch.device("cuda"))
        assert torch.equal(on_gpu.cpu(), torch.arange(1000))
