"""`RedisTier` against a real `redis-server` on a free loopback port, persistence off, one server per test.

Faults are real: kill -9, SIGSTOP (hung), restart, FLUSHALL, maxmemory with allkeys-lru (holes in chains) and
noeviction (write errors), corrupted values. Oracles: no exception escapes, every fault is counted by kind and
logged once, misses instead of wrong data, and the latency of a get once the breaker is open.
Servers come from the `redis_server` / `start_redis` fixtures of conftest.py (CI fails when redis-server is missing).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
import redis
import torch

from kv_cache.block_format import BlockFormat
from kv_cache.errors import CacheValidationError
from kv_cache.tiers import base as tiers_base
from kv_cache.tiers.base import CircuitBreaker
from kv_cache.tiers.codec import decode_block, encode_block
from kv_cache.tiers.redis import RedisTier, RedisTierConfig, mask_url, redis_key

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = pytest.mark.timeout(30)
MakeTier = Callable[..., RedisTier]
Log = pytest.LogCaptureFixture

FORMAT = BlockFormat(4, 2, 2, 8, torch.bfloat16)
LOGGER = "kv_cache.tiers.redis"


@pytest.fixture
def log(caplog: Log) -> Log:
    """The tier's log records (INFO and up)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


@pytest.fixture
def make_tier() -> Iterator[MakeTier]:
    """Build tiers (open_s 0.2 s so recovery tests are quick); all are closed at teardown."""
    tiers: list[RedisTier] = []

    def make(url: str, **overrides: object) -> RedisTier:
        options: dict = {"namespace": "test", "fingerprint": "fp", "open_s": 0.2, **overrides}
        tiers.append(RedisTier(RedisTierConfig(url=url, **options)))
        return tiers[-1]

    yield make
    for tier in tiers:
        tier.close()


def block_hash(index: int, salt: str = "") -> bytes:
    return hashlib.blake2b(f"{salt}block{index}".encode(), digest_size=16).digest()


def block(index: int) -> tuple[list[torch.Tensor], list[int]]:
    """Deterministic tensors and token ids of block `index` of `FORMAT`."""
    shape = (FORMAT.block_size, FORMAT.kv_heads, FORMAT.head_dim)
    numel = FORMAT.block_size * FORMAT.kv_heads * FORMAT.head_dim
    tensors = [
        (torch.arange(numel, dtype=torch.float32).reshape(shape) * 0.01 + index + 0.5 * part).to(torch.bfloat16)
        for part in range(2 * FORMAT.num_layers)
    ]
    return tensors, [index * 100 + offset for offset in range(FORMAT.block_size)]


def encoded(index: int) -> bytes:
    return encode_block(FORMAT, *block(index))


def decoder(first: int = 0) -> Callable[[int, bytes], list[torch.Tensor] | None]:
    return lambda index, data: decode_block(data, FORMAT, block(first + index)[1])


def put_chain(tier: RedisTier, count: int) -> list[bytes]:
    hashes = [block_hash(index) for index in range(count)]
    tier.put_many([(h, encoded(index)) for index, h in enumerate(hashes)])
    assert tier.flush(10)
    return hashes


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def timed_gets(tier: RedisTier, keys: list[bytes], count: int) -> list[float]:
    """Latencies (seconds) of `count` get_many calls; each must answer all misses without raising."""
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        assert tier.get_many(keys) == [None] * len(keys)
        latencies.append(time.perf_counter() - start)
    return latencies


def p99(latencies: list[float]) -> float:
    return sorted(latencies)[min(len(latencies) - 1, int(0.99 * len(latencies)))]


def warnings(log: Log) -> list[str]:
    return [record.getMessage() for record in log.records if record.levelno >= logging.WARNING]


def test_round_trip_and_chain(redis_server: RedisServer, make_tier: MakeTier) -> None:
    tier = make_tier(redis_server.url)
    hashes = put_chain(tier, 5)
    values = tier.get_many([*hashes, block_hash(99)])
    assert values[:5] == [encoded(index) for index in range(5)] and values[5] is None
    chain = tier.get_chain(hashes, decoder())
    assert len(chain) == 5
    for index, tensors in enumerate(chain):
        for got, want in zip(tensors, block(index)[0], strict=True):
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # bf16 bit-exact
    stats = tier.stats()
    assert (stats["hits"], stats["misses"], stats["written"], stats["faults"]) == (10, 1, 5, 0)
    assert redis_server.admin().exists(redis_key("test", "fp", hashes[0])) == 1


