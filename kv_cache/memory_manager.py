"""`MemoryManager`: a request's blocks over their life, and what to do when the device pool runs out.

It plays nano-vllm's `BlockManager` for the engine: `allocate` starts a request's sequence in the store (reusing
the prefix cache's blocks: device pool, CPU tier, then the remote tier when one is linked), `register_blocks` hands
its newly written full blocks to the prefix cache, `free` releases it, `append_needs`/`make_room` say whether a
step's tokens fit (the store plans the append: `KVStore.blocks_needed_for_append`). When blocks run out, the order
of resort is:

    1. free blocks of the pool
    2. blocks only the prefix cache holds: evicted by its policy (demoted to the CPU tier when it has room)
    3. preempt the newest running request (the scheduler picks it): `preempt` swaps its blocks to the CPU tier
       (`preemption_mode=swap`, if the tier has room) or drops them to recompute later
    4. nothing left to free: the request fails with `CacheMemoryError`, naming the setting to raise

OOM recovery: `run_with_oom_retry` runs a cache operation (an engine step); on `torch.OutOfMemoryError` it rolls
the step back, drops every evictable cached block, empties the CUDA allocator's cache and retries, at most
`oom_retries` times (each counted), then raises `CacheMemoryError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from kv_cache.block_pool import BlockPool
from kv_cache.block_table import blocks_needed
from kv_cache.config import KVCacheConfig
from kv_cache.devices import get_device_info, resolve_device
from kv_cache.errors import CacheMemoryError, CacheValidationError
from kv_cache.kv_store import KVStore
from kv_cache.prefix_cache import PrefixCache, chain_hashes
from kv_cache.tiers.cpu import CpuTier
from kv_cache.tiers.remote import RemoteLink

if TYPE_CHECKING:  # the engine package imports this module; its types are only annotations here
    from kv_cache.engine.config import EngineConfig
    from kv_cache.engine.request import Request

T = TypeVar("T")


@dataclass(frozen=True)
class BlockNeeds:
    """Blocks an operation allocates: full-precision (`dense`) and sealed (quantized) ones."""

    dense: int = 0
    sealed: int = 0

    def __add__(self, other: BlockNeeds) -> BlockNeeds:
        return BlockNeeds(self.dense + other.dense, self.sealed + other.sealed)


@dataclass
class SwappedSequence:
    """A preempted sequence's blocks in the CPU tier: sealed blocks, then the full-precision ones, oldest first."""

    num_tokens: int
    sealed_host_ids: list[int]
    dense_host_ids: list[int]


