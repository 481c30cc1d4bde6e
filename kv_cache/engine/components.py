"""The engine's components, built from its configs: the store, the CPU tier, the prefix cache, the Redis link.

`KVCacheEngine.__init__` calls these in this order; each returns None for a component the config leaves out.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from kv_cache.config import KVCacheConfig
from kv_cache.engine.config import EngineConfig
from kv_cache.hf_cache import attention_layer_types
from kv_cache.kv_store import KVStore
from kv_cache.prefix_cache import PrefixCache, model_fingerprint, root_hash
from kv_cache.tiers.cpu import CpuTier, host_blocks_per_format
from kv_cache.tiers.remote import RemoteLink


def initialized_store(
    model: PreTrainedModel, config: KVCacheConfig, max_num_seqs: int, spare_tokens: int = 0
) -> KVStore:
    """A store for the model's decoder layers, its pools allocated now (sized for `max_num_seqs` by default; a
    quantized store's tail pool with room for `spare_tokens` more, see `KVStore.initialize`)."""
    text = model.config.get_text_config(decoder=True)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    parameter = next(model.parameters())
    store = KVStore(config, len(attention_layer_types(model.config)))
    store.initialize(kv_heads, head_dim, parameter.dtype, parameter.device, max_num_seqs, spare_tokens)
    return store


def make_prefix_cache(
    model: PreTrainedModel, config: KVCacheConfig, engine_config: EngineConfig, store: KVStore, tier: CpuTier | None
) -> PrefixCache | None:
    """The prefix cache over the store's shareable pool (the sealed one when quantized), or None when off."""
    pool = store.quantized_pool or store.pool
    if not engine_config.enable_prefix_caching or pool is None:
        return None
    fingerprint = model_fingerprint(model.config, next(model.parameters()).dtype)
    root = root_hash(engine_config.namespace, fingerprint, pool.block_format)
    return PrefixCache(pool, config.cache_strategy, root, tier, collect_new=engine_config.redis_url is not None)


def make_remote(config: EngineConfig, cache: PrefixCache | None) -> RemoteLink | None:
    """The link to the Redis tier the config asks for, or None. Its keys carry the prefix root (namespace, model
    and block-format fingerprints) as their fingerprint, so another model or format never shares a key."""
    if config.redis_url is None or cache is None:
        return None
    from kv_cache.tiers.redis import RedisTier  # needs the `redis` extra

    return RemoteLink(cache, RedisTier(config.redis_tier_config(cache.root.hex())))


def make_tier(store: KVStore, config: EngineConfig) -> CpuTier | None:
    """The CPU tier the config asks for (one host pool per store pool), or None."""
    if not config.has_cpu_tier:
        return None
    pools = [pool for pool in (store.pool, store.quantized_pool) if pool is not None]
    counts = host_blocks_per_format(pools, config.cpu_tier_blocks, config.cpu_tier_mb)
    return CpuTier([pool.block_format for pool in pools], counts, pools[0].device, config.pin_memory)