def test_puts_are_pipelined_and_gets_batched(redis_server: RedisServer, make_tier: MakeTier) -> None:
    admin = redis_server.admin()
    tier = make_tier(redis_server.url)
    hashes = [block_hash(index) for index in range(100)]
    reads_before = admin.info("stats")["total_reads_processed"]
    tier.put_many([(h, bytes([index]) * 64) for index, h in enumerate(hashes)])  # 13 KiB: one socket read or two
    assert tier.flush(10)
    socket_reads = admin.info("stats")["total_reads_processed"] - reads_before - 1  # -1: this INFO
    assert tier.get_many(hashes) == [bytes([index]) * 64 for index in range(100)]
    commands = admin.info("commandstats")
    print(f"100 puts: {tier.stats()['write_round_trips']} pipelines, {socket_reads} server socket reads")
    assert commands["cmdstat_set"]["calls"] == 100 and tier.stats()["write_round_trips"] == 1
    assert socket_reads < 20  # one SET per round trip would be >= 100 reads (+ the connection's handshake)
    assert commands["cmdstat_mget"]["calls"] == 1 and "cmdstat_get" not in commands
    assert tier.stats()["read_round_trips"] == 1


def test_get_chain_stops_at_the_first_hole_or_invalid_value(redis_server: RedisServer, make_tier: MakeTier) -> None:
    tier = make_tier(redis_server.url, read_batch_bytes=3 * len(encoded(0)))
    hashes = put_chain(tier, 8)
    assert tier.chain_batch() == 16 and len(tier.get_many(hashes[:1])) == 1
    assert tier.chain_batch() == 3  # learnt from the values read: several lookups per chain
    admin = redis_server.admin()
    admin.delete(redis_key("test", "fp", hashes[5]))
    assert tier.get_chain(hashes) == [encoded(index) for index in range(5)]
    assert tier.get_many(hashes[6:]) == [encoded(6), encoded(7)]  # later blocks survive: never used
    flipped = bytearray(encoded(2))
    flipped[-1] ^= 1
    admin.set(redis_key("test", "fp", hashes[2]), bytes(flipped))
    assert len(tier.get_chain(hashes, decoder())) == 2
    assert len(tier.get_chain(hashes)) == 5  # undecoded: the caller checks
    assert tier.stats()["faults_invalid"] == 1


def test_get_chain_starts_no_lookup_after_its_deadline(redis_server: RedisServer, make_tier: MakeTier) -> None:
    tier = make_tier(redis_server.url, read_batch_bytes=3 * len(encoded(0)))
    hashes = put_chain(tier, 8)
    tier.get_many(hashes[:1])  # three values per lookup from now on
    assert len(tier.get_chain(hashes, deadline=time.perf_counter() - 1)) == 3  # the first lookup still runs
    assert len(tier.get_chain(hashes, deadline=time.perf_counter() + 60)) == 8
    assert tier.is_available()
    tier.close()
    assert not tier.is_available()


@pytest.mark.parametrize("damage", ["flipped", "truncated", "other_tokens", "other_format", "garbage", "empty"])
def test_damaged_values_are_counted_misses(redis_server: RedisServer, make_tier: MakeTier, damage: str) -> None:
    tier = make_tier(redis_server.url)
    value = encoded(0)
    other_format = BlockFormat(4, 2, 2, 8, torch.float16)  # same byte length as FORMAT
    values = {
        "flipped": value[:60] + bytes([value[60] ^ 0x10]) + value[61:],
        "truncated": value[:-1],
        "other_tokens": encode_block(FORMAT, block(0)[0], block(1)[1]),
        "other_format": encode_block(other_format, [t.half() for t in block(0)[0]], block(0)[1]),
        "garbage": os.urandom(len(value)),
        "empty": b"",
    }
    redis_server.admin().set(redis_key("test", "fp", block_hash(0)), values[damage])
    assert tier.get_chain([block_hash(0)], decoder()) == []
    assert tier.stats()["faults_invalid"] == 1 and tier.stats()["hits"] == 1


