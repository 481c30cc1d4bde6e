"""`CacheStatsTracker`: thread-safe counters, and a bounded history of snapshots for trends.

Counters only grow (tokens written, tokens read from the cache, errors); gauges (memory, blocks in use) are read
from the store when stats are asked for. `hit_rate` is the share of the keys/values handed to attention that came
from the cache rather than from the current call, i.e. the work the cache saved.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import torch

from kv_cache.kv_store import KVStore
from kv_cache.profiler import Profiler


class CacheStatsTracker:
    """Counters and a ring buffer of at most `history_size` snapshots."""

    def __init__(self, history_size: int = 128) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, int] = {}
        self._history: deque[dict[str, Any]] = deque(maxlen=history_size)

    def increment(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + amount

    def record_read(self, cached_tokens: int, new_tokens: int) -> None:
        """Attention read `cached_tokens` tokens from the cache and `new_tokens` from the current call."""
        with self._lock:
            counters = self._counters
            counters["cached_tokens_read"] = counters.get("cached_tokens_read", 0) + cached_tokens
            counters["new_tokens_read"] = counters.get("new_tokens_read", 0) + new_tokens

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    @property
    def hit_rate(self) -> float:
        with self._lock:
            cached = self._counters.get("cached_tokens_read", 0)
            total = cached + self._counters.get("new_tokens_read", 0)
        return cached / total if total else 0.0

    def snapshot(self, gauges: dict[str, Any]) -> None:
        """Append `gauges` plus a timestamp and the current hit rate to the history."""
        entry = {"time": time.time(), "hit_rate": self.hit_rate, **gauges}
        with self._lock:
            self._history.append(entry)

    def history(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._history)

    def reset(self) -> None:
        with self._lock:
            self._counters.clear()
            self._history.clear()


def store_gauges(store: KVStore) -> dict[str, Any]:
    """Memory and occupancy of a store: tokens, sequences, blocks, MiB, and bytes per token.

    `tokens` counts the tokens held, `tokens_seen` also those evicted. `bytes_per_token` is what one more held
    token costs in steady state (the sealed format when quantized), `compression_ratio` the model dtype's bytes
    per token over it, and `effective_bytes_per_token` the memory of the blocks in use over the tokens seen
    (full-precision tail, partly filled blocks and eviction all accounted).
    """
    sequences = store.sequence_ids
    tokens = sum(store.num_tokens(s) for s in sequences)
    seen = sum(store.num_seen(s, 0) for s in sequences)
    pools = [p for p in (store.pool, store.quantized_pool) if p is not None]
    gauges: dict[str, Any] = {
        "tokens": tokens,
        "tokens_seen": seen,
        "sequences": len(sequences),
        "blocks_used": sum(p.num_used for p in pools),
        "blocks_free": sum(p.num_free for p in pools),
        "blocks_total": sum(p.num_blocks for p in pools),
        "storage_memory_mb": sum(p.memory_bytes for p in pools) / 2**20,
        "used_memory_mb": sum(p.num_used * p.block_format.bytes_per_block for p in pools) / 2**20,
    }
    if store.pool is None:
        return {**gauges, "bytes_per_token": 0.0, "compression_ratio": 1.0, "effective_bytes_per_token": 0.0}
    steady = (store.quantized_pool or store.pool).block_format
    dense = store.pool.block_format
    model_bytes = dense.bytes_per_token * _element_size(store.model_dtype) / _element_size(dense.dtype)
    gauges["bytes_per_token"] = steady.bytes_per_token
    gauges["compression_ratio"] = model_bytes / steady.bytes_per_token
    gauges["effective_bytes_per_token"] = gauges["used_memory_mb"] * 2**20 / seen if seen else 0.0
    if store.quantized_pool is not None:
        gauges["quantized_blocks_used"] = store.quantized_pool.num_used
        gauges["full_precision_blocks_used"] = store.pool.num_used
    return gauges


def _element_size(dtype: torch.dtype | None) -> int:
    return torch.empty((), dtype=dtype or torch.float32).element_size()


def quantization_error(store: KVStore) -> dict[str, Any]:
    """Relative error (Frobenius) of quantizing each layer's full-precision tail blocks in its sealed format.

    Measured on the live, still exact tokens of the tail (whole blocks only), so it reflects this model's data.
    Returns `{"layers": [{"layer", "bits", "key_error", "value_error", "blocks"}...]}`, or an empty list
    without quantization or without a whole tail block yet.
    """
    if store.pool is None or store.quantized_pool is None:
        return {"layers": []}
    whole = [
        block_id
        for seq_id in store.sequence_ids
        for logical, block_id in store.dense_blocks(seq_id).items()
        if (logical + 1) * store.block_size <= store.num_tokens(seq_id)
    ]
    if not whole:
        return {"layers": []}
    ids = torch.tensor(whole, device=store.pool.device)
    rows = []
    for layer in range(store.num_layers):
        keys, values = store.pool.dense(layer).read(ids)
        storage = store.quantized_pool.quantized(layer)
        restored_k, restored_v = storage.decode(storage.encode(keys.float(), values.float()))
        rows.append(
            {
                "layer": layer,
                "bits": storage.bits,
                "key_error": _relative_error(restored_k, keys),
                "value_error": _relative_error(restored_v, values),
                "blocks": len(whole),
            }
        )
    return {"layers": rows}


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.float()
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-12))


def build_stats(
    store: KVStore,
    tracker: CacheStatsTracker,
    profiler: Profiler,
    include_history: bool = False,
    include_quantization_error: bool = False,
) -> dict[str, Any]:
    """The dict `get_stats` returns: gauges, counters, `hit_rate`, `profiling`, and optionally `history` and
    `quantization_error`."""
    stats: dict[str, Any] = store_gauges(store)
    stats.update(tracker.counters())
    stats["hit_rate"] = tracker.hit_rate
    stats["profiling"] = profiler.summary() if profiler.enabled else {}
    if include_history:
        stats["history"] = tracker.history()
    if include_quantization_error:
        stats["quantization_error"] = quantization_error(store)
    return stats
