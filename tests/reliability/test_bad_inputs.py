"""Every bad input we could think of: a `CacheValidationError` (or the documented `CacheMemoryError` /
`CacheDeviceError`) whose message names the argument, and the cache still usable afterwards (a good call works,
the data is intact, the conservation invariant holds).

Each table row is one bad call. Rows marked `bug=` are known bugs: `xfail(strict=True)` until fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from kv_cache import (
    BaseKVCache,
    BatchCacheOperations,
    CacheDeviceError,
    CacheMemoryError,
    CacheValidationError,
    KVCacheConfig,
    KVStore,
    PagedKVCache,
)

HEADS, DIM, BLOCK = 2, 8, 4


def kv(batch: int = 1, tokens: int = 1, heads: int = HEADS, dim: int = DIM, **options: Any) -> torch.Tensor:
    return torch.randn(batch, heads, tokens, dim, **options)


@dataclass(frozen=True)
class Case:
    """One bad call on `subject` (a `StoreUnderTest` or a `CacheUnderTest`) and the error it must raise."""

    name: str
    call: Callable[[Any], object]
    match: str  # a regex the message must match: it names the argument
    error: type[Exception] = CacheValidationError
    bug: str | None = None  # a known bug (the test is xfail strict)


def bug(reason: str) -> pytest.MarkDecorator:
    """A known bug: the test is expected to fail until it is fixed (then XPASS fails the run: unmark it)."""
    return pytest.mark.xfail(strict=True, reason=f"BUG: {reason}")


def params(cases: list[Case]) -> list[Any]:
    return [pytest.param(case, id=case.name, marks=[bug(case.bug)] if case.bug else []) for case in cases]


class StoreUnderTest:
    """A two-layer store (full precision, or INT4 with a 4-token window) holding `seq` (6 tokens) and `other`
    (3 tokens), plus an empty `spare`; `check()` proves it intact and usable."""

    def __init__(self, quantized: bool = False, **options: Any) -> None:
        quantization = {"use_quantization": True, "quantization_group_size": 4, "residual_tokens": 4}
        config = {"block_size": BLOCK, "device": "cpu", "max_tokens": 64, **(quantization if quantized else {})}
        self.store = KVStore(KVCacheConfig(**{**config, **options}), num_layers=2)
        self.seq, self.other, self.spare = (self.store.add_sequence() for _ in range(3))
        self.keys = {self.seq: kv(tokens=6), self.other: kv(tokens=3)}
        for seq, keys in self.keys.items():
            for layer in range(2):
                self.store.append([seq], layer, keys, keys)
        self.expected = {seq: self.store.read([seq], 1)[0].clone() for seq in self.keys}

    def check(self) -> None:
        """The bad call changed nothing, and a good append and read work."""
        self.store.check_invariants()
        for seq, expected in self.expected.items():
            assert torch.equal(self.store.read([seq], 1)[0], expected)
        new = kv()
        for layer in range(2):
            self.store.append([self.seq], layer, new, new)
        assert self.store.num_tokens(self.seq) == 7
        self.store.check_invariants()


def nan_states() -> torch.Tensor:
    states = kv(tokens=2)
    states[0, 1, 1, 3] = float("nan")
    return states


STORE_CASES = [
    Case("key not a tensor", lambda s: s.store.append([s.seq], 0, [1.0], kv()), "must be tensors"),
    Case("key of 3 dims", lambda s: s.store.append([s.seq], 0, kv()[0], kv()[0]), "expected 4 dims"),
    Case("value shape differs", lambda s: s.store.append([s.seq], 0, kv(), kv(tokens=2)), "value shape"),
    Case("batch vs seq_ids", lambda s: s.store.append([s.seq], 0, kv(2), kv(2)), "batch 2 but 1"),
    Case("KV heads", lambda s: s.store.append([s.seq], 0, kv(heads=3), kv(heads=3)), "3 KV heads"),
    Case("head_dim", lambda s: s.store.append([s.seq], 0, kv(dim=5), kv(dim=5)), "head_dim 5"),
    Case("int dtype", lambda s: s.store.append([s.seq], 0, *[kv().int()] * 2), "dtypes"),
    Case("float64", lambda s: s.store.append([s.seq], 0, *[kv().double()] * 2), "dtypes"),
    Case("key/value dtypes differ", lambda s: s.store.append([s.seq], 0, kv(), kv().half()), "dtypes"),
    Case("dtype changed", lambda s: s.store.append([s.seq], 0, *[kv().half()] * 2), "filled with torch.float32"),
    Case("device", lambda s: s.store.append([s.seq], 0, *[kv(device="meta")] * 2), "on meta/meta.*lives on cpu"),
    Case(
        "sparse layout",
        lambda s: s.store.append([s.seq], 0, *[kv().to_sparse()] * 2),
        "sparse|layout|strided",
    ),
    Case("layer too high", lambda s: s.store.append([s.seq], 2, kv(), kv()), "layer=2"),
    Case("negative layer", lambda s: s.store.append([s.seq], -1, kv(), kv()), "layer=-1"),
    Case("float layer", lambda s: s.store.append([s.seq], 0.5, kv(), kv()), "layer=0.5"),
    Case("bool layer", lambda s: s.store.append([s.seq], True, kv(), kv()), "layer=True"),
    Case("unknown sequence", lambda s: s.store.append([99], 0, kv(), kv()), "sequence id 99"),
    Case(
        "a sequence twice in one batch",
        lambda s: s.store.append([s.seq, s.seq], 0, kv(2), kv(2)),
        "seq_ids|twice|duplicate",
    ),
    Case(
        "past max_tokens", lambda s: s.store.append([s.seq], 0, *[kv(tokens=60)] * 2), "max_tokens=64", CacheMemoryError
    ),
    Case("read: unknown sequence", lambda s: s.store.read([99], 0), "sequence id 99"),
    Case("read: uneven lengths", lambda s: s.store.read([s.seq, s.other], 0), "equal length"),
    Case("read: empty sequence", lambda s: s.store.read([s.spare], 0), "holds no tokens"),
    Case("read: layer too high", lambda s: s.store.read([s.seq], 5), "layer"),
    Case("num_tokens: layer too high", lambda s: s.store.num_tokens(s.seq, 5), "layer"),
    Case("truncate: negative", lambda s: s.store.truncate(s.seq, -1), "num_tokens=-1"),
    Case("truncate: float", lambda s: s.store.truncate(s.seq, 1.5), "num_tokens=1.5"),
    Case("truncate: bool", lambda s: s.store.truncate(s.seq, True), "num_tokens=True"),
    Case("truncate: unknown sequence", lambda s: s.store.truncate(99, 1), "sequence id 99"),
    Case("fork: unknown sequence", lambda s: s.store.fork(99), "sequence id 99"),
    Case("free: unknown sequence", lambda s: s.store.free(99), "sequence id 99"),
    Case("beam index out of range", lambda s: s.store.replace_rows([s.seq], [1]), r"batch indices \[1\]"),
    Case("negative beam index", lambda s: s.store.replace_rows([s.seq], [-1]), r"batch indices \[-1\]"),
    Case("bool beam index", lambda s: s.store.replace_rows([s.seq], [True]), r"batch indices \[True\]"),
    Case("float beam index", lambda s: s.store.replace_rows([s.seq], [0.5]), "0.5"),
]
KEEP_CASES = [
    Case("keep: wrong heads", lambda s: s.store.keep_tokens([s.seq], 0, torch.zeros(1, 3, 2).long()), "keep"),
    Case("keep: more than held", lambda s: s.store.keep_tokens([s.seq], 0, torch.zeros(1, 2, 7).long()), "keep"),
    Case("keep: index past the end", lambda s: keep(s, [0, 9]), "keep"),
    Case("keep: negative index", lambda s: keep(s, [-1, 2]), "keep"),
    Case("keep: not ascending", lambda s: keep(s, [3, 1]), "keep|ascending"),
    Case("keep: float indices", lambda s: keep(s, [0.0, 1.0]), "keep"),
    Case("keep: quantized store", lambda s: keep(s, [0, 1], quantized=True), "unquantized"),
    Case("adopt: sequence not empty", lambda s: s.store.adopt_blocks(s.seq, [], [], 0), "not empty"),
    Case("adopt: too few blocks", lambda s: s.store.adopt_blocks(s.spare, [], [], 4), "num_tokens=4"),
    Case(
        "adopt: a free block",
        lambda s: adopt(s, [s.store.block_ids(s.seq)[0], s.store.pool.num_blocks - 1], 8),
        "block",
    ),
    Case("adopt: block id out of range", lambda s: adopt(s, [10**6]), "1000000"),
    Case("adopt: float num_tokens", lambda s: adopt(s, s.store.block_ids(s.seq)[:1], 1.5), "num_tokens=1.5"),
    Case("mass: not tracked", lambda s: s.store.add_attention_mass([s.seq], 0, torch.ones(1, 2, 6)), "mass"),
]


def keep(subject: StoreUnderTest, indices: list[float], quantized: bool = False) -> None:
    if quantized:
        subject = StoreUnderTest(quantized=True)
    subject.store.keep_tokens([subject.seq], 0, torch.tensor([[indices] * HEADS]))


def adopt(subject: StoreUnderTest, dense_ids: list[int], num_tokens: float = 4) -> None:
    subject.store.adopt_blocks(subject.spare, [], dense_ids, num_tokens)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", params(STORE_CASES + KEEP_CASES))
def test_store_refuses_and_stays_usable(case: Case) -> None:
    subject = StoreUnderTest()
    with pytest.raises(case.error, match=case.match):
        case.call(subject)
    subject.check()


QUANTIZED_CASES = [
    Case("NaN key", lambda s: s.store.append([s.seq], 0, nan_states(), kv(tokens=2)), "NaN or Inf"),
    Case("Inf value", lambda s: s.store.append([s.seq], 0, kv(tokens=2), nan_states() * 0 + float("inf")), "NaN"),
    Case(
        "device, checked before the values",
        lambda s: s.store.append([s.seq], 0, *[kv(device="meta")] * 2),
        "lives on cpu",
    ),
]


@pytest.mark.parametrize("case", params(QUANTIZED_CASES))
def test_quantized_store_refuses_and_stays_usable(case: Case) -> None:
    subject = StoreUnderTest(quantized=True)
    with pytest.raises(case.error, match=case.match):
        case.call(subject)
    subject.check()


HUGE = [
    pytest.param({"num_blocks": 10**12}, "num_blocks", id="num_blocks"),
    pytest.param({"memory_budget_mb": 1e12}, "memory_budget_mb", id="memory_budget_mb"),
    pytest.param({"max_tokens": 10**12}, "max_tokens|num_blocks", id="max_tokens"),
]


@pytest.mark.parametrize(("options", "setting"), HUGE)
def test_a_pool_too_large_for_memory_is_a_memory_error_naming_the_setting(options: dict, setting: str) -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=BLOCK, device="cpu", **options))
    with pytest.raises(CacheMemoryError, match=setting):
        cache.forward(kv(), kv())
    assert cache.store.pool is None


class CacheUnderTest:
    """A `PagedKVCache` holding 5 tokens for a batch of 2; `check()` proves it intact and usable."""

    def __init__(self, **options: Any) -> None:
        self.cache = PagedKVCache(KVCacheConfig(**{"block_size": BLOCK, "device": "cpu", **options}))
        self.ops = BatchCacheOperations(self.cache)
        self.keys = kv(2, 5)
        self.cache.forward(self.keys, self.keys)

    def check(self) -> None:
        new = kv(2)
        keys, _, info = self.cache.forward(new, new)
        assert info["cached_tokens"] == 5 and torch.equal(keys, torch.cat([self.keys, new], 2))
        self.cache.store.check_invariants()


def forward(subject: CacheUnderTest, position: Any, tokens: int = 1) -> None:
    subject.cache.forward(kv(2, tokens), kv(2, tokens), position)


CACHE_CASES = [
    Case("position past the end", lambda s: forward(s, 6), "cache_position=6"),
    Case("negative position", lambda s: forward(s, -1), "cache_position=-1"),
    Case("positions out of order", lambda s: forward(s, torch.tensor([5, 7]), 2), "consecutive"),
    Case("positions decreasing", lambda s: forward(s, torch.tensor([5, 4]), 2), "consecutive"),
    Case("positions of a 2-D tensor", lambda s: forward(s, torch.tensor([[5]])), "cache_position has shape"),
    Case("positions vs tokens", lambda s: forward(s, torch.tensor([4, 5, 6]), 2), "cache_position has shape"),
    Case("position as a string", lambda s: forward(s, "5"), "cache_position='5'"),
    Case("position as a float", lambda s: forward(s, 5.0), "cache_position=5.0"),
    Case("position as a numpy int", lambda s: forward(s, np.int64(5)), "cache_position"),
    Case("float position tensor", lambda s: forward(s, torch.tensor([5.0])), "cache_position"),
    Case("wrong batch", lambda s: s.cache.forward(kv(3), kv(3)), "batch 3 but 2"),
    Case("wrong head_dim", lambda s: s.cache.forward(kv(2, dim=4), kv(2, dim=4)), "head_dim 4"),
    Case("page id negative", lambda s: s.cache.get_page(-1), "page_id=-1"),
    Case("page id past the pool", lambda s: s.cache.get_page(10**6), "page_id=1000000"),
    Case("page id a string", lambda s: s.cache.get_page("0"), "page_id='0'"),
    Case("page id a bool", lambda s: s.cache.get_page(True), "page_id=True"),
    Case("beam index out of range", lambda s: s.ops.reorder([0, 2]), r"batch indices \[0, 2\]"),
    Case("negative beam index", lambda s: s.ops.reorder(torch.tensor([-1, 0])), r"batch indices \[-1, 0\]"),
    Case(
        "float beam indices",
        lambda s: s.ops.reorder(torch.tensor([0.7, 1.2])),
        "beam_idx|indices",
    ),
    Case("select with a string", lambda s: s.ops.select("a"), "indices"),
    Case("repeat 0 times", lambda s: s.ops.repeat_interleave(0), "repeats=0"),
    Case("repeat 1.5 times", lambda s: s.ops.repeat_interleave(1.5), "repeats=1.5"),
    Case("attention weights without eviction", lambda s: s.cache.record_attention(torch.ones(1)), "record_attention"),
    Case("quantizer of another type", lambda s: setattr(s.cache, "quantizer", "int4"), "quantizer"),
]


@pytest.mark.parametrize("case", params(CACHE_CASES))
def test_cache_refuses_and_stays_usable(case: Case) -> None:
    subject = CacheUnderTest()
    with pytest.raises(case.error, match=case.match):
        case.call(subject)
    subject.check()


EMPTY_DIMENSIONS = [
    pytest.param((1, 0, 3, DIM), "kv_heads|KV heads", id="no KV heads"),
    pytest.param((1, HEADS, 3, 0), "head_dim", id="no head_dim"),
    pytest.param((0, HEADS, 3, DIM), "batch", id="no rows"),
]


@pytest.mark.parametrize(("shape", "match"), EMPTY_DIMENSIONS)
def test_empty_dimensions_on_a_fresh_cache_are_refused(shape: tuple[int, ...], match: str) -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=BLOCK, device="cpu"))
    with pytest.raises(CacheValidationError, match=match):
        cache.forward(torch.randn(shape), torch.randn(shape))
    keys, _, _ = cache.forward(kv(shape[0] or 1, 3), kv(shape[0] or 1, 3))
    assert keys.shape[2] == 3


FIRST_CALLS = [
    pytest.param(lambda: forward_new(2, 3, position=5), id="a bad position"),
    pytest.param(lambda: forward_new(2, 0), id="no tokens"),
]


def forward_new(batch: int, tokens: int, position: int | None = None) -> BaseKVCache:
    cache = BaseKVCache(KVCacheConfig(block_size=BLOCK, device="cpu"))
    with pytest.raises(CacheValidationError):
        cache.forward(kv(batch, tokens), kv(batch, tokens), position)
    return cache


@pytest.mark.parametrize("make", FIRST_CALLS)
def test_a_failed_first_call_commits_nothing(make: Callable[[], BaseKVCache]) -> None:
    cache = make()
    keys, _, _ = cache.forward(kv(1, 3), kv(1, 3))  # a different batch size: fine for a fresh cache
    assert keys.shape == (1, HEADS, 3, DIM)


CONFIGS = [
    ({"max_tokens": 0}, "max_tokens=0"),
    ({"max_tokens": 1.5}, "max_tokens=1.5"),
    ({"max_tokens": True}, "max_tokens=True"),
    ({"block_size": 12}, "block_size=12"),
    ({"block_size": 0}, "block_size=0"),
    ({"block_size": 2048}, "block_size=2048"),
    ({"num_blocks": 0}, "num_blocks=0"),
    ({"num_blocks": 4, "memory_budget_mb": 1}, "num_blocks=4 and memory_budget_mb=1"),
    ({"memory_budget_mb": float("nan")}, "memory_budget_mb=nan"),
    ({"memory_budget_mb": float("inf")}, "memory_budget_mb=inf"),
    ({"memory_budget_mb": -1}, "memory_budget_mb=-1"),
    ({"dtype": "int8"}, "dtype='int8'"),
    ({"dtype": torch.int32}, "dtype=torch.int32"),
    ({"device": 5}, "device=5"),
    ({"cache_strategy": "mru"}, "cache_strategy='mru'"),
    ({"cache_mode": "eval"}, "cache_mode='eval'"),
    ({"enable_profiling": "yes"}, "enable_profiling='yes'"),
    ({"history_size": 0}, "history_size=0"),
    ({"snapshot_interval_s": -1}, "snapshot_interval_s=-1"),
    ({"snapshot_interval_s": float("nan")}, "snapshot_interval_s=nan"),
    ({"use_quantization": 1}, "use_quantization=1"),
    ({"quantization_bits": 3}, "quantization_bits=3"),
    ({"quantization_bits": True}, "quantization_bits=True"),
    ({"quantization_group_size": 0}, "quantization_group_size=0"),
    ({"use_quantization": True, "residual_tokens": 10}, "residual_tokens=10"),
    ({"residual_tokens": -64}, "residual_tokens=-64"),
    ({"layer_bits": {0: 3}}, "layer_bits\\[0\\]=3"),
    ({"layer_bits": {"first": 8}}, "layer_bits"),
    ({"layer_bits": [8]}, "layer_bits"),
    ({"check_finite": "no"}, "check_finite='no'"),
    ({"token_budget": 0}, "token_budget=0"),
    ({"compression_ratio": 1.5}, "compression_ratio=1.5"),
    ({"compression_ratio": 0}, "compression_ratio=0"),
    ({"token_budget": 8, "compression_ratio": 0.5}, "token_budget and compression_ratio"),
    ({"sink_tokens": -1}, "sink_tokens=-1"),
    ({"token_budget": 4, "sink_tokens": 4}, "sink_tokens=4"),
    ({"observation_window": 0}, "observation_window=0"),
    ({"token_budget": 8, "use_quantization": True}, "use_quantization=True"),
    ({"use_quantization": True, "cache_mode": "training"}, "TRAINING"),
    ({"token_budget": 8, "cache_mode": "training"}, "TRAINING"),
]


@pytest.mark.parametrize(("options", "match"), CONFIGS, ids=[m for _, m in CONFIGS])
def test_bad_configs_name_the_field(options: dict, match: str) -> None:
    with pytest.raises(CacheValidationError, match=match):
        KVCacheConfig(**options)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "tpu", "cuda:x"])
def test_unavailable_devices_are_device_errors(device: str) -> None:
    with pytest.raises(CacheDeviceError, match=f"device='{device}'"):
        KVCacheConfig(device=device)


SERIALISED = [
    pytest.param(lambda: KVCacheConfig.from_dict({"max_tokens": 8, "max_token": 9}), id="unknown key"),
    pytest.param(lambda: KVCacheConfig.from_json('{"block_size": 12}'), id="bad value"),
    pytest.param(lambda: KVCacheConfig.from_json("{not json"), id="not JSON"),
    pytest.param(lambda: KVCacheConfig.from_dict(None), id="not a dict"),
]


@pytest.mark.parametrize("load", SERIALISED)
def test_bad_serialised_configs(load: Callable[[], object]) -> None:
    with pytest.raises(CacheValidationError):
        load()