def test_oversized_values_are_neither_written_nor_returned(
    redis_server: RedisServer, make_tier: MakeTier, log: Log
) -> None:
    tier = make_tier(redis_server.url, max_value_bytes=1000)
    tier.put_many([(block_hash(0), b"x" * 1001), (block_hash(1), b"x" * 1000)])
    assert tier.flush(10)
    admin = redis_server.admin()
    assert admin.exists(redis_key("test", "fp", block_hash(0))) == 0
    admin.set(redis_key("test", "fp", block_hash(2)), b"y" * 5000)
    assert tier.get_many([block_hash(index) for index in range(3)]) == [None, b"x" * 1000, None]
    assert tier.stats()["faults_oversized"] == 2 and len(warnings(log)) == 1


def test_namespace_and_fingerprint_isolate_blocks(redis_server: RedisServer, make_tier: MakeTier) -> None:
    writer = make_tier(redis_server.url, namespace="deployment-a", fingerprint="model-1")
    put_chain(writer, 3)
    hashes = [block_hash(index) for index in range(3)]
    for namespace, fingerprint in [("deployment-b", "model-1"), ("deployment-a", "model-2")]:
        other = make_tier(redis_server.url, namespace=namespace, fingerprint=fingerprint)
        assert other.get_many(hashes) == [None] * 3 and other.get_chain(hashes) == []
    assert len(writer.get_chain(hashes)) == 3


def test_server_killed_mid_run_then_restarted(redis_server: RedisServer, make_tier: MakeTier, log: Log) -> None:
    tier = make_tier(redis_server.url)
    hashes = put_chain(tier, 4)
    assert len(tier.get_chain(hashes)) == 4
    redis_server.kill()
    before_open = timed_gets(tier, hashes, 3)  # connection reset / refused: fast even before the breaker
    assert tier.stats()["state"] == "open"
    tier.put_many([(block_hash(9), encoded(9))])  # dropped, not raised
    latencies = timed_gets(tier, hashes, 200)
    print(f"killed: first 3 gets max {max(before_open) * 1e3:.2f} ms; open p99 {p99(latencies) * 1e3:.3f} ms")
    assert p99(latencies) < 0.2
    stats = tier.stats()
    assert stats["faults_refused"] + stats["faults_reset"] >= 3 and stats["breaker_opens"] == 1
    assert stats["skipped_reads"] >= 200 * 4 and stats["dropped_open"] == 1
    assert len(warnings(log)) == 1 and "unavailable" in warnings(log)[0]

    redis_server.start()  # same port, empty (persistence off)
    wait_until(lambda: tier.stats()["state"] == "closed")
    assert tier.get_chain(hashes) == []
    hashes = put_chain(tier, 4)
    assert len(tier.get_chain(hashes)) == 4
    assert tier.stats()["reconnects"] == 1
    assert any("reachable again" in record.getMessage() for record in log.records)


def test_server_hung_costs_one_short_timeout_then_nothing(
    redis_server: RedisServer, make_tier: MakeTier, log: Log
) -> None:
    tier = make_tier(redis_server.url)
    hashes = put_chain(tier, 4)
    redis_server.signal(signal.SIGSTOP)
    before_open = timed_gets(tier, hashes, 3)
    assert tier.stats()["state"] == "open"
    latencies = timed_gets(tier, hashes, 200)
    print(f"hung: first 3 gets max {max(before_open) * 1e3:.1f} ms; open p99 {p99(latencies) * 1e3:.3f} ms")
    assert max(before_open) < 1.0 and p99(latencies) < 0.2  # socket_timeout_s=0.1, no retry on timeouts
    assert tier.stats()["faults_timeout"] >= 3 and len(warnings(log)) == 1

    redis_server.signal(signal.SIGCONT)
    wait_until(lambda: tier.stats()["state"] == "closed")
    assert len(tier.get_chain(hashes)) == 4  # the data survived the pause


def test_down_at_start_then_server_appears(start_redis: Callable[..., RedisServer], make_tier: MakeTier) -> None:
    server = start_redis(start=False)
    tier = make_tier(server.url)
    assert timed_gets(tier, [block_hash(0)], 5)
    stats = tier.stats()
    assert stats["state"] == "open" and stats["faults_refused"] == 3
    server.start()
    wait_until(lambda: tier.stats()["state"] == "closed")
    assert len(tier.get_chain(put_chain(tier, 2))) == 2