class MemoryManager:
    """Block accounting and memory decisions for the sequences of `store`.

    The engine builds one over its store. Built as the seed's `MemoryManager(config, device)` it manages no store
    of its own: give it to a cache (`BaseKVCache(config, memory_manager=manager)`) and the cache's store operations
    run under its OOM retry (`run_with_oom_retry`); `memory_info()` reports the device and the pool it watches.

    Args:
        config: the engine's settings (`preemption_mode`, `oom_retries`), or a `KVCacheConfig` (the engine's
            defaults then apply: 3 OOM retries).
        device: where the pools live, a `torch.device` or a string ("auto", "cpu", "cuda:0", ...; an unavailable
            one raises `CacheDeviceError`). CUDA gets `empty_cache` on OOM.
        store: the block store of every request (the engine's); None for a standalone manager.
        prefix_cache: the prefix cache over `store`'s shareable pool, or None when prefix caching is off.
        tiers: the CPU tier and the remote link (to the Redis tier) below the prefix cache, each None if absent.
    """

    def __init__(
        self,
        config: EngineConfig | KVCacheConfig | None = None,
        device: torch.device | str = "auto",
        store: KVStore | None = None,
        prefix_cache: PrefixCache | None = None,
        tiers: tuple[CpuTier | None, RemoteLink | None] = (None, None),
    ) -> None:
        from kv_cache.engine.config import EngineConfig  # the engine package imports this module

        if config is not None and not isinstance(config, EngineConfig | KVCacheConfig):
            raise CacheValidationError(
                f"config must be an EngineConfig, a KVCacheConfig or None; got {type(config).__name__}"
            )
        if store is not None and store.pool is None:
            raise CacheMemoryError("the store's pools are not allocated; call store.initialize(...) first")
        self.config = config if isinstance(config, EngineConfig) else EngineConfig()
        self.device = resolve_device(device)
        self._store = store
        self.prefix_cache = prefix_cache
        self.tier, self.remote = tiers
        self.counters = dict.fromkeys(
            ("preempted_swap", "preempted_recompute", "swap_fallbacks", "swapped_out_blocks", "swapped_in_blocks",
             "oom_errors", "oom_recoveries", "oom_failures"),
            0,
        )  # fmt: skip

    @property
    def store(self) -> KVStore:
        """The managed store (the engine's); a standalone manager has none."""
        if self._store is None:
            raise CacheValidationError(
                "this MemoryManager manages no store (built as MemoryManager(config, device)); sequence and "
                "preemption methods belong to the engine's manager"
            )
        return self._store

    @property
    def pool(self) -> BlockPool:
        """The store's full-precision pool."""
        pool = self.store.pool
        assert pool is not None  # checked at construction
        return pool

    @property
    def quantized_pool(self) -> BlockPool | None:
        return self.store.quantized_pool

    @property
    def block_size(self) -> int:
        return self.store.block_size

    def memory_info(self, store: KVStore | None = None) -> dict[str, Any]:
        """The device (`get_device_info`: name, total/free bytes where known) and the blocks of `store` (default:
        the managed one; none for a standalone manager): `blocks_used`, `blocks_total`, `pool_mb`."""
        info: dict[str, Any] = {"device": get_device_info(self.device)}
        watched = store if store is not None else self._store
        pools = [] if watched is None else [p for p in (watched.pool, watched.quantized_pool) if p is not None]
        info["blocks_used"] = sum(p.num_used for p in pools)
        info["blocks_total"] = sum(p.num_blocks for p in pools)
        info["pool_mb"] = sum(p.memory_bytes for p in pools) / 2**20
        return info

    # ------------------------------------------------------------------------------------------- sequences
    def allocate(self, request: Request, reserved: BlockNeeds) -> int:
        """Start `request`'s sequence, adopting the longest cached prefix of its tokens; returns tokens reused.

        At most `num_tokens - 1` tokens are reused: the last one is always computed, for its logits. Blocks
        promoted from the CPU tier or fetched from the remote tier leave `reserved` (promised to this step's other
        requests) free.
        """
        request.seq_id = self.store.add_sequence()
        request.num_computed, request.cached_blocks = 0, []
        cache = self.prefix_cache
        if cache is None:
            return 0
        tokens = request.tokens
        chain_hashes(cache.root, tokens, self.block_size, request.block_hashes)
        quantized = self.quantized_pool is not None
        spare, max_blocks = reserved.sealed if quantized else reserved.dense, (len(tokens) - 1) // self.block_size
        chain = cache.lookup(request.block_hashes, tokens, max_blocks, spare)
        if self.remote is not None:
            chain += self.remote.fetch(request.block_hashes, tokens, chain, max_blocks, spare)
        if chain:
            block_ids = [entry.block_id for entry in chain if entry.block_id is not None]
            num_tokens = len(block_ids) * self.block_size
            sealed, dense = (block_ids, []) if quantized else ([], block_ids)
            self.store.adopt_blocks(request.seq_id, sealed, dense, num_tokens)
        request.cached_blocks = [entry.serial for entry in chain]
        request.num_computed = len(chain) * self.block_size
        return request.num_computed

    def register_blocks(self, request: Request) -> None:
        """Cache the request's full blocks written since the last call (after the forward that wrote them)."""
        cache, seq_id = self.prefix_cache, request.seq_id
        if cache is None or seq_id is None:
            return
        size, quantized = self.block_size, self.quantized_pool is not None
        if quantized:  # only sealed blocks are shareable; every layer seals alike
            count = min(self.store.num_sealed(seq_id, layer) for layer in range(self.store.num_layers)) // size
        else:
            count = request.num_computed // size
        if count <= len(request.cached_blocks):
            return
        held = self.store.dense_blocks(seq_id)
        block_ids = self.store.quantized_block_ids(seq_id) if quantized else [held[x] for x in range(count)]
        tokens = request.tokens
        chain_hashes(cache.root, tokens[: count * size], size, request.block_hashes)
        for i in range(len(request.cached_blocks), count):
            parent = request.cached_blocks[-1] if i else None
            block = tuple(tokens[i * size : (i + 1) * size])
            serial = cache.register(request.block_hashes[i], parent, block, block_ids[i])
            if serial is None:
                return
            request.cached_blocks.append(serial)

    def free(self, request: Request) -> None:
        """Release the request's sequence (its cached blocks stay in the prefix cache, most recent first)."""
        if request.seq_id is not None:
            self.store.free(request.seq_id)
            request.seq_id = None
        if self.prefix_cache is not None:
            self.prefix_cache.touch(request.cached_blocks)

    # ----------------------------------------------------------------------------------------------- room
    def append_needs(self, seq_id: int, count: int) -> BlockNeeds:
        """Blocks appending `count` tokens to a sequence allocates in all layers (`KVStore.append`'s own plan),
        net of the full-precision blocks it seals and releases."""
        dense, sealed = self.store.blocks_needed_for_append(seq_id, count)
        return BlockNeeds(dense=dense, sealed=sealed)

    def make_room(self, needs: BlockNeeds) -> bool:
        """Whether `needs` fit in the free blocks, after evicting blocks only the prefix cache holds."""
        for pool, need in self._pool_needs(needs):
            short = need - pool.num_free
            if short > 0 and self.prefix_cache is not None and pool is self.prefix_cache.pool:
                self.prefix_cache.evict(short)
        return all(need <= pool.num_free for pool, need in self._pool_needs(needs))

    def total_needs(self, num_tokens: int) -> BlockNeeds:
        """Blocks one sequence of `num_tokens` tokens holds (quantized: at most a window plus two blocks dense)."""
        size = self.block_size
        if self.quantized_pool is None:
            return BlockNeeds(dense=blocks_needed(num_tokens, size))
        residual = self.store.config.residual_tokens
        tail = blocks_needed(min(num_tokens, residual + size), size) + 1
        return BlockNeeds(dense=tail, sealed=max(0, num_tokens - residual) // size)

    def never_fits(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` tokens exceeds the pools even with nothing else in them."""
        return any(need > pool.num_blocks for pool, need in self._pool_needs(self.total_needs(num_tokens)))

    def capacity_error(self, request: Request, needs: BlockNeeds) -> CacheMemoryError:
        """The error for a request that does not fit even with every other request preempted."""
        names = ("full-precision", "sealed")
        parts = [
            f"{need} {name} blocks (the pool has {pool.num_blocks}, {pool.num_free} free)"
            for (pool, need), name in zip(self._pool_needs(needs), names, strict=False)
        ]
        return CacheMemoryError(
            f"request {request.request_id} ({request.num_tokens} tokens) needs {' and '.join(parts)} of "
            f"{self.block_size} tokens, and nothing else can be evicted or preempted; raise num_blocks or "
            "memory_budget_mb (KVCacheConfig), or shorten the prompt or max_new_tokens"
        )

    def _pool_needs(self, needs: BlockNeeds) -> list[tuple[BlockPool, int]]:
        pools = [(self.pool, needs.dense)]
        if self.quantized_pool is not None:
            pools.append((self.quantized_pool, needs.sealed))
        return pools

    # ----------------------------------------------------------------------------------------- preemption
    def preempt(self, request: Request, allow_swap: bool = True) -> None:
        """Take the request's blocks off the device: to the CPU tier (swap mode, room permitting) or dropped."""
        if allow_swap and self.config.swaps_on_preemption and request.seq_id is not None:
            request.swapped = self._swap_out(request.seq_id, request.num_computed)
            if request.swapped is not None:
                request.seq_id = None
                self.counters["preempted_swap"] += 1
                return
            self.counters["swap_fallbacks"] += 1
        self.free(request)
        request.num_computed, request.cached_blocks = 0, []
        self.counters["preempted_recompute"] += 1

    def _swap_out(self, seq_id: int, num_tokens: int) -> SwappedSequence | None:
        """Copy a sequence's blocks to the CPU tier and free it; None (nothing changed) if the tier is full."""
        tier = self.tier
        if tier is None:
            return None
        sealed = self.store.quantized_block_ids(seq_id)
        held = self.store.dense_blocks(seq_id)
        dense = [held[logical] for logical in sorted(held)]
        wanted = [(self.pool, len(dense))]
        if self.quantized_pool is not None:
            wanted.append((self.quantized_pool, len(sealed)))
        for pool, count in wanted:
            short = count - tier.num_free(pool.block_format)
            if short > 0 and self.prefix_cache is not None and pool is self.prefix_cache.pool:
                self.prefix_cache.evict_host(short)  # a swapped request outranks demoted cache blocks
            if count > tier.num_free(pool.block_format):
                return None
        sealed_host = tier.store(self.quantized_pool, sealed) if self.quantized_pool is not None else []
        swapped = SwappedSequence(num_tokens, sealed_host, tier.store(self.pool, dense))
        self.store.free(seq_id)
        self.counters["swapped_out_blocks"] += len(sealed) + len(dense)
        return swapped

    def swap_in_needs(self, swapped: SwappedSequence) -> BlockNeeds:
        """Blocks `swap_in` allocates, plus one spare full-precision block for the next token."""
        return BlockNeeds(dense=len(swapped.dense_host_ids) + 1, sealed=len(swapped.sealed_host_ids))

    def swap_in(self, request: Request) -> None:
        """Rebuild a swapped request's sequence on the device, bit for bit (room checked by `swap_in_needs`): its
        blocks, the partly filled last one included, are copied back and adopted as they were."""
        swapped = request.swapped
        if not isinstance(swapped, SwappedSequence) or self.tier is None:
            raise CacheMemoryError(f"request {request.request_id} has no swapped blocks to restore")
        seq_id = self.store.add_sequence()
        sealed: list[int] = []
        dense: list[int] = []
        try:
            if self.quantized_pool is not None:
                sealed = self._load(self.quantized_pool, swapped.sealed_host_ids)
            dense = self._load(self.pool, swapped.dense_host_ids)
            self.store.adopt_blocks(seq_id, sealed, dense, swapped.num_tokens)
        except BaseException:  # the host copies stay; the half-built sequence must not leak
            self.store.free(seq_id)
            raise
        finally:  # the sequence holds the blocks now (or, after an error, nobody)
            self.pool.release(dense)
            if self.quantized_pool is not None:
                self.quantized_pool.release(sealed)
        self.discard(swapped)
        request.seq_id, request.swapped = seq_id, None
        self.counters["swapped_in_blocks"] += len(swapped.sealed_host_ids) + len(swapped.dense_host_ids)

    def _load(self, pool: BlockPool, host_ids: list[int]) -> list[int]:
        """New device blocks of `pool` holding copies of host blocks `host_ids` (same order)."""
        if self.tier is None:
            raise CacheMemoryError("there is no CPU tier to load blocks from")
        block_ids = pool.allocate(len(host_ids))
        try:
            self.tier.load(host_ids, pool, block_ids)
        except BaseException:
            pool.release(block_ids)
            raise
        return block_ids

    def discard(self, swapped: SwappedSequence) -> None:
        """Free a swapped sequence's host blocks (it resumed, or was aborted)."""
        if self.tier is None:
            return
        self.tier.free(self.pool.block_format, swapped.dense_host_ids)
        if self.quantized_pool is not None:
            self.tier.free(self.quantized_pool.block_format, swapped.sealed_host_ids)

    # ------------------------------------------------------------------------------------------------ OOM
    def run_with_oom_retry(self, operation: Callable[[], T], rollback: Callable[[], None]) -> T:
        """`operation()`, retried after `torch.OutOfMemoryError` (rolled back, memory released) up to
        `oom_retries` times; then `CacheMemoryError`."""
        retries, attempt = self.config.oom_retries, 0
        while True:
            try:
                result = operation()
            except (torch.OutOfMemoryError, CacheMemoryError) as error:
                if not _is_device_oom(error):  # a full pool is the scheduler's business, not a retry's
                    raise
                self.counters["oom_errors"] += 1
                rollback()
                freed = self.release_memory()
                if attempt == retries:
                    self.counters["oom_failures"] += 1
                    engine = "prefill_chunk_size or max_num_seqs (EngineConfig), or " if self._store is not None else ""
                    raise CacheMemoryError(
                        f"out of device memory during a cache operation, {retries} retries after freeing cached "
                        f"blocks ({freed} freed last time) and emptying the allocator cache; lower {engine}"
                        "num_blocks/memory_budget_mb (KVCacheConfig) to leave the model more room, or raise "
                        "oom_retries (EngineConfig)"
                    ) from error
                attempt += 1
                continue
            if attempt:
                self.counters["oom_recoveries"] += 1
            return result

    def release_memory(self) -> int:
        """Drop every evictable cached block and empty the CUDA caching allocator; returns the blocks freed."""
        freed = self.prefix_cache.clear() if self.prefix_cache is not None else 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return freed

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)


def _is_device_oom(error: BaseException) -> bool:
    """A device out-of-memory error, raw or as the store reports it (a `CacheMemoryError` caused by one)."""
    return isinstance(error, torch.OutOfMemoryError) or isinstance(error.__cause__, torch.OutOfMemoryError)
