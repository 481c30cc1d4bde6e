"""The engine's runtime invariant (SGLang's idle check): every block accounted for, with a named diff.

Checked whenever the engine goes idle (`InvariantCheck.IDLE`, the default) or after every step (`EVERY_STEP`,
what the tests use):

1. conservation, per device pool: free + referenced by sequences + held only by the prefix cache == capacity;
2. reference counts == holders (sequences' block tables, plus one per prefix-cache entry), via
   `KVStore.check_invariants` and, for host blocks, the CPU tier's pools (swapped sequences + demoted entries);
3. the sequences in the store are exactly the running requests', each as long as its request has computed;
4. the prefix index agrees with its entries (key <-> serial, one residency each, policy membership).

Any violation raises `CacheError("engine invariant violated: ...")` listing up to ten problems.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kv_cache.block_format import BlockFormat
from kv_cache.errors import CacheError
from kv_cache.memory_manager import SwappedSequence

if TYPE_CHECKING:
    from kv_cache.engine.engine import KVCacheEngine


def check_engine(engine: KVCacheEngine) -> None:
    """Raise `CacheError` naming every problem found (rules in the module docstring)."""
    problems = [*_request_problems(engine), *_conservation_problems(engine), *_holder_problems(engine)]
    if engine.prefix_cache is not None:
        problems += engine.prefix_cache.check_invariants()
    if problems:
        raise CacheError(f"engine invariant violated ({len(problems)} problems): " + "; ".join(problems[:10]))


def _request_problems(engine: KVCacheEngine) -> list[str]:
    store, scheduler = engine.store, engine.scheduler
    problems = []
    owned = {}
    for request in scheduler.running:
        if request.seq_id is None:
            problems.append(f"running request {request.request_id} holds no sequence")
            continue
        owned[request.seq_id] = request
        if store.num_tokens(request.seq_id) != request.num_computed:
            problems.append(
                f"request {request.request_id}: sequence {request.seq_id} holds {store.num_tokens(request.seq_id)} "
                f"tokens but the request computed {request.num_computed}"
            )
    for seq_id in store.sequence_ids:
        if seq_id not in owned:
            problems.append(f"sequence {seq_id} is in the store but no running request holds it (leak)")
    for request in scheduler.waiting:
        if request.seq_id is not None:
            problems.append(f"waiting request {request.request_id} still holds sequence {request.seq_id}")
    return problems


def _conservation_problems(engine: KVCacheEngine) -> list[str]:
    """free + referenced + cached-only == capacity for each device pool."""
    store, cache = engine.store, engine.prefix_cache
    problems = []
    for pool, quantized in ((store.pool, False), (store.quantized_pool, True)):
        if pool is None:
            continue
        referenced = {
            block
            for seq_id in store.sequence_ids
            for block in (store.quantized_block_ids(seq_id) if quantized else store.block_ids(seq_id))
        }
        cached = set(cache.device_block_ids()) if cache is not None and cache.pool is pool else set()
        cached_only = cached - referenced
        total = pool.num_free + len(referenced) + len(cached_only)
        if total != pool.num_blocks:
            kind = "sealed" if quantized else "full-precision"
            problems.append(
                f"{kind} pool: free {pool.num_free} + referenced {len(referenced)} + cached-evictable "
                f"{len(cached_only)} = {total} != capacity {pool.num_blocks}"
            )
    return problems


def _holder_problems(engine: KVCacheEngine) -> list[str]:
    """Reference counts against holders, on the device (store) and in the CPU tier."""
    store, cache, tier = engine.store, engine.prefix_cache, engine.tier
    cached = [cache.device_block_ids()] if cache is not None else []
    quantized = store.quantized_pool is not None
    problems = []
    try:
        store.check_invariants(dense_holders=[] if quantized else cached, quantized_holders=cached if quantized else [])
    except CacheError as error:
        problems.append(str(error))
    if tier is None or store.pool is None:
        return problems
    holders: dict[BlockFormat, list[list[int]]] = {}
    for request in engine.scheduler.waiting:
        if isinstance(request.swapped, SwappedSequence):
            holders.setdefault(store.pool.block_format, []).append(request.swapped.dense_host_ids)
            if store.quantized_pool is not None:
                holders.setdefault(store.quantized_pool.block_format, []).append(request.swapped.sealed_host_ids)
    if cache is not None:
        holders.setdefault(cache.pool.block_format, []).append(cache.host_block_ids())
    try:
        tier.check_invariants(holders)
    except CacheError as error:
        problems.append(f"CPU tier: {error}")
    return problems
