"""Injected faults recover as documented.

- Out of memory in the engine (`torch.OutOfMemoryError` from block allocation or from the model's forward): the
  step is rolled back and retried, each retry counted; a transient fault leaves the outputs identical, a
  persistent one ends in `CacheMemoryError` naming what to lower, with the pool whole and the engine usable.
- Out of memory in the store: allocating the pools raises `CacheMemoryError` naming the setting, and the cache is
  as it was; the same for an allocation failing anywhere inside an operation (every allocation in turn).
- A Redis tier whose server is dead, killed or hung answers misses (never an exception, never wrong data), and an
  engine in front of a dead server gives the tokens it gives without Redis.
"""

from __future__ import annotations

import importlib
import itertools
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import torch
from transformers import PreTrainedModel

from kv_cache import BaseKVCache, CacheMemoryError, KVCacheConfig, KVStore
from kv_cache.block_format import BlockFormat
from kv_cache.config import CacheStrategy
from kv_cache.engine import EngineConfig, InvariantCheck, KVCacheEngine, SamplingParams
from kv_cache.reference_model import encode, heldout_text

from .test_bad_inputs import BLOCK, StoreUnderTest, kv

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # conftest.py: tiny models, one thread

if TYPE_CHECKING:
    from conftest import RedisServer

SAMPLING = SamplingParams(max_new_tokens=5)


def prompts(count: int, length: int = 50) -> list[list[int]]:
    text = heldout_text()
    return [encode(text[i * 1009 : i * 1009 + length]).tolist() for i in range(count)]


def make_engine(model: PreTrainedModel, **options: Any) -> KVCacheEngine:
    config = KVCacheConfig(num_blocks=96, block_size=16, max_tokens=128, device="cpu")
    return KVCacheEngine(model, config, EngineConfig(invariant_check=InvariantCheck.EVERY_STEP, **options))


class Fault:
    """Raises `torch.OutOfMemoryError` on the calls numbered in `at` (counting from 1), or on every call."""

    def __init__(self, at: tuple[int, ...] | None) -> None:
        self.at, self.calls, self.raised = at, 0, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.at is None or self.calls in self.at:
            self.raised += 1
            raise torch.OutOfMemoryError("injected: CUDA out of memory")


