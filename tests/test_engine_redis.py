"""`KVCacheEngine` with the Redis tier: blocks shared across engines and processes, faults, and the cost rule.

Every engine here runs the shipped reference model on the CPU against a real `redis-server` (conftest.py's
fixtures: a free loopback port, persistence off). The oracle is always the same: the tokens of an engine without
Redis. A writer engine (another process, or an earlier engine here) leaves prompt blocks in Redis; a fresh reader
engine must then hit them (hit rate > 0) with identical tokens, and keep identical tokens when Redis is down at
start, killed or hung mid-run, or holds garbage, a corrupted value or another model's blocks (never loaded; every
fault counted in `get_stats()["redis"]`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedModel

from kv_cache import KVCacheConfig
from kv_cache.engine import EngineConfig, InvariantCheck, KVCacheEngine, SamplingParams
from kv_cache.prefix_cache import chain_hashes
from kv_cache.reference_model import encode, heldout_text
from kv_cache.tiers.redis import redis_key

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_intra_op_thread")]
SAMPLING = SamplingParams(max_new_tokens=6)
NAMESPACE = "engine-test"
BLOCK = 8
PREFIX = 64  # tokens of the shared prefix: 8 blocks


QUANTIZED = {"use_quantization": True, "quantization_bits": 4, "residual_tokens": 16, "quantization_group_size": 32}


@pytest.fixture
def engines() -> Iterator[Callable[..., KVCacheEngine]]:
    """Factory: `engines(model, url=None, quantized=False)` (INT4 blocks if `quantized`); all closed at teardown."""
    made: list[KVCacheEngine] = []

    def make(model: PreTrainedModel, url: str | None = None, quantized: bool = False) -> KVCacheEngine:
        cache: dict[str, object] = {"num_blocks": 128, "block_size": BLOCK, "max_tokens": 256, "device": "cpu"}
        engine = EngineConfig(invariant_check=InvariantCheck.EVERY_STEP, prefill_chunk_size=32, max_num_seqs=4,
                              redis_url=url, redis_namespace=NAMESPACE)  # fmt: skip
        config = KVCacheConfig(**cache, **(QUANTIZED if quantized else {}))  # type: ignore[arg-type]
        made.append(KVCacheEngine(model, config, engine))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


def prompts(prefix_at: int, count: int, seed: int) -> list[list[int]]:
    """`count` prompts: one `PREFIX`-byte stretch of held-out code (from `prefix_at`), then 1-40 other bytes."""
    text = heldout_text()
    prefix = text[prefix_at : prefix_at + PREFIX]
    return [encode(prefix + text[5000 + 97 * (seed * count + i) :][: 1 + (7 * i + seed) % 40]).tolist()
            for i in range(count)]  # fmt: skip


def expected(model: PreTrainedModel, batch: list[list[int]]) -> list[list[int]]:
    """The oracle: the tokens of an engine without Redis."""
    engine = KVCacheEngine(model, KVCacheConfig(num_blocks=128, block_size=BLOCK, max_tokens=256, device="cpu"))
    return engine.generate(batch, SAMPLING)


def write(engine: KVCacheEngine, batch: list[list[int]]) -> None:
    """Run `batch` on a writer engine and wait until its blocks are in Redis."""
    engine.generate(batch, SAMPLING)
    assert engine.remote is not None and engine.remote.flush(10)
    assert engine.get_stats()["redis"]["written"] > 0


WRITER_SCRIPT = """
import json, sys
import torch
from kv_cache import KVCacheConfig
from kv_cache.engine import EngineConfig, KVCacheEngine, SamplingParams
from kv_cache.reference_model import load_reference_model
torch.set_num_threads(1)
url, batch = sys.argv[1], json.load(sys.stdin)
config = KVCacheConfig(num_blocks=128, block_size=8, max_tokens=256, device="cpu")
settings = EngineConfig(prefill_chunk_size=32, max_num_seqs=4, redis_url=url, redis_namespace="engine-test")
with KVCacheEngine(load_reference_model(), config, settings) as engine:
    outputs = engine.generate(batch, SamplingParams(max_new_tokens=6))
    flushed = engine.remote.flush(10)
    print(json.dumps({"outputs": outputs, "flushed": flushed, "written": engine.get_stats()["redis"]["written"]}))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)  # a second interpreter importing torch: seconds on a loaded 2-core machine