def test_threads_racing_a_kill_and_restart_see_no_exception_and_no_wrong_value(
    redis_server: RedisServer, make_tier: MakeTier
) -> None:
    tier = make_tier(redis_server.url, open_s=0.05)
    errors: list[BaseException] = []
    done = threading.Event()

    def worker(seed: int) -> None:
        try:
            while not done.is_set():
                hashes = [block_hash(index) for index in range(seed, seed + 6)]
                tier.put_many([(h, encoded(seed + offset)) for offset, h in enumerate(hashes)])
                for offset, value in enumerate(tier.get_many(hashes)):
                    assert value is None or value == encoded(seed + offset)
                assert len(tier.get_chain(hashes, decoder(seed))) <= 6
        except BaseException as error:  # reported below: the test fails on any exception
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (0, 3, 10, 20)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    redis_server.kill()
    time.sleep(0.3)
    hits_while_down = tier.stats()["hits"]
    redis_server.start()
    wait_until(lambda: tier.stats()["hits"] > hits_while_down)  # reconnected, and the writers refilled it
    time.sleep(0.2)
    done.set()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == [] and tier.stats()["faults"] > 0 and tier.stats()["faults_invalid"] == 0
    assert len(tier.get_chain(put_chain(tier, 6), decoder())) == 6


class ScriptedServer(threading.Thread):
    """A fake server on a loopback port that answers every connection with `reply`, then closes it (None: RST)."""

    def __init__(self, reply: bytes | None) -> None:
        super().__init__(daemon=True)
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

    def run(self) -> None:
        with contextlib.suppress(OSError):  # the listener is closed at the end of the test
            while True:
                connection, _ = self.listener.accept()
                with connection:
                    connection.recv(65536)
                    if self.reply is None:  # close with SO_LINGER 0: the peer sees a reset
                        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    else:
                        connection.sendall(self.reply)


@pytest.mark.parametrize(
    ("reply", "kind"),
    [(b"HTTP/1.1 400 Bad Request\r\n\r\n", "connection"), (None, "reset"), (b"$1000\r\nhalf", "reset")],
)
def test_wire_faults_are_counted_misses(make_tier: MakeTier, reply: bytes | None, kind: str) -> None:
    server = ScriptedServer(reply)  # garbage instead of RESP, a reset after the request, half a reply then FIN
    server.start()
    tier = make_tier(f"redis://127.0.0.1:{server.port}/0")
    try:
        assert max(timed_gets(tier, [block_hash(0)], 5)) < 1.0
        tier.put_many([(block_hash(0), b"v")])
    finally:
        server.listener.close()
    stats = tier.stats()
    assert stats[f"faults_{kind}"] == stats["faults"] == 3 and stats["state"] == "open"


def test_flushall_gives_misses(redis_server: RedisServer, make_tier: MakeTier) -> None:
    tier = make_tier(redis_server.url)
    hashes = put_chain(tier, 3)
    redis_server.admin().flushall()
    assert tier.get_many(hashes) == [None] * 3 and tier.get_chain(hashes) == []
    assert tier.stats()["faults"] == 0


def test_ttl_expires_blocks(redis_server: RedisServer, make_tier: MakeTier) -> None:
    tier = make_tier(redis_server.url, ttl_s=0.3)
    hashes = put_chain(tier, 2)
    assert 0 < redis_server.admin().pttl(redis_key("test", "fp", hashes[0])) <= 300
    wait_until(lambda: tier.get_many(hashes) == [None, None], timeout_s=5)


def test_allkeys_lru_eviction_leaves_holes_that_get_chain_respects(
    start_redis: Callable[..., RedisServer], make_tier: MakeTier
) -> None:
    server = start_redis("--maxmemory-policy", "allkeys-lru")
    admin = server.admin()
    admin.config_set("maxmemory", admin.info("memory")["used_memory"] + 2**20)  # ~1 MiB of room
    tier = make_tier(server.url, write_batch_bytes=64 * 1024)
    chains = [[block_hash(index, salt=str(chain)) for index in range(8)] for chain in range(24)]
    for chain in chains:  # 24 chains x 8 blocks x 16 KiB = 3 MiB: most are evicted
        tier.put_many([(h, bytes([index]) * 16384) for index, h in enumerate(chain)])
        assert tier.flush(10)
    holes = 0
    for chain in chains:
        present = [value is not None for value in tier.get_many(chain)]
        leading = present.index(False) if False in present else len(present)
        assert len(tier.get_chain(chain)) == leading
        holes += any(present[leading:])
    print(f"allkeys-lru: {admin.info('stats')['evicted_keys']} keys evicted, {holes} chains with holes")
    assert admin.info("stats")["evicted_keys"] > 0 and holes > 0
    assert tier.stats()["faults"] == 0


