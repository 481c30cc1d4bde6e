"""`RedisTier`: encoded blocks shared across processes and machines through Redis (redis-py, hiredis parser).

Keys: `kvc:{namespace}:{fingerprint}:{block hash hex}` (`redis_key`). The namespace isolates deployments sharing
one server, the fingerprint (the caller's model + block format identity) isolates models, the block hash is the
prefix cache's content hash. Values: `kv_cache.tiers.codec` values (header + raw bytes), checked by the caller.

Eviction is Redis's: run the server with `maxmemory` and `maxmemory-policy allkeys-lru` (or `allkeys-lfu`); a
`ttl_s` adds expiry. Redis evicts single keys, so a chain can lose a middle block: use `get_chain`. Under
`noeviction` a full server refuses writes (counted as `faults_oom`) while reads keep working.

Faults never reach the caller and never cost a request more than one short timeout:

    reads   one MGET per `get_many` (`get_chain`: ~`read_batch_bytes` each), `socket_timeout_s` (0.1 s) per
            socket operation, one retry on a connection error (a stale pooled connection), none on a timeout
            (a hung server would charge it twice)
    writes  `put_many` only queues (bounded by `queue_bytes`; full -> dropped and counted); a background thread
            sends pipelines of up to `write_batch_bytes`, with its own `write_timeout_s`
    breaker after `failure_threshold` consecutive failed operations the tier is *open*: reads answer misses at
            once and writes are dropped, for `open_s` (1 s); then the writer thread PINGs in the background,
            doubling the wait after each failed probe up to `max_backoff_s`; a good PING closes it

Every fault is counted by `FaultKind` in `stats()`; logs come once per state change (opened, reconnected, writes
refused, writes accepted again), never per request. Passwords never appear in logs, stats or reprs.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kv_cache.errors import CacheValidationError
from kv_cache.tiers.base import CircuitBreaker, FaultKind, StatValue, Tier

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # the optional extra is not installed
    raise ImportError("RedisTier needs redis-py: pip install 'kv-cache-engine[redis]'") from exc

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_SCHEMES = ("redis", "rediss", "unix")
MAX_REDIS_VALUE_BYTES = 512 * 2**20  # Redis's largest string (proto-max-bulk-len)
_YEAR_S = 365 * 86400.0
_FAULTS = (redis.RedisError, OSError)  # OSError: socket and TLS errors redis-py lets through
_COUNTERS = (
    "lookups", "hits", "misses", "skipped_reads", "read_round_trips", "read_bytes",
    "puts", "written", "write_round_trips", "write_failures",
    "dropped_queue_full", "dropped_open", "dropped_closed", "breaker_opens", "reconnects", "probe_failures",
)  # fmt: skip


def classify(error: BaseException) -> FaultKind:
    """The `FaultKind` of an exception raised by redis-py (its socket error is the `__context__`)."""
    if isinstance(error, (redis.TimeoutError, TimeoutError)):
        return FaultKind.TIMEOUT
    if isinstance(error, redis.ResponseError):
        return FaultKind.OOM if isinstance(error, redis.exceptions.OutOfMemoryError) else FaultKind.RESPONSE
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return FaultKind.REFUSED
        if isinstance(cause, (ConnectionResetError, BrokenPipeError)) or "closed by server" in str(cause):
            return FaultKind.RESET
        cause = cause.__cause__ or cause.__context__
    return FaultKind.CONNECTION


def mask_url(url: str) -> str:
    """`url` with its password (userinfo or `password=` query option) replaced by `***`."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        netloc = f"{user}:***@{netloc.rpartition('@')[2]}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def key_prefix(namespace: str, fingerprint: str) -> bytes:
    """`kvc:{namespace}:{fingerprint}:`; both must match `[A-Za-z0-9._-]{1,128}` (no `:`, so keys are unambiguous)."""
    for name, value in (("namespace", namespace), ("fingerprint", fingerprint)):
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise CacheValidationError(
                f"{name}={value!r} is not allowed; use 1-128 characters from A-Z a-z 0-9 . _ - (e.g. a hex digest)"
            )
    return f"kvc:{namespace}:{fingerprint}:".encode()


def redis_key(namespace: str, fingerprint: str, block_hash: bytes) -> bytes:
    """The Redis key of a block: `kvc:{namespace}:{fingerprint}:{block_hash.hex()}` (ASCII bytes)."""
    return key_prefix(namespace, fingerprint) + _hash_hex(block_hash)