def test_a_second_process_reuses_the_first_process_blocks(
    model: PreTrainedModel, redis_server: RedisServer, engines: Callable[..., KVCacheEngine]
) -> None:
    first, second = prompts(0, 4, seed=0), prompts(0, 4, seed=1)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # keys must not depend on it
    command = [sys.executable, "-c", WRITER_SCRIPT, redis_server.url]
    done = subprocess.run(command, input=json.dumps(first), env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    writer = json.loads(done.stdout)
    assert writer["flushed"] and writer["written"] > 0 and writer["outputs"] == expected(model, first)

    reader = engines(model, redis_server.url)
    assert reader.generate(second, SAMPLING) == expected(model, second)
    stats = reader.get_stats()
    fetched = stats["redis"]["fetched_blocks"]
    assert stats["prefix_hit_rate"] > 0 and fetched >= PREFIX // BLOCK  # the prefix (and any equal suffix block)
    assert stats["redis"]["faults"] == 0 and stats["prefix_cache"]["imported_blocks"] == fetched


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int4"])
def test_a_fresh_engine_hits_blocks_another_engine_wrote(
    model: PreTrainedModel, redis_server: RedisServer, engines: Callable[..., KVCacheEngine], quantized: bool
) -> None:
    first, second = prompts(300, 4, seed=2), prompts(300, 4, seed=3)
    write(engines(model, redis_server.url, quantized), first)
    oracle = engines(model, None, quantized).generate(second, SAMPLING)
    reader = engines(model, redis_server.url, quantized)
    assert reader.generate(second, SAMPLING) == oracle
    redis = reader.get_stats()["redis"]
    assert redis["fetched_blocks"] >= PREFIX // BLOCK - (2 if quantized else 0) and redis["faults"] == 0
    if quantized:  # only sealed blocks are shared: the prefix's blocks older than the residual window
        assert reader.prefix_cache is not None and reader.prefix_cache.pool is reader.store.quantized_pool


def kill(server: RedisServer) -> None:
    server.kill()


def hang(server: RedisServer) -> None:
    server.signal(signal.SIGSTOP)  # the fixture sends SIGCONT before killing it at teardown


def garbage(server: RedisServer) -> None:
    admin = server.admin()
    for key in admin.keys(f"kvc:{NAMESPACE}:*"):
        admin.set(key, b"KVCB" + os.urandom(64))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "kinds"),
    [(None, ("refused",)), (kill, ("refused", "reset")), (hang, ("timeout",)), (garbage, ("invalid",))],
    ids=["down_at_start", "killed_mid_run", "hung_mid_run", "garbage"],
)
def test_faults_keep_tokens_identical_and_are_counted(
    model: PreTrainedModel,
    start_redis: Callable[..., RedisServer],
    engines: Callable[..., KVCacheEngine],
    fault: Callable[[RedisServer], None] | None,
    kinds: tuple[str, ...],
) -> None:
    server = start_redis(start=fault is not None)  # down at start: never started
    early, late = prompts(600, 3, seed=4), prompts(900, 3, seed=5)
    if fault is not None:  # the same prefixes, other suffixes: only the prefixes' blocks can hit
        write(engines(model, server.url), prompts(600, 2, seed=14) + prompts(900, 2, seed=15))
    reader = engines(model, server.url)
    ids = [reader.add_request(prompt, SAMPLING) for prompt in early]
    for _ in range(3):
        reader.step()  # the early prompts' prefix came from Redis (unless it was down)
    if fault is not None:
        fault(server)
    ids += [reader.add_request(prompt, SAMPLING) for prompt in late]  # their prefix is in Redis, unreachable
    while reader.scheduler.has_work:
        reader.step()
    assert [reader.get_request(i).output_ids for i in ids] == expected(model, early + late)
    redis = reader.get_stats()["redis"]
    counted = sum(redis[f"faults_{kind}"] for kind in kinds)
    assert counted > 0 and redis["faults"] >= counted
    if fault is None:
        assert redis["fetched_blocks"] == 0
    else:  # the early prompts' prefix (code repeats: perhaps a suffix block too), before the fault
        assert redis["fetched_blocks"] >= PREFIX // BLOCK
    reader.check_invariants()


