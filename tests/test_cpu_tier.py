"""`CpuTier`: bit-exact round trips in every block format, demotion/promotion through the prefix cache, capacity
and accounting, and CPU-tier hits inside the engine."""

from __future__ import annotations

import pytest
import torch

from kv_cache import BlockFormat, BlockPool, CacheMemoryError, CacheStrategy, CacheValidationError, KVCacheConfig
from kv_cache.engine import EngineConfig, InvariantCheck, KVCacheEngine, SamplingParams
from kv_cache.prefix_cache import PrefixCache, chain_hashes, root_hash
from kv_cache.reference_model import encode, heldout_text, load_reference_model
from kv_cache.tiers.cpu import CpuTier, host_blocks_per_format

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # conftest.py: tiny models, one thread

DEVICE = torch.device("cpu")
FORMATS = {
    "fp32": BlockFormat(4, 2, 2, 8, torch.float32),
    "bf16": BlockFormat(4, 2, 2, 8, torch.bfloat16),
    "int4": BlockFormat(4, 2, 2, 8, torch.float32, layer_bits=(4, 2), group_size=4),
}


def filled_pool(fmt: BlockFormat, num_blocks: int, seed: int = 0) -> BlockPool:
    """A pool whose every tensor holds random bytes (any bit pattern: NaN payloads included)."""
    pool = BlockPool(fmt, num_blocks, DEVICE)
    generator = torch.Generator().manual_seed(seed)
    for layer in pool.layers:
        for tensor in layer.tensors():
            raw = tensor.view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=generator))
    return pool


def block_bytes(pool: BlockPool, block_id: int) -> list[torch.Tensor]:
    return [tensor[block_id].view(torch.uint8).clone() for layer in pool.layers for tensor in layer.tensors()]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_store_and_load_are_bit_exact(name: str) -> None:
    fmt = FORMATS[name]
    pool = filled_pool(fmt, 8)
    tier = CpuTier([fmt], [6], DEVICE)
    sources = [5, 1, 6]
    originals = [block_bytes(pool, b) for b in sources]
    tier.host_pool(fmt).allocate(1)  # host ids need not start at 0 or be one run
    host_ids = tier.store(pool, sources)
    targets = [0, 7, 3]
    tier.load(host_ids, pool, targets)
    for original, target in zip(originals, targets, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(original, block_bytes(pool, target), strict=True))
    stats = tier.stats()
    assert stats["blocks_to_cpu"] == stats["blocks_to_device"] == 3
    assert stats["bytes_to_cpu"] == 3 * fmt.bytes_per_block
    assert stats["pinned"] is False and "no CUDA" in stats["pinned_reason"]


def test_a_full_tier_refuses_before_copying() -> None:
    fmt = FORMATS["fp32"]
    tier = CpuTier([fmt], [2], DEVICE)
    with pytest.raises(CacheMemoryError, match="raise cpu_tier_blocks"):
        tier.store(filled_pool(fmt, 4), [0, 1, 2])
    assert tier.num_free(fmt) == 2 and tier.stats()["blocks_to_cpu"] == 0


def test_host_pools_are_pinned_only_with_cuda() -> None:
    fmt = FORMATS["int4"]
    tier = CpuTier([fmt], [2], DEVICE)
    stats = tier.stats()
    assert stats["pinned"] is False and "no CUDA device" in stats["pinned_reason"]
    pool = BlockPool(fmt, 2, DEVICE, pin_memory=True)  # asked for, but page-locking needs CUDA
    assert pool.pinned is torch.cuda.is_available()
    assert all(t.is_pinned() is pool.pinned for t in pool.storage())
    with pytest.raises(CacheValidationError, match="pin_memory=True is for host pools"):
        BlockPool(fmt, 2, torch.device("meta"), pin_memory=True)


