"""The seed's public names: BaseKVCache.forward, AdaptiveKVCache, PagedKVCache pages, get_stats."""

from __future__ import annotations

import pytest
import torch

from kv_cache import (
    AdaptiveEvictionStrategy,
    AdaptiveKVCache,
    BaseKVCache,
    BatchCacheOperations,
    CacheDeviceError,
    CacheMemoryError,
    CacheStrategy,
    CacheValidationError,
    KVCacheConfig,
    LFUEvictionStrategy,
    LRUEvictionStrategy,
    MemoryManager,
    PagedKVCache,
    Quantizer,
    create_eviction_strategy,
)


def states(batch: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, tokens, 8, generator=gen), torch.randn(batch, 2, tokens, 8, generator=gen)


def test_forward_returns_everything_cached() -> None:
    cache = BaseKVCache(KVCacheConfig(max_tokens=64, block_size=4, enable_profiling=True))
    k1, v1 = states(2, 5, 0)
    keys, values, info = cache.forward(k1, v1, cache_position=0)
    assert torch.equal(keys, k1) and torch.equal(values, v1)
    assert info == {"cache_position": 0, "seq_length": 5, "cached_tokens": 0, "new_tokens": 5, "evicted_tokens": 0}
    k2, v2 = states(2, 1, 1)
    keys, values, info = cache.forward(k2, v2, cache_position=torch.tensor([5]))
    assert torch.equal(keys, torch.cat([k1, k2], 2)) and info["cached_tokens"] == 5
    stats = cache.get_stats(include_history=True)
    assert stats["tokens"] == 12 and stats["sequences"] == 2
    assert stats["hit_rate"] == pytest.approx(10 / 22)
    assert stats["storage_memory_mb"] > 0 and stats["blocks_used"] == 4
    assert len(stats["history"]) == 2 and stats["history"][-1]["tokens"] == 12
    assert stats["profiling"]["forward"]["count"] == 2


def test_rewriting_from_an_earlier_position() -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=4))
    k1, v1 = states(1, 6, 2)
    cache.forward(k1, v1)
    k2, v2 = states(1, 3, 3)
    keys, _, info = cache.forward(k2, v2, cache_position=2)
    assert torch.equal(keys, torch.cat([k1[:, :, :2], k2], 2)) and info["seq_length"] == 5
    cache.store.check_invariants()


@pytest.mark.parametrize(
    ("position", "message"),
    [
        (7, "cache_position=7 is out of range"),
        (-1, "cache_position=-1"),
        (1.5, "must be an int"),
        (torch.tensor([3, 5]), "consecutive"),
        (torch.zeros(2, 2, dtype=torch.long), "shape"),
        (torch.tensor([5.0]), "integer positions"),
    ],
)
def test_bad_positions_raise_and_keep_the_cache(position: object, message: str) -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=4))
    k1, v1 = states(1, 6, 4)
    cache.forward(k1, v1)
    k2, v2 = states(1, 2, 5)
    with pytest.raises(CacheValidationError, match=message):
        cache.forward(k2, v2, cache_position=position)  # type: ignore[arg-type]
    assert cache.seq_length == 6


def test_bad_tensor_does_not_truncate() -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=4))
    k1, v1 = states(1, 6, 6)
    cache.forward(k1, v1)
    with pytest.raises(CacheValidationError, match="KV heads"):
        cache.forward(torch.zeros(1, 3, 1, 8), torch.zeros(1, 3, 1, 8), cache_position=2)
    assert cache.seq_length == 6


def test_budget_exceeded_raises_memory_error() -> None:
    cache = BaseKVCache(KVCacheConfig(max_tokens=8, block_size=4))
    with pytest.raises(CacheMemoryError, match="max_tokens=8"):
        cache.forward(*states(1, 9, 7))


