"""The serving engine: many requests over one block pool (continuous batching, prefix caching, preemption).

`KVCacheEngine` is the public face (the seed's `UltraAdaptiveKVCacheEngine` is the same class);
`EngineConfig` holds its settings and `SamplingParams` a request's.
"""

from kv_cache.engine.config import EngineConfig, InvariantCheck, PreemptionMode
from kv_cache.engine.engine import KVCacheEngine
from kv_cache.engine.request import FinishReason, Request, RequestStatus, SamplingParams

UltraAdaptiveKVCacheEngine = KVCacheEngine  # the seed's name

__all__ = [
    "EngineConfig",
    "FinishReason",
    "InvariantCheck",
    "KVCacheEngine",
    "PreemptionMode",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "UltraAdaptiveKVCacheEngine",
]