def _hash_hex(block_hash: bytes) -> bytes:
    if not isinstance(block_hash, bytes) or not 1 <= len(block_hash) <= 64:
        raise CacheValidationError(f"block hash {block_hash!r} must be 1-64 bytes (a content digest)")
    return block_hash.hex().encode()


@dataclass(frozen=True, repr=False)
class RedisTierConfig:
    """Settings of a `RedisTier`. Times in seconds, sizes in bytes.

    Attributes:
        url: `redis://[[user]:password@]host:port/db`, `rediss://...` (TLS) or `unix:///path.sock`.
        namespace: isolates deployments sharing a server; fingerprint: the model + block format identity.
        ttl_s: expire each block this long after its write; None leaves eviction to Redis's maxmemory policy.
        max_value_bytes: larger values are not written (and not returned); Redis's own limit is 512 MiB.
        socket_timeout_s: per socket operation of a read, a probe or a connect (the request path's worst case).
        write_timeout_s: per socket operation of a background write pipeline (off the request path).
        failure_threshold: consecutive failed operations that open the breaker.
        open_s: how long an open breaker skips Redis before the first probe; max_backoff_s: the probes' cap.
        queue_bytes: pending writes held at most (more are dropped); write_batch_bytes: bytes per pipeline.
        read_batch_bytes: bytes per MGET that `get_chain` aims at (from the average value size seen).
        Both batch sizes default to 2 MiB: many small blocks share a round trip, while 1 MiB blocks go one or
        two at a time (pipelines and replies of 8+ MiB moved 1 MiB blocks slower here, benchmarks/redis_tier.py).
    """

    url: str
    namespace: str
    fingerprint: str
    ttl_s: float | None = None
    max_value_bytes: int = 16 * 2**20
    socket_timeout_s: float = 0.1
    write_timeout_s: float = 1.0
    failure_threshold: int = 3
    open_s: float = 1.0
    max_backoff_s: float = 30.0
    queue_bytes: int = 256 * 2**20
    write_batch_bytes: int = 2 * 2**20
    read_batch_bytes: int = 2 * 2**20

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or urlsplit(self.url).scheme not in _SCHEMES:
            shown = mask_url(self.url) if isinstance(self.url, str) else repr(self.url)
            raise CacheValidationError(f"url={shown} must start with redis://, rediss:// (TLS) or unix://")
        key_prefix(self.namespace, self.fingerprint)
        if self.ttl_s is not None:
            _check_number("ttl_s", self.ttl_s, 0.001, _YEAR_S)
        _check_number("max_value_bytes", self.max_value_bytes, 1, MAX_REDIS_VALUE_BYTES, integer=True)
        _check_number("socket_timeout_s", self.socket_timeout_s, 0.001, 60.0)
        _check_number("write_timeout_s", self.write_timeout_s, 0.001, 600.0)
        _check_number("failure_threshold", self.failure_threshold, 1, 1_000_000, integer=True)
        _check_number("open_s", self.open_s, 0.001, 3600.0)
        _check_number("max_backoff_s", self.max_backoff_s, self.open_s, 3600.0)
        _check_number("queue_bytes", self.queue_bytes, self.max_value_bytes, 2**40, integer=True)
        _check_number("write_batch_bytes", self.write_batch_bytes, 1, 2**40, integer=True)
        _check_number("read_batch_bytes", self.read_batch_bytes, 1, 2**40, integer=True)

    def __repr__(self) -> str:
        fields = (f"{field.name}={getattr(self, field.name)!r}" for field in dataclasses.fields(self)[1:])
        return f"RedisTierConfig(url={mask_url(self.url)!r}, {', '.join(fields)})"


def _check_number(name: str, value: Any, low: float, high: float, integer: bool = False) -> None:
    """Raise `CacheValidationError` unless `value` is a number (an int if `integer`) with `low <= value <= high`."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise CacheValidationError(f"{name}={value!r} must be {kind} in [{low:g}, {high:g}]")


def _client(url: str, timeout_s: float) -> redis.Redis:
    """A redis-py client that waits at most `timeout_s` per socket operation and connect, and retries a
    connection error once (a pooled connection the server closed) but never a timeout."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        health_check_interval=0,
    )