def inject(engine: KVCacheEngine, site: str, fault: Fault, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make `site` ("allocate": the pool's block allocation, "forward": the model's forward) call `fault` first;
    returns what removes it."""
    if site == "forward":
        return engine.model.register_forward_pre_hook(lambda *_: fault()).remove
    pool = engine.store.pool
    assert pool is not None
    allocate = pool.allocate

    def failing(count: int) -> list[int]:
        fault()
        return allocate(count)

    monkeypatch.setattr(pool, "allocate", failing)
    return monkeypatch.undo


@pytest.mark.timeout(120)
@pytest.mark.parametrize("site", ["allocate", "forward"])
@pytest.mark.parametrize("when", ["first", "twice", "last"])
def test_a_transient_oom_is_retried_counted_and_invisible(
    model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch, site: str, when: str
) -> None:
    """The fault hits the first call at `site`, the second and third, or the last one of the whole run."""
    batch, counter = prompts(3), Fault(())
    baseline = make_engine(model)
    uncount = inject(baseline, site, counter, monkeypatch)  # never raises: counts the calls of a clean run
    expected = baseline.generate(batch, SAMPLING)
    uncount()
    at = {"first": (1,), "twice": (2, 3), "last": (counter.calls,)}[when]
    engine = make_engine(model)
    fault = Fault(at)
    remove = inject(engine, site, fault, monkeypatch)
    try:
        assert engine.generate(batch, SAMPLING) == expected
    finally:
        remove()
    stats = engine.get_stats()
    assert fault.raised == len(at) == stats["oom_errors"]
    assert stats["oom_failures"] == 0 and 1 <= stats["oom_recoveries"] <= len(at)
    engine.check_invariants()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("site", ["allocate", "forward"])
def test_a_persistent_oom_is_a_clear_memory_error_and_the_engine_recovers(
    model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch, site: str
) -> None:
    engine = make_engine(model, oom_retries=2)
    engine.add_request(prompts(1)[0], SAMPLING)
    remove = inject(engine, site, Fault(None), monkeypatch)
    try:
        with pytest.raises(CacheMemoryError, match=r"2 retries.*lower prefill_chunk_size or max_num_seqs"):
            engine.step()
    finally:
        remove()
    stats = engine.get_stats()
    assert (stats["oom_errors"], stats["oom_failures"], stats["oom_recoveries"]) == (3, 1, 0)
    engine.check_invariants()
    later = prompts(2)[1]
    assert engine.generate([later], SAMPLING) == make_engine(model).generate([later], SAMPLING)


@pytest.mark.parametrize(
    ("options", "failing_call", "setting"),
    [
        ({"num_blocks": 64}, 1, "lower num_blocks"),
        ({"memory_budget_mb": 1}, 1, "lower memory_budget_mb"),
        ({"use_quantization": True, "residual_tokens": 8, "quantization_group_size": 4}, 1, "residual_tokens"),
        ({"use_quantization": True, "residual_tokens": 8, "quantization_group_size": 4}, 2, "num_blocks"),
    ],
    ids=["num_blocks", "memory_budget_mb", "quantized tail pool", "quantized sealed pool"],
)
def test_an_oom_allocating_the_pools_is_a_memory_error_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, options: dict, failing_call: int, setting: str
) -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=BLOCK, device="cpu", **options))
    allocate, fault = BlockFormat.allocate, Fault((failing_call,))

    def failing(self: BlockFormat, *args: Any) -> Any:
        fault()
        return allocate(self, *args)

    monkeypatch.setattr(BlockFormat, "allocate", failing)
    with pytest.raises(CacheMemoryError, match=setting):
        cache.forward(kv(2, 3), kv(2, 3))
    monkeypatch.undo()
    assert fault.raised == 1 and cache.store.pool is None and cache.store.quantized_pool is None
    keys, _, _ = cache.forward(kv(2, 30), kv(2, 30))  # the same batch: works, and seals if quantized
    sealed = cache.store.num_sealed(cache.seq_ids[0], 0)
    assert keys.shape[2] == 30 and (not cache.config.use_quantization or sealed > 0)


ALLOCATING = ("tensor", "empty", "zeros", "full", "arange", "stack", "cat", "where", "full_like", "empty_like")
STORE_MODULES = (
    "kv_store",
    "block_io",
    "store_reads",
    "sealing",
    "attention_mass",
    "quantizer",
    "block_views",
    "block_pool",
)


class FailingTorch:
    """Stands in for `torch` in the store's modules: the `fail_at`-th call of an allocating function (counted over
    all of them) raises `torch.OutOfMemoryError`; everything else is torch's."""

    def __init__(self, fail_at: int) -> None:
        self.fault = Fault((fail_at,))

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(torch, name)
        if name not in ALLOCATING:
            return attribute

        def allocating(*args: Any, **kwargs: Any) -> Any:
            self.fault()
            return attribute(*args, **kwargs)

        return allocating


def snapshot(store: KVStore) -> list[Any]:
    """Everything a caller can observe: tokens, seals and attention mass per sequence and layer, reads, blocks in
    use and their reference counts."""
    pools = [pool for pool in (store.pool, store.quantized_pool) if pool is not None]
    state: list[Any] = [sorted(store.sequence_ids), [[p.ref_count(b) for b in range(p.num_blocks)] for p in pools]]
    tracks_mass = store.config.evicts_tokens and store.config.cache_strategy is not CacheStrategy.LRU
    for seq in sorted(store.sequence_ids):
        for layer in range(store.num_layers):
            state += [store.num_tokens(seq, layer), store.num_seen(seq, layer), store.num_sealed(seq, layer)]
            if store.num_tokens(seq, layer):
                state += [tensor.clone() for tensor in store.read([seq], layer)]
            if tracks_mass:
                state.append(store.attention_mass(seq, layer).clone())
    return state


def assert_same(before: list[Any], after: list[Any]) -> None:
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new) if isinstance(old, torch.Tensor) else old == new


def make_fork(subject: StoreUnderTest) -> None:
    subject.forked = subject.store.fork(subject.seq)  # type: ignore[attr-defined]


def grow(subject: StoreUnderTest, tokens: int = 8) -> None:
    for layer in range(2):
        subject.store.append([subject.seq], layer, kv(1, tokens), kv(1, tokens))


def nothing(subject: StoreUnderTest) -> None:
    pass


def mass_rows() -> torch.Tensor:
    """Attention mass for `seq` and `other` (6 tokens, of which `other` holds 3): `[2, kv_heads, 6]` fp16."""
    return torch.full((2, 2, 6), 0.25, dtype=torch.float16)