def test_adaptive_cache_uses_the_adaptive_strategy() -> None:
    cache = AdaptiveKVCache(KVCacheConfig(max_tokens=32, cache_strategy=CacheStrategy.LRU))
    assert cache.config.cache_strategy is CacheStrategy.ADAPTIVE and cache.config.max_tokens == 32
    keys, _, _ = cache.forward(*states(1, 3, 8))
    assert keys.shape == (1, 2, 3, 8)


def test_paged_cache_pages_and_page_stats() -> None:
    cache = PagedKVCache(KVCacheConfig(max_tokens=32, block_size=4))
    k1, v1 = states(1, 6, 9)
    cache.forward(k1, v1)
    seq = cache.seq_ids[0]
    first, second = cache.store.block_ids(seq)
    page = cache.get_page(first)
    assert page["ref_count"] == 1 and page["sequences"] == [seq] and page["tokens"] == 4
    assert torch.equal(page["keys"], k1[0, :, :4].transpose(0, 1))
    assert cache.get_page(second)["tokens"] == 2
    stats = cache.get_page_stats()
    assert stats["pages_used"] == 2 and stats["fragmentation"] == pytest.approx(2 / 8)
    free_page = next(p for p in range(stats["pages_total"]) if p not in (first, second))
    assert cache.get_page(free_page)["keys"] is None
    with pytest.raises(CacheValidationError, match="out of range"):
        cache.get_page(10_000)


def test_reset_frees_every_block() -> None:
    cache = PagedKVCache(KVCacheConfig(block_size=4))
    cache.forward(*states(3, 9, 10))
    cache.reset()
    assert cache.get_page_stats()["pages_used"] == 0 and cache.seq_length == 0
    keys, _, _ = cache.forward(*states(1, 2, 11))
    assert keys.shape[2] == 2


def test_quantizer_is_a_component_set_before_the_first_token() -> None:
    cache = BaseKVCache(KVCacheConfig(max_tokens=256, residual_tokens=0), quantizer=Quantizer(bits=8, group_size=8))
    assert cache.config.use_quantization and cache.config.quantization_bits == 8 and cache.config.block_size == 16
    cache.quantizer = Quantizer(bits=4, group_size=8)
    keys, _, _ = cache.forward(*states(1, 40, 12))
    assert cache.store.quantized_pool is not None and cache.quantizer == Quantizer(bits=4, group_size=8)
    with pytest.raises(CacheValidationError, match="cannot change once tokens are stored"):
        cache.quantizer = Quantizer(bits=2)
    assert keys.shape == (1, 2, 40, 8)


class FailingAllocations:
    """Wraps a pool's `allocate`: the calls numbered in `at` (from 1) raise `torch.OutOfMemoryError` first."""

    def __init__(self, cache: BaseKVCache, at: tuple[int, ...]) -> None:
        pool = cache.store.pool
        assert pool is not None
        self.allocate, self.at, self.calls = pool.allocate, at, 0
        pool.allocate = self  # type: ignore[method-assign]

    def __call__(self, count: int) -> list[int]:
        self.calls += 1
        if self.calls in self.at:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return self.allocate(count)


def test_memory_manager_retries_an_out_of_memory_store_operation() -> None:
    config = KVCacheConfig(block_size=4, max_tokens=64)
    guarded, plain = BaseKVCache(config, memory_manager=MemoryManager(config, "cpu")), BaseKVCache(config)
    for cache in (guarded, plain):
        cache.forward(*states(2, 5, 20))
    FailingAllocations(guarded, at=(1, 2))  # the next append fails twice, then succeeds
    got, expected = guarded.forward(*states(2, 7, 21)), plain.forward(*states(2, 7, 21))
    assert all(torch.equal(a, b) for a, b in zip(got[:2], expected[:2], strict=True)) and got[2] == expected[2]
    managed = guarded.get_stats()["memory_manager"]
    assert (managed["oom_errors"], managed["oom_recoveries"], managed["oom_failures"]) == (2, 1, 0)
    assert managed["blocks_used"] == plain.get_stats()["blocks_used"] and managed["device"]["type"] == "cpu"
    FailingAllocations(guarded, at=tuple(range(1, 10)))  # more failures than the 3 retries
    with pytest.raises(CacheMemoryError, match="out of device memory"):
        guarded.forward(*states(2, 9, 22))
    assert guarded.seq_length == 12 and guarded.get_stats()["memory_manager"]["oom_failures"] == 1  # nothing lost
    assert torch.equal(guarded.store.read(guarded.seq_ids, 0)[0], plain.store.read(plain.seq_ids, 0)[0])