class RedisTier(Tier):
    """Blocks in Redis under `redis_key(config.namespace, config.fingerprint, block_hash)`; see the module doc.

    `client` is the redis-py client of the request path (reads, probes); writes use a second one in the
    background thread. Nothing connects before the first operation, so a server down at start is just a fault.
    """

    def __init__(self, config: RedisTierConfig) -> None:
        self.config = config
        self._prefix = key_prefix(config.namespace, config.fingerprint)
        self._ttl_ms = None if config.ttl_s is None else max(1, round(config.ttl_s * 1000))
        self._secret = urlsplit(config.url).password
        self.client = _client(config.url, config.socket_timeout_s)
        self._writer = _client(config.url, config.write_timeout_s)
        self._breaker = CircuitBreaker(config.failure_threshold, config.open_s, config.max_backoff_s)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # guards _counts, _logged, _writes_refused
        self._logged: set[FaultKind] = set()  # kinds logged since the last state change
        self._writes_refused = False
        self._cond = threading.Condition()  # guards the queue, _in_flight, _closed
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self._queue_bytes = 0
        self._in_flight = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kv_cache-redis-writer", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        state = "open" if self._breaker.is_open else "closed"
        return f"RedisTier(url={mask_url(self.config.url)!r}, namespace={self.config.namespace!r}, {state})"

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """One MGET for `keys` (block hashes); misses (None) for absent keys, oversized values and any fault."""
        names = [self._prefix + _hash_hex(key) for key in keys]
        if not names:
            return []
        if not self.is_available():
            self._count(skipped_reads=len(names))
            return [None] * len(names)
        start = time.perf_counter()
        try:
            values = self.client.mget(names)
        except _FAULTS as exc:
            self._fail(exc)
            self._count(lookups=len(names), misses=len(names), read_round_trips=1)
            return [None] * len(names)
        elapsed_us = round((time.perf_counter() - start) * 1e6)
        self._succeed()
        limit = self.config.max_value_bytes
        out = [value if isinstance(value, bytes) and len(value) <= limit else None for value in values]
        for value in values:
            if isinstance(value, bytes) and len(value) > limit:
                self._fault(FaultKind.OVERSIZED, f"a stored value of {len(value)} bytes > max_value_bytes={limit}")
        hits = [value for value in out if value is not None]
        self._count(
            lookups=len(out), hits=len(hits), misses=len(out) - len(hits), read_round_trips=1,
            read_bytes=sum(len(value) for value in hits), read_us=elapsed_us,
        )  # fmt: skip
        return out

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Queue `(block hash, value)` writes for the background pipeline; never blocks, never raises on faults.

        Dropped and counted: values over `max_value_bytes`, writes while the breaker is open or after `close`,
        and writes that would take the queue over `queue_bytes`.
        """
        accepted = []
        for key, value in items:
            name = self._prefix + _hash_hex(key)
            if not isinstance(value, bytes):
                raise CacheValidationError(f"value for key {key.hex()} is {type(value).__name__}, expected bytes")
            if len(value) > self.config.max_value_bytes:
                self._fault(FaultKind.OVERSIZED, f"a value of {len(value)} bytes > max_value_bytes, not written")
            else:
                accepted.append((name, value))
        self._count(puts=len(items))
        if self._breaker.is_open:
            self._count(dropped_open=len(accepted))
            return
        dropped = 0
        with self._cond:
            if self._closed:
                self._count(dropped_closed=len(accepted))
                return
            for name, value in accepted:
                if self._queue_bytes + len(value) > self.config.queue_bytes:
                    dropped += 1
                    continue
                self._queue.append((name, value))
                self._queue_bytes += len(value)
            self._cond.notify()
        self._count(dropped_queue_full=dropped)

    def is_available(self) -> bool:
        """False while the breaker is open (reads answer misses, writes are dropped) or after `close`."""
        return not (self._breaker.is_open or self._closed)

    def chain_batch(self) -> int:
        """Keys per MGET in `get_chain`: as many values of the average size read so far as fit in
        `read_batch_bytes` (16 before the first hit). Large replies read slower per block: 1 MiB blocks took
        0.43 ms each one per MGET vs 0.64 ms at 32 per MGET here (benchmarks/results/redis_tier.txt)."""
        with self._lock:
            hits, size = self._counts["hits"], self._counts["read_bytes"]
        return 16 if not hits else max(1, min(64, round(self.config.read_batch_bytes * hits / max(1, size))))

    def record_invalid(self, key: bytes) -> None:
        self._fault(FaultKind.INVALID, f"the value of block {key.hex()} failed its header or checksum check")

    def flush(self, timeout_s: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._in_flight, timeout_s)

    def stats(self) -> dict[str, StatValue]:
        """Counters (blocks, bytes, round trips), `faults_<kind>` per `FaultKind`, breaker state, queue bytes."""
        with self._lock:
            counts = Counter(self._counts)
        out: dict[str, StatValue] = {name: counts[name] for name in _COUNTERS}
        out["read_s"] = counts["read_us"] / 1e6
        for kind in FaultKind:
            out[f"faults_{kind.value}"] = counts[f"faults_{kind.value}"]
        out["faults"] = sum(counts[f"faults_{kind.value}"] for kind in FaultKind)
        out["state"] = "open" if self._breaker.is_open else "closed"
        out["queue_bytes"] = self._queue_bytes
        out["url"] = mask_url(self.config.url)
        out["namespace"] = self.config.namespace
        return out

    def close(self) -> None:
        """Stop the writer after at most ~2 write timeouts (pending writes are then dropped); close connections."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=2 * self.config.write_timeout_s)
        with self._cond:
            self._count(dropped_closed=len(self._queue))
            self._queue.clear()
            self._queue_bytes = 0
        self.client.close()
        self._writer.close()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._write(batch)
            with self._cond:
                self._in_flight = 0
                self._cond.notify_all()
            wait = self._breaker.seconds_to_probe()
            if wait is not None and wait <= 0:
                self._probe()

    def _next_batch(self) -> list[tuple[bytes, bytes]] | None:
        """Up to `write_batch_bytes` of queued writes; [] when a probe is due; None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                wait = self._breaker.seconds_to_probe()
                if wait is not None and wait <= 0:
                    return []
                self._cond.wait(timeout=wait)
            batch: list[tuple[bytes, bytes]] = []
            size = 0
            while self._queue and (not batch or size + len(self._queue[0][1]) <= self.config.write_batch_bytes):
                batch.append(self._queue.popleft())
                size += len(batch[-1][1])
            self._queue_bytes -= size
            self._in_flight = len(batch)
            return batch

    def _write(self, batch: list[tuple[bytes, bytes]]) -> None:
        """One pipeline of SETs (with PX when `ttl_s` is set); errors per command are counted, not raised."""
        if self._breaker.is_open:
            self._count(dropped_open=len(batch))
            return
        pipe = self._writer.pipeline(transaction=False)
        for name, value in batch:
            pipe.set(name, value, px=self._ttl_ms)
        try:
            results = pipe.execute(raise_on_error=False)
        except _FAULTS as exc:
            self._fail(exc)
            self._count(write_failures=len(batch), write_round_trips=1)
            return
        self._succeed()
        errors = [result for result in results if isinstance(result, Exception)]
        for error in errors:
            self._fault(classify(error), f"a write was refused ({type(error).__name__})")
        self._count(written=len(batch) - len(errors), write_failures=len(errors), write_round_trips=1)
        with self._lock:
            recovered, self._writes_refused = self._writes_refused and not errors, bool(errors)
        if recovered:
            self._state_changed(logging.INFO, "accepts writes again")

    def _probe(self) -> None:
        try:
            self.client.ping()
        except _FAULTS:
            self._breaker.record_probe_failure()
            self._count(probe_failures=1)
            return
        self._succeed()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            self._counts.update(deltas)

    def _fault(self, kind: FaultKind, detail: str) -> None:
        """Count a fault of `kind`; log it only the first time since the last state change."""
        with self._lock:
            self._counts[f"faults_{kind.value}"] += 1
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            logger.warning("%s: %s (%s; further ones are counted in stats, not logged)", self, detail, kind.value)

    def _fail(self, error: BaseException) -> None:
        """An operation failed on the connection: count it, and open the breaker at the threshold."""
        kind = classify(error)
        with self._lock:
            self._counts[f"faults_{kind.value}"] += 1
        if self._breaker.record_failure():
            text = f"{type(error).__name__}: {error}"
            text = text.replace(self._secret, "***") if self._secret else text  # redis-py's messages have none, yet
            self._state_changed(
                logging.WARNING, f"unavailable ({kind.value}: {text}); skipping it for {self.config.open_s:g} s, "
                "then probing in the background with backoff",
            )  # fmt: skip
            self._count(breaker_opens=1)
            with self._cond:  # wake the writer thread: it runs the probes
                self._cond.notify()

    def _succeed(self) -> None:
        if self._breaker.record_success():
            self._count(reconnects=1)
            self._state_changed(logging.INFO, "reachable again; reads and writes resume")

    def _state_changed(self, level: int, message: str) -> None:
        with self._lock:
            self._logged.clear()
        logger.log(level, "%s %s", self, message)
