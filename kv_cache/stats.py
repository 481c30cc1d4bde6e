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
    """Memory and occupancy of a store: tokens, sequences, blocks used/free/total, MiB, bytes per token."""
    pool = store.pool
    tokens = sum(store.num_tokens(s) for s in store.sequence_ids)
    if pool is None:
        return {
            "tokens": tokens,
            "sequences": len(store.sequence_ids),
            "blocks_used": 0,
            "blocks_free": 0,
            "blocks_total": 0,
            "storage_memory_mb": 0.0,
            "used_memory_mb": 0.0,
            "bytes_per_token": 0,
        }
    fmt = pool.block_format
    return {
        "tokens": tokens,
        "sequences": len(store.sequence_ids),
        "blocks_used": pool.num_used,
        "blocks_free": pool.num_free,
        "blocks_total": pool.num_blocks,
        "storage_memory_mb": pool.memory_bytes / 2**20,
        "used_memory_mb": pool.num_used * fmt.bytes_per_block / 2**20,
        "bytes_per_token": fmt.bytes_per_token,
    }


def build_stats(
    store: KVStore, tracker: CacheStatsTracker, profiler: Profiler, include_history: bool = False
) -> dict[str, Any]:
    """The dict `get_stats` returns: gauges, counters, `hit_rate`, `profiling`, and optionally `history`."""
    stats: dict[str, Any] = store_gauges(store)
    stats.update(tracker.counters())
    stats["hit_rate"] = tracker.hit_rate
    stats["profiling"] = profiler.summary() if profiler.enabled else {}
    if include_history:
        stats["history"] = tracker.history()
    return stats