def test_memory_manager_checks_its_arguments_and_device() -> None:
    manager = MemoryManager(KVCacheConfig(), "auto")
    assert manager.memory_info()["blocks_total"] == 0 and manager.device.type in ("cpu", "cuda", "mps")
    with pytest.raises(CacheValidationError, match="manages no store"):
        manager.append_needs(0, 1)
    with pytest.raises(CacheValidationError, match="config must be"):
        MemoryManager("fast", "cpu")  # type: ignore[arg-type]
    with pytest.raises(CacheDeviceError, match="cuda:7"):
        MemoryManager(KVCacheConfig(), "cuda:7")
    with pytest.raises(CacheValidationError, match="memory_manager must be"):
        BaseKVCache(memory_manager="yes")  # type: ignore[arg-type]
    on_gpu = MemoryManager(KVCacheConfig(), "cpu")
    on_gpu.device = torch.device("cuda", 0)  # as built on a GPU machine
    cache = BaseKVCache(KVCacheConfig(block_size=4), memory_manager=on_gpu)
    with pytest.raises(CacheDeviceError, match="manages cuda:0 but key/value are on cpu"):
        cache.forward(*states(1, 3, 23))


def test_batch_operations_share_blocks() -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=4))
    k, v = states(3, 6, 13)
    cache.forward(k, v)
    ops = BatchCacheOperations(cache)
    ops.select([2, 0])
    ops.repeat_interleave(2)
    ops.reorder(torch.tensor([3, 3, 0, 1]))
    keys, _, _ = cache.forward(*states(4, 1, 14))
    for row, source in enumerate([0, 0, 2, 2]):
        assert torch.equal(keys[row, :, :6], k[source])
    cache.store.check_invariants()
    with pytest.raises(CacheValidationError, match="out of range"):
        ops.select([7])


def test_eviction_strategies_and_factory() -> None:
    assert isinstance(create_eviction_strategy("lru"), LRUEvictionStrategy)
    assert isinstance(create_eviction_strategy(CacheStrategy.LFU), LFUEvictionStrategy)
    assert isinstance(create_eviction_strategy("Adaptive", capacity=4), AdaptiveEvictionStrategy)
    with pytest.raises(CacheValidationError, match="strategy='fifo'"):
        create_eviction_strategy("fifo")


def test_adapt_shrinks_the_budget_under_pressure_and_tunes_the_mix() -> None:
    config = KVCacheConfig(block_size=4, max_tokens=128, token_budget=40)
    cache = AdaptiveKVCache(config)
    cache.forward(*states(1, 40, 15))
    weights = torch.full((1, 4, 1, 40), 0.001)
    weights[..., -10:] = 1.0  # attention goes to the newest tokens
    cache.record_attention(weights)
    decision = cache.adapt({"memory_pressure": 0.95})
    assert decision["token_budget"] == 30 and cache.config.token_budget == 30
    assert decision["recent_fraction"] == pytest.approx(0.8)
    keys, _, _ = cache.forward(*states(1, 1, 16))
    assert keys.shape[2] <= 30 + 4
    assert cache.adapt({"memory_pressure": 0.2})["token_budget"] == 37
    assert cache.get_stats(include_history=True)["history"][-1]["adapt"]["token_budget"] == 37
    with pytest.raises(CacheValidationError, match="memory_pressure=2"):
        cache.adapt({"memory_pressure": 2})