@dataclass(frozen=True)
class Operation:
    """A store operation swept by the fault tests: `act` on a `StoreUnderTest` made with `options` and `prepare`d.

    store: "quantized" (INT4, 4-token window), "dense", or "mass" (dense, tracking attention mass for LFU eviction).
    copying: None to fail the allocating torch functions of the store's modules (`FailingTorch`), or the name of
    the tensor method (`clone`, `float`) that makes the operation's only copies.
    """

    store: str
    prepare: Callable[[StoreUnderTest], None]
    act: Callable[[StoreUnderTest], object]
    copying: str | None = None

    def subject(self) -> StoreUnderTest:
        """A fresh prepared store, the same every time (seeded)."""
        torch.manual_seed(0)
        mass = {"token_budget": 32, "cache_strategy": "lfu"} if self.store == "mass" else {}
        subject = StoreUnderTest(quantized=self.store == "quantized", **mass)
        self.prepare(subject)
        return subject

    def run(self, subject: StoreUnderTest) -> object:
        """`act` on new tokens that are the same every time (seeded)."""
        torch.manual_seed(1)
        return self.act(subject)


OPERATIONS: dict[str, Operation] = {
    "append that seals": Operation("quantized", nothing, lambda s: s.store.append([s.seq], 0, kv(1, 4), kv(1, 4))),
    "append with copy-on-write": Operation(
        "dense", make_fork, lambda s: s.store.append([s.forked, s.other], 0, kv(2, 1), kv(2, 1))
    ),
    "append growing the attention mass": Operation(
        "mass", nothing, lambda s: s.store.append([s.seq, s.other], 1, kv(2, 1), kv(2, 1))
    ),
    "read into the workspace": Operation("dense", make_fork, lambda s: s.store.read([s.seq, s.forked], 0)),
    "read of sealed blocks": Operation("quantized", grow, lambda s: s.store.read([s.seq], 1)),
    "truncate into a sealed block": Operation("quantized", grow, lambda s: s.store.truncate(s.seq, 6)),
    "keep_tokens with copy-on-write": Operation(
        "dense", make_fork, lambda s: s.store.keep_tokens([s.forked], 0, torch.tensor([[[1, 3]] * 2]))
    ),
    "keep_tokens with attention mass": Operation(
        "mass", make_fork, lambda s: s.store.keep_tokens([s.forked, s.other], 0, torch.tensor([[[0, 2]] * 2] * 2))
    ),
    "adopt_blocks with attention mass": Operation(
        "mass", nothing, lambda s: s.store.adopt_blocks(s.spare, [], s.store.block_ids(s.seq), 6)
    ),
    "fork with attention mass": Operation("mass", nothing, make_fork, copying="clone"),
    "replace_rows with attention mass": Operation(
        "mass", nothing, lambda s: s.store.replace_rows([s.seq, s.other], [1, 0, 0]), copying="clone"
    ),
    "add_attention_mass": Operation(
        "mass", nothing, lambda s: s.store.add_attention_mass([s.seq, s.other], 0, mass_rows()), copying="float"
    ),
}


@dataclass
class Outcome:
    """One injected allocation failure: its number, what the caller saw, and what was wrong afterwards."""

    fail_at: int
    error: Exception | None
    damage: str | None  # None: the store was exactly as before, its invariant held, and the operation then worked


def sweep(name: str, monkeypatch: pytest.MonkeyPatch) -> list[Outcome]:
    """Fail the 1st, 2nd, ... allocation inside operation `name` (a fresh store each time) until it completes."""
    operation = OPERATIONS[name]
    outcomes: list[Outcome] = []
    for fail_at in itertools.count(1):
        subject = operation.subject()
        before = snapshot(subject.store)
        fault = fail_allocation(fail_at, operation.copying, monkeypatch)
        error: Exception | None = None
        try:
            operation.run(subject)
        except Exception as caught:  # what the caller sees, judged by the tests
            error = caught
        finally:
            monkeypatch.undo()
        if not fault.raised:
            return outcomes
        outcomes.append(Outcome(fail_at, error, damage(subject, before, operation) if error else None))
    raise AssertionError("unreachable")