def test_noeviction_write_errors_are_counted_reads_still_work(
    start_redis: Callable[..., RedisServer], make_tier: MakeTier, log: Log
) -> None:
    server = start_redis("--maxmemory-policy", "noeviction")
    tier = make_tier(server.url, write_batch_bytes=64 * 1024)
    hashes = put_chain(tier, 3)
    admin = server.admin()
    admin.config_set("maxmemory", admin.info("memory")["used_memory"] + 256 * 1024)
    for start in range(0, 64, 8):
        tier.put_many([(block_hash(index, "fill"), b"z" * 16384) for index in range(start, start + 8)])
        assert tier.flush(10)
    stats = tier.stats()
    assert stats["faults_oom"] > 0 and stats["write_failures"] == stats["faults_oom"]
    assert stats["state"] == "closed" and len(tier.get_chain(hashes)) == 3
    assert len(warnings(log)) == 1 and "refused" in warnings(log)[0]
    admin.config_set("maxmemory", 0)
    tier.put_many([(block_hash(0, "later"), b"ok")])
    assert tier.flush(10) and tier.get_many([block_hash(0, "later")]) == [b"ok"]
    assert any("accepts writes again" in record.getMessage() for record in log.records)


def test_full_queue_drops_writes_without_blocking(redis_server: RedisServer, make_tier: MakeTier) -> None:
    sizes = {"queue_bytes": 64 * 1024, "max_value_bytes": 16 * 1024, "write_batch_bytes": 16 * 1024}
    tier = make_tier(redis_server.url, write_timeout_s=0.3, **sizes)
    redis_server.signal(signal.SIGSTOP)  # the writer's first pipeline hangs for write_timeout_s
    start = time.perf_counter()
    for index in range(20):
        tier.put_many([(block_hash(index), b"w" * 16384)])
    elapsed = time.perf_counter() - start
    print(f"20 puts into a full queue: {elapsed * 1e3:.2f} ms")
    assert elapsed < 0.5 and tier.stats()["dropped_queue_full"] >= 10
    start = time.perf_counter()
    tier.close()
    assert time.perf_counter() - start < 2  # 2 x write_timeout_s at most, although the server hangs
    assert tier.get_many([block_hash(0)]) == [None]


def test_password_is_used_and_never_shown(
    start_redis: Callable[..., RedisServer], make_tier: MakeTier, log: Log
) -> None:
    secret = "s3cret-Pa55"
    server = start_redis("--requirepass", secret)
    url = f"redis://default:{secret}@127.0.0.1:{server.port}/0"
    tier = make_tier(url)
    assert len(tier.get_chain(put_chain(tier, 2))) == 2
    wrong = make_tier(f"redis://:{secret}x@127.0.0.1:{server.port}/0")
    assert timed_gets(wrong, [block_hash(0)], 4) and wrong.stats()["faults_connection"] == 3
    shown = [repr(tier), repr(tier.config), str(tier.stats()), repr(wrong), str(wrong.stats())]
    shown += [record.getMessage() for record in log.records]
    assert len(warnings(log)) == 1 and all(secret not in text for text in shown)
    assert mask_url(url) == f"redis://default:***@127.0.0.1:{server.port}/0"
    assert mask_url("rediss://h:1/0?password=abc&db=1") == "rediss://h:1/0?password=***&db=1"