def test_pin_memory_false_keeps_plain_host_memory_and_says_so() -> None:
    tier = CpuTier([FORMATS["fp32"]], [2], DEVICE, pin_memory=False)
    assert tier.stats()["pinned"] is False and "pin_memory=False" in tier.stats()["pinned_reason"]
    with pytest.raises(CacheValidationError, match="pin_memory='yes' must be True or False"):
        CpuTier([FORMATS["fp32"]], [2], DEVICE, pin_memory="yes")  # type: ignore[arg-type]
    with pytest.raises(CacheValidationError, match="pin_memory=1 must be True or False"):
        EngineConfig(pin_memory=1)  # type: ignore[arg-type]


def test_tier_size_from_mib_splits_by_pool_size() -> None:
    dense, sealed = BlockPool(FORMATS["fp32"], 8, DEVICE), BlockPool(FORMATS["int4"], 24, DEVICE)
    counts = host_blocks_per_format([dense, sealed], None, memory_mb=0.05)
    total = dense.memory_bytes + sealed.memory_bytes
    assert counts == [
        int(0.05 * 2**20 * p.memory_bytes / total // p.block_format.bytes_per_block) for p in (dense, sealed)
    ]
    assert counts[1] == 3 * counts[0]  # each pool keeps its share of the device memory
    assert host_blocks_per_format([dense, sealed], 5, None) == [5, 5]
    with pytest.raises(CacheMemoryError, match="raise cpu_tier_mb"):
        host_blocks_per_format([dense], None, memory_mb=1e-6)


@pytest.mark.parametrize("name", ["bf16", "int4"])
def test_demote_then_promote_round_trip_is_bit_exact(name: str) -> None:
    fmt = FORMATS[name]
    pool = filled_pool(fmt, 4, seed=3)
    tier = CpuTier([fmt], [4], DEVICE)
    cache = PrefixCache(pool, CacheStrategy.LRU, root_hash("ns", "model", fmt), tier)
    tokens = list(range(8))
    keys: list[bytes] = []
    chain_hashes(cache.root, tokens, 4, keys)
    blocks = pool.allocate(2)
    first = cache.register(keys[0], None, tuple(tokens[:4]), blocks[0])
    cache.register(keys[1], first, tuple(tokens[4:]), blocks[1])
    pool.release(blocks)  # only the cache holds them now
    originals = [block_bytes(pool, b) for b in blocks]
    assert cache.evict(2) == 2 and pool.num_free == 4 and cache.stats()["cached_host_blocks"] == 2
    pool.allocate(1)  # the promoted blocks land elsewhere
    chain = cache.lookup(keys, [*tokens, 99], max_blocks=2)
    assert len(chain) == 2 and cache.counters["promoted_blocks"] == 2 and tier.num_free(fmt) == 4
    for original, entry in zip(originals, chain, strict=True):
        assert entry.block_id is not None
        assert all(torch.equal(a, b) for a, b in zip(original, block_bytes(pool, entry.block_id), strict=True))
    assert cache.check_invariants() == []


def test_the_engine_hits_demoted_blocks_with_identical_tokens() -> None:
    model = load_reference_model()
    text = heldout_text()
    shared = text[:120]
    first = [encode(shared + "\n# a").tolist()]
    crowd = [encode(text[3000 * i : 3000 * i + 60]).tolist() for i in range(1, 5)]  # pushes `shared` out
    again = [encode(shared + "\n# b").tolist()]
    sampling = SamplingParams(max_new_tokens=8)

    def run(**engine: object) -> tuple[list[list[int]], KVCacheEngine]:
        config = KVCacheConfig(num_blocks=24, block_size=8, max_tokens=256, device="cpu")
        settings: dict[str, object] = {"invariant_check": InvariantCheck.EVERY_STEP, "max_num_seqs": 2, **engine}
        runner = KVCacheEngine(model, config, EngineConfig(**settings))  # type: ignore[arg-type]
        return [out for batch in (first, crowd, again) for out in runner.generate(batch, sampling)], runner

    expected, _ = run(enable_prefix_caching=False)
    outputs, engine = run(cpu_tier_blocks=32)
    assert outputs == expected
    cached = engine.get_stats()["prefix_cache"]
    assert cached["demoted_blocks"] > 0 and cached["promoted_blocks"] >= 15