def test_a_corrupted_value_is_a_miss_and_never_loaded(
    model: PreTrainedModel, redis_server: RedisServer, engines: Callable[..., KVCacheEngine]
) -> None:
    first, second = prompts(1200, 2, seed=6), prompts(1200, 2, seed=7)
    writer = engines(model, redis_server.url)
    write(writer, first)
    assert writer.prefix_cache is not None
    keys: list[bytes] = []
    chain_hashes(writer.prefix_cache.root, second[0], BLOCK, keys)
    name = redis_key(NAMESPACE, writer.prefix_cache.root.hex(), keys[3])
    admin = redis_server.admin()
    value = bytearray(admin.get(name))
    value[-1] ^= 0x01  # one flipped bit in the payload: the CRC-32 must catch it
    admin.set(name, bytes(value))
    reader = engines(model, redis_server.url)
    ids = [reader.add_request(prompt, SAMPLING) for prompt in second]
    assert [list(reader.stream(i)) for i in ids] == expected(model, second)
    assert reader.get_stats()["redis"]["faults_invalid"] >= 1  # (the second prompt may ask for block 3 again)
    assert reader.request_stats(ids[0])["prefix_hit_tokens"] == 3 * BLOCK  # blocks 0-2, never block 3 or later


def test_another_model_never_hits_the_blocks(
    model: PreTrainedModel, redis_server: RedisServer, engines: Callable[..., KVCacheEngine]
) -> None:
    batch = prompts(1500, 3, seed=8)
    write(engines(model, redis_server.url), batch)
    config = copy.deepcopy(model.config)
    config.rms_norm_eps = config.rms_norm_eps * 2  # same shapes and block format, another model
    torch.manual_seed(0)
    other = LlamaForCausalLM(config).eval()
    oracle = engines(other).generate(batch, SAMPLING)
    reader = engines(other, redis_server.url)
    assert reader.generate(batch, SAMPLING) == oracle
    redis = reader.get_stats()["redis"]
    assert redis["fetches"] > 0 and redis["hits"] == 0 and redis["fetched_blocks"] == 0
    assert reader.get_stats()["prompt_hit_tokens"] > 0  # its own blocks hit locally, as usual


def test_redis_is_skipped_when_recomputing_is_faster(
    model: PreTrainedModel, redis_server: RedisServer, engines: Callable[..., KVCacheEngine]
) -> None:
    batch = prompts(1800, 2, seed=9)
    write(engines(model, redis_server.url), batch)
    fast = engines(model, redis_server.url)
    assert fast.remote is not None
    fast.remote.cost.token_s = 1e-12  # recomputing is (said to be) nearly free: a fetch cannot win
    fast.remote.cost.record_prefill = lambda tokens, seconds: None  # type: ignore[method-assign]
    assert fast.generate(batch, SAMPLING) == expected(model, batch)
    redis = fast.get_stats()["redis"]
    assert redis["skipped_slower"] > 0 and redis["fetches"] == 0 and redis["lookups"] == 0
    unmeasured = engines(model, redis_server.url)
    assert unmeasured.remote is not None
    unmeasured.remote.cost.token_s = None  # no measurement (e.g. a pool too small to calibrate): never fetch
    unmeasured.generate(batch[:1], SAMPLING)
    assert unmeasured.get_stats()["redis"]["skipped_unmeasured"] > 0


def test_the_password_never_shows(
    model: PreTrainedModel,
    start_redis: Callable[..., RedisServer],
    engines: Callable[..., KVCacheEngine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kv_cache")
    server = start_redis("--requirepass", "s3cret-pw")
    url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"
    engine = engines(model, url)
    batch = prompts(2100, 2, seed=10)
    engine.generate(batch, SAMPLING)
    assert engine.remote is not None and engine.remote.flush(10)
    server.kill()
    engine.generate(prompts(2400, 2, seed=11) + prompts(2700, 2, seed=12), SAMPLING)  # faults: logged, masked
    engine.remote.flush(5)  # the failed writes too
    shown = [repr(engine.engine_config), str(engine.get_stats()), str(engine.remote.tier), caplog.text]
    assert caplog.records and all("s3cret-pw" not in text for text in shown)
    assert engine.get_stats()["redis"]["url"] == f"redis://:***@127.0.0.1:{server.port}/0"
    assert engine.get_stats()["redis"]["written"] > 0  # the password was used