def test_rediss_url_uses_a_tls_connection(make_tier: MakeTier) -> None:
    tier = make_tier("rediss://user:pw@127.0.0.1:6390/0")  # nothing is connected before the first operation
    assert tier.client.connection_pool.connection_class is redis.SSLConnection
    assert make_tier("redis://127.0.0.1:6390/0").client.connection_pool.connection_class is redis.Connection


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("url", "http://127.0.0.1:6379"), ("namespace", "a:b"), ("namespace", ""), ("fingerprint", "x y"),
        ("ttl_s", 0), ("ttl_s", -1.0), ("max_value_bytes", 0), ("max_value_bytes", 2**30),
        ("socket_timeout_s", 0), ("socket_timeout_s", float("nan")), ("write_timeout_s", True),
        ("failure_threshold", 0), ("failure_threshold", 2.5), ("open_s", float("inf")), ("max_backoff_s", 0.5),
        ("queue_bytes", 1024), ("write_batch_bytes", 0), ("read_batch_bytes", -1),
    ],
)  # fmt: skip
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    options: dict = {"url": "redis://127.0.0.1:6379/0", "namespace": "ns", "fingerprint": "fp", field: value}
    with pytest.raises(CacheValidationError, match=field):
        RedisTierConfig(**options)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_breaker_opens_at_the_threshold_and_backs_off_its_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(tiers_base, "time", clock)
    breaker = CircuitBreaker(threshold=3, open_s=1.0, max_backoff_s=3.0)
    assert not breaker.record_failure() and not breaker.record_failure() and breaker.seconds_to_probe() is None
    breaker.record_success()  # consecutive failures only
    assert [breaker.record_failure() for _ in range(4)] == [False, False, True, False] and breaker.is_open
    assert breaker.seconds_to_probe() == 1.0
    waits = []
    for _ in range(3):
        breaker.record_probe_failure()
        waits.append(breaker.seconds_to_probe())
    assert waits == [2.0, 3.0, 3.0]  # doubled, capped at max_backoff_s
    clock.now += 3.0
    assert breaker.seconds_to_probe() == 0.0 and breaker.record_success() and not breaker.is_open
    assert not breaker.record_success() and breaker.seconds_to_probe() is None


def test_bad_block_hashes_are_rejected() -> None:
    with pytest.raises(CacheValidationError, match="1-64 bytes"):
        redis_key("ns", "fp", "abc")  # type: ignore[arg-type]
    with pytest.raises(CacheValidationError, match="1-64 bytes"):
        redis_key("ns", "fp", b"")


PROCESS_SCRIPT = """
import hashlib, sys, time, torch
from kv_cache.block_format import BlockFormat
from kv_cache.tiers.codec import decode_block, encode_block, format_fingerprint
from kv_cache.tiers.redis import RedisTier, RedisTierConfig, redis_key
role, port = sys.argv[1], sys.argv[2]
fmt = BlockFormat(4, 2, 2, 8, torch.bfloat16)
fingerprint = format_fingerprint(fmt).hex()
tokens = [11, 22, 33, 44]
block_hash = hashlib.sha256(b"root" + b"".join(t.to_bytes(8, "little") for t in tokens)).digest()
tensors = [torch.arange(64, dtype=torch.float32).reshape(4, 2, 8).to(torch.bfloat16) + i for i in range(4)]
print(redis_key("shared", fingerprint, block_hash).decode(), hash("not stable"))
tier = RedisTier(RedisTierConfig(url=f"redis://127.0.0.1:{port}/0", namespace="shared", fingerprint=fingerprint))
if role == "writer":
    tier.put_many([(block_hash, encode_block(fmt, tensors, tokens))])
    print("flushed", tier.flush(10))
else:
    deadline = time.monotonic() + 20
    while not (chain := tier.get_chain([block_hash], lambda i, data: decode_block(data, fmt, tokens))):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    print("equal", all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(chain[0], tensors)))
tier.close()
"""


@pytest.mark.timeout(90)  # two interpreters importing torch: seconds each on a loaded 2-core machine
def test_two_processes_with_different_hash_seeds_share_blocks(redis_server: RedisServer) -> None:
    processes = []
    for role, seed in [("reader", "1"), ("writer", "2")]:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        command = [sys.executable, "-c", PROCESS_SCRIPT, role, str(redis_server.port)]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=80)
        assert process.returncode == 0, stderr.decode()
        outputs.append(stdout.decode().split("\n"))
    (reader_key, reader_hash), (writer_key, writer_hash) = (lines[0].split() for lines in outputs)
    assert reader_key == writer_key and reader_key.startswith("kvc:shared:")
    assert reader_hash != writer_hash  # the seeds did differ, and the key did not depend on them
    assert outputs[0][1] == "equal True" and outputs[1][1] == "flushed True"
