"""kv_cache: a paged, quantizable KV-cache engine for PyTorch transformer inference.

Importing this package does nothing but define names: no device queries, no torch global settings, no patching
of `transformers`.
"""

from kv_cache.block_format import BlockFormat
from kv_cache.block_pool import BlockPool
from kv_cache.block_table import BlockTable
from kv_cache.config import CacheMode, CacheStrategy, KVCacheConfig
from kv_cache.decode_graphs import decode_graphs
from kv_cache.devices import (
    available_devices,
    enable_speed_settings,
    get_device_info,
    resolve_device,
    safe_device_transfer,
    speed_settings,
)
from kv_cache.engine import EngineConfig, KVCacheEngine, SamplingParams, UltraAdaptiveKVCacheEngine
from kv_cache.errors import CacheDeviceError, CacheError, CacheMemoryError, CacheValidationError
from kv_cache.hf_cache import KVCache
from kv_cache.kv_store import KVStore
from kv_cache.low_rank import Compressor
from kv_cache.memory_manager import MemoryManager
from kv_cache.policies import AdaptivePolicy, LFUPolicy, LRUPolicy, Policy, make_policy
from kv_cache.prefix_cache import PrefixCache
from kv_cache.profiler import Profiler
from kv_cache.quantizer import Quantizer
from kv_cache.seed_api import (
    AdaptiveEvictionStrategy,
    AdaptiveKVCache,
    BaseKVCache,
    BatchCacheOperations,
    LFUEvictionStrategy,
    LRUEvictionStrategy,
    PagedKVCache,
    create_eviction_strategy,
)
from kv_cache.stats import CacheStatsTracker
from kv_cache.tensors import calculate_tensor_memory_mb, format_memory_size, get_tensor_info, validate_tensor_shapes

__version__ = "0.1.0"

__all__ = [
    "AdaptiveEvictionStrategy",
    "AdaptiveKVCache",
    "AdaptivePolicy",
    "BaseKVCache",
    "BatchCacheOperations",
    "BlockFormat",
    "BlockPool",
    "BlockTable",
    "CacheDeviceError",
    "CacheError",
    "CacheMemoryError",
    "CacheMode",
    "CacheStatsTracker",
    "CacheStrategy",
    "CacheValidationError",
    "Compressor",
    "EngineConfig",
    "KVCache",
    "KVCacheConfig",
    "KVCacheEngine",
    "KVStore",
    "LFUEvictionStrategy",
    "LFUPolicy",
    "LRUEvictionStrategy",
    "LRUPolicy",
    "MemoryManager",
    "PagedKVCache",
    "Policy",
    "PrefixCache",
    "Profiler",
    "Quantizer",
    "SamplingParams",
    "UltraAdaptiveKVCacheEngine",
    "available_devices",
    "calculate_tensor_memory_mb",
    "create_eviction_strategy",
    "decode_graphs",
    "enable_speed_settings",
    "format_memory_size",
    "get_device_info",
    "get_tensor_info",
    "make_policy",
    "resolve_device",
    "safe_device_transfer",
    "speed_settings",
    "validate_tensor_shapes",
]