def fail_allocation(fail_at: int, copying: str | None, monkeypatch: pytest.MonkeyPatch) -> Fault:
    """Make the `fail_at`-th allocation raise: of the store modules' torch functions, or of tensor method `copying`."""
    if copying is None:
        proxy = FailingTorch(fail_at)
        for module in STORE_MODULES:
            monkeypatch.setattr(importlib.import_module(f"kv_cache.{module}"), "torch", proxy)
        return proxy.fault
    fault, method = Fault((fail_at,)), getattr(torch.Tensor, copying)

    def failing(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        fault()
        return method(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, copying, failing)
    return fault


def damage(subject: StoreUnderTest, before: list[Any], operation: Operation) -> str | None:
    """What a failed operation broke: state changed, invariant violated, the same operation failing again, or
    then ending elsewhere than on a store that never failed (other block ids: the free stack's order changed)."""
    try:
        assert_same(before, snapshot(subject.store))
    except (AssertionError, Exception) as error:
        return f"state changed: {error!r}"[:300]
    try:
        subject.store.check_invariants()
        operation.run(subject)
        subject.store.check_invariants()
    except Exception as error:
        return f"unusable afterwards: {error!r}"[:300]
    unharmed = operation.subject()
    operation.run(unharmed)
    try:
        assert_same(snapshot(unharmed.store), snapshot(subject.store))
    except (AssertionError, Exception) as error:
        return f"differs from a store that never failed: {error!r}"[:300]
    return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_an_oom_anywhere_inside_a_store_operation_changes_nothing(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = sweep(name, monkeypatch)
    assert outcomes, "no allocation was injected into"
    assert [(o.fail_at, o.damage) for o in outcomes if o.damage] == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_an_oom_anywhere_inside_a_store_operation_is_a_memory_error_naming_the_setting(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = [(o.fail_at, repr(o.error)[:80]) for o in sweep(name, monkeypatch) if not is_memory_error(o.error)]
    assert wrong == []


def is_memory_error(error: Exception | None) -> bool:
    settings = ("num_blocks", "memory_budget_mb", "max_tokens")
    return isinstance(error, CacheMemoryError) and any(setting in str(error) for setting in settings)


def kill(server: RedisServer) -> None:
    server.kill()


def hang(server: RedisServer) -> None:
    server.signal(signal.SIGSTOP)  # the fixture resumes it before killing it at teardown


def flush(server: RedisServer) -> None:
    server.admin().flushall()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", [None, kill, hang, flush], ids=["down at start", "killed", "hung", "flushed"])
def test_a_redis_tier_in_trouble_answers_misses_never_wrong_data(
    start_redis: Callable[..., RedisServer], fault: Callable[[RedisServer], None] | None
) -> None:
    from test_redis_tier import block_hash, decoder, encoded, put_chain

    from kv_cache.tiers.redis import RedisTier, RedisTierConfig

    server = start_redis(start=fault is not None)
    with RedisTier(RedisTierConfig(url=server.url, namespace="faults", fingerprint="fp", open_s=0.2)) as tier:
        hashes = put_chain(tier, 4) if fault is not None else [block_hash(i) for i in range(4)]
        if fault is not None:
            fault(server)
        for _ in range(5):  # the first ones pay one short timeout each, then the breaker answers at once
            start = time.perf_counter()
            values, chain = tier.get_many(hashes), tier.get_chain(hashes, decoder())
            assert time.perf_counter() - start < 1.0
            assert all(value in (None, encoded(i)) for i, value in enumerate(values))
            for i, tensors in enumerate(chain):  # a leading run of the right blocks, or nothing
                assert all(map(torch.equal, tensors, decoder()(i, encoded(i)) or []))
        tier.put_many([(block_hash(9), encoded(9))])  # dropped or queued, never raised
        stats = tier.stats()
    assert stats["faults"] > 0 if fault is not flush else stats["misses"] > 0


@pytest.mark.timeout(120)
def test_an_engine_in_front_of_a_dead_redis_gives_the_tokens_it_gives_without(
    model: PreTrainedModel, start_redis: Callable[..., RedisServer]
) -> None:
    server = start_redis(start=False)
    batch = prompts(3)
    expected = make_engine(model).generate(batch, SAMPLING)
    with make_engine(model, redis_url=server.url, redis_namespace="faults") as engine:
        start = time.perf_counter()
        assert engine.generate(batch, SAMPLING) == expected
        elapsed = time.perf_counter() - start
        redis = engine.get_stats()["redis"]
        engine.check_invariants()
    assert redis["faults_refused"] > 0 and redis.get("fetched_blocks", 0) == 0
    assert elapsed < 30  # a refused connection costs milliseconds, then the breaker skips Redis
