"""`Tier`: a store of encoded blocks below the GPU pool (the CPU tier, the Redis tier), keyed by block hash.

Keys are block hashes (`bytes`, the prefix cache's content hash of parent hash, token ids and fingerprints);
values are `kv_cache.tiers.codec` values (`bytes`). A tier is a cache, never a source of truth: any key may vanish
at any time (eviction, TTL, a restart), and a failing tier answers misses instead of raising. Because entries
vanish one by one, a chain of blocks can lose a middle key: `get_chain` returns only the leading run of hits,
so a lookup never uses block i+1 without block i.

`CircuitBreaker` is the fault policy of remote tiers: after consecutive failures the tier is skipped outright
(a miss costs nothing), and a background probe with exponential backoff decides when to use it again.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from enum import Enum
from types import TracebackType
from typing import Any, TypeVar, overload

T = TypeVar("T")
TierT = TypeVar("TierT", bound="Tier")
StatValue = int | float | str


class FaultKind(str, Enum):
    """What went wrong in a tier, as its `stats()` count it (`faults_<kind>`)."""

    REFUSED = "refused"  # nothing listens (server down)
    RESET = "reset"  # the connection broke mid-command (server killed or restarted)
    CONNECTION = "connection"  # any other connection error: DNS, TLS, authentication, loading
    TIMEOUT = "timeout"  # no answer within the socket timeout (hung or overloaded server)
    OOM = "oom"  # a write refused at maxmemory (noeviction)
    RESPONSE = "response"  # any other error reply
    OVERSIZED = "oversized"  # a value over max_value_bytes: not written, or not returned
    INVALID = "invalid"  # a value the caller could not decode (garbage, corrupted, other tokens)


class Tier(ABC):
    """A key-value store of encoded blocks. `get_many`/`put_many` never raise for faults of the store."""

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The values of `keys` (block hashes), None for each miss; one batched lookup, never raises on faults."""

    @abstractmethod
    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Store `(block hash, value)` pairs; may return before they are stored (see `flush`), never blocks on
        the store and never raises on its faults (a dropped write is counted in `stats`)."""

    @abstractmethod
    def record_invalid(self, key: bytes) -> None:
        """Count a value of `key` that the caller found invalid (`decode_block` returned None)."""

    @abstractmethod
    def stats(self) -> dict[str, StatValue]:
        """Counters (lookups, hits, misses, writes, drops, faults by kind) and state, free of secrets."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and threads; pending writes are attempted for a bounded time, then dropped."""

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait up to `timeout_s` seconds until every accepted write was attempted; True if it finished in time.

        Tiers that write synchronously have nothing to wait for.
        """
        return True

    def is_available(self) -> bool:
        """Whether the store is worth asking now (False while a remote tier's breaker is open, or after `close`)."""
        return True

    def chain_batch(self) -> int:
        """Keys per lookup in `get_chain`; it stops at the first miss, so smaller lookups waste less after a hole."""
        return 16

    @overload
    def get_chain(self, keys: Sequence[bytes], *, deadline: float | None = None) -> list[bytes]: ...

    @overload
    def get_chain(
        self, keys: Sequence[bytes], decode: Callable[[int, bytes], T | None], deadline: float | None = None
    ) -> list[T]: ...

    def get_chain(
        self,
        keys: Sequence[bytes],
        decode: Callable[[int, bytes], Any] | None = None,
        deadline: float | None = None,
    ) -> list[Any]:
        """The leading run of hits of a chain of block hashes `keys` (parent first), `chain_batch()` keys a lookup.

        With `decode(index, value)`, returns the decoded blocks instead and also stops at the first value that
        decodes to None, counting it with `record_invalid` (e.g. `decode_block` with the chain's token ids).
        With `deadline` (a `time.perf_counter()` value), no lookup starts after it: the run found so far returns.
        """
        run: list[Any] = []
        batch = self.chain_batch()
        for start in range(0, len(keys), batch):
            if start and deadline is not None and time.perf_counter() > deadline:
                return run
            values = self.get_many(keys[start : start + batch])
            for offset, value in enumerate(values):
                if value is None:
                    return run
                item = value if decode is None else decode(start + offset, value)
                if item is None:
                    self.record_invalid(keys[start + offset])
                    return run
                run.append(item)
        return run

    def __enter__(self: TierT) -> TierT:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class CircuitBreaker:
    """Closed -> open after `threshold` consecutive failures; open -> closed when a background probe succeeds.

    While open, callers skip the store (no request pays a timeout). The first probe is due `open_s` seconds after
    opening; each failed probe doubles the wait, up to `max_backoff_s`. Thread-safe.
    """

    def __init__(self, threshold: int, open_s: float, max_backoff_s: float) -> None:
        self.threshold = threshold
        self.open_s = open_s
        self.max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._failures = 0
        self._open = False
        self._backoff_s = open_s
        self._next_probe = 0.0

    @property
    def is_open(self) -> bool:
        return self._open

    def record_success(self) -> bool:
        """Reset the failure count; True if this closed an open breaker."""
        with self._lock:
            was_open, self._open = self._open, False
            self._failures = 0
            self._backoff_s = self.open_s
            return was_open

    def record_failure(self) -> bool:
        """Count a failed operation; True if this opened the breaker."""
        with self._lock:
            self._failures += 1
            if self._open or self._failures < self.threshold:
                return False
            self._open = True
            self._next_probe = time.monotonic() + self._backoff_s
            return True

    def record_probe_failure(self) -> None:
        """A probe failed: stay open and wait twice as long (capped) for the next one."""
        with self._lock:
            self._backoff_s = min(2 * self._backoff_s, self.max_backoff_s)
            self._next_probe = time.monotonic() + self._backoff_s

    def seconds_to_probe(self) -> float | None:
        """None while closed; else the seconds until the next probe is due (<= 0: due now)."""
        with self._lock:
            return self._next_probe - time.monotonic() if self._open else None
