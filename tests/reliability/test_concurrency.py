"""Eight threads on one cache: no lost or corrupted token, the conservation invariant intact, counters exact.

Each thread owns its sequences and keeps its own `reference.Reference` of them; it appends (all layers, as a model
step), forks, frees, truncates and reads them, and records reads and counters in one shared `CacheStatsTracker`.
When all threads are done, every thread's sequences must read back bit-exactly (within fp32 rounding of the
quantized round trip for sealed blocks). Every test here runs under a timeout, so a deadlock fails instead of
hanging CI.
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from transformers import PreTrainedModel

from kv_cache import CacheStatsTracker, KVStore
from kv_cache.engine import EngineConfig, InvariantCheck, KVCacheEngine, SamplingParams
from kv_cache.reference_model import encode, heldout_text
from kv_cache.stats import store_gauges

from . import NIGHTLY
from .reference import DIM, HEADS, MAX_TOKENS, Reference, Spec, assert_read, quantized, store_config

THREADS, OPERATIONS = 8, 10_000 if NIGHTLY else 2000
SPECS = [
    Spec("fp32", store_config(num_blocks=512)),
    Spec("INT4", quantized(4, num_blocks=512)),
]


@pytest.fixture(autouse=True)
def interleaved_threads() -> Iterator[None]:
    """Switch Python threads every 10 us (not 5 ms), so operations interleave finely; and one torch thread each
    (eight threads running multi-threaded torch ops oversubscribe a 2-core machine badly)."""
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)
    torch.set_num_threads(threads)


class Worker:
    """One thread's program over the shared store: its own sequences, its own reference, its own random seed."""

    def __init__(self, store: KVStore, spec: Spec, tracker: CacheStatsTracker, seed: int) -> None:
        self.store, self.spec, self.tracker = store, spec, tracker
        self.ref = Reference(spec, HEADS, DIM)
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.counted = 0

    def run(self) -> None:
        actions: list[Callable[[], None]] = [self.add, self.append, self.append, self.fork, self.free]
        actions += [self.truncate, self.read, self.stats]
        for _ in range(OPERATIONS):
            self.rng.choice(actions)()

    def own(self) -> int | None:
        return self.rng.choice(sorted(self.ref.seqs)) if self.ref.seqs else None

    def add(self) -> None:
        if len(self.ref.seqs) < 4:
            self.ref.add(self.store.add_sequence())

    def append(self) -> None:
        seq, tokens = self.own(), self.rng.randint(1, 9)
        if seq is None:
            return
        if self.ref.seqs[seq].num_tokens + tokens > MAX_TOKENS:
            self.store.truncate(seq, 0)
            self.ref.truncate(seq, 0)
        keys, values = (torch.randn(1, HEADS, tokens, DIM, generator=self.gen) for _ in range(2))
        for layer in range(self.spec.num_layers):
            self.store.append([seq], layer, keys, values)
            self.ref.append(seq, layer, keys[0], values[0])

    def fork(self) -> None:
        seq = self.own()
        if seq is not None and len(self.ref.seqs) < 4:
            self.ref.seqs[self.store.fork(seq)] = self.ref.seqs[seq].copy()

    def free(self) -> None:
        seq = self.own()
        if seq is not None:
            self.store.free(seq)
            del self.ref.seqs[seq]

    def truncate(self) -> None:
        seq = self.own()
        if seq is not None:
            keep = self.rng.randint(0, MAX_TOKENS)
            self.store.truncate(seq, keep)
            self.ref.truncate(seq, keep)

    def read(self) -> None:
        """Read a sequence (each thread reads into its own workspace, so no other thread overwrites the views)."""
        seq = self.own()
        if seq is not None and self.ref.seqs[seq].num_tokens:
            keys, _ = self.store.read([seq], self.rng.randrange(self.spec.num_layers))
            assert keys.shape == (1, HEADS, self.ref.seqs[seq].num_tokens, DIM)
            self.tracker.record_read(keys.shape[2], 0)
            self.counted += keys.shape[2]

    def stats(self) -> None:
        self.store.check_invariants()  # under the store's lock: a consistent view while others write
        self.tracker.increment("worker_stats")
        self.tracker.snapshot({"sequences": len(self.ref.seqs)})

    def verify(self) -> None:
        for seq, reference in self.ref.seqs.items():
            for layer in range(self.spec.num_layers):
                assert self.store.num_tokens(seq, layer) == reference.layers[layer].length
                if reference.layers[layer].length:
                    expected = self.ref.read(seq, layer)
                    assert_read(self.store.read([seq], layer), expected, reference.layers[layer].sealed)


def run_threads(targets: list[Callable[[], None]], timeout_s: float) -> None:
    """Start one thread per target, join them, and re-raise the first exception any of them raised."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as error:  # collected and re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    assert not any(thread.is_alive() for thread in threads), "a thread is still running: deadlock?"
    if errors:
        raise errors[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_eight_threads_hammer_one_store(spec: Spec) -> None:
    store = KVStore(spec.config, spec.num_layers)
    store.initialize(HEADS, DIM, torch.float32, torch.device("cpu"), batch_size=4 * THREADS)
    tracker = CacheStatsTracker(history_size=16)
    workers = [Worker(store, spec, tracker, seed) for seed in range(THREADS)]
    run_threads([worker.run for worker in workers], timeout_s=100)
    store.check_invariants()
    for worker in workers:
        worker.verify()
    assert sorted(store.sequence_ids) == sorted(seq for worker in workers for seq in worker.ref.seqs)
    stats = tracker.get_stats()
    assert stats["cached_tokens_read"] == sum(worker.counted for worker in workers)
    assert len(tracker.history()) == min(16, stats["worker_stats"])  # every call snapshots (interval 0)


@pytest.mark.timeout(180)
def test_eight_threads_generate_through_one_engine(model: PreTrainedModel) -> None:
    """Each thread streams its own request while the others step the same engine; a ninth reads stats. Every
    thread gets the tokens its prompt gets alone, and the pool is whole afterwards."""
    text, sampling = heldout_text(), SamplingParams(max_new_tokens=6)
    prompts = [encode(text[start : start + 40]).tolist() for start in range(0, 8 * 997, 997)]
    config = store_config(num_blocks=256, block_size=16, max_tokens=128)
    solo = [KVCacheEngine(model, config).generate([prompt], sampling)[0] for prompt in prompts]
    engine = KVCacheEngine(model, config, EngineConfig(max_num_seqs=4, invariant_check=InvariantCheck.EVERY_STEP))
    outputs: dict[int, list[int]] = {}
    done = threading.Event()

    def client(index: int) -> Callable[[], None]:
        return lambda: outputs.__setitem__(index, list(engine.stream(engine.add_request(prompts[index], sampling))))

    def watch() -> None:
        while not done.is_set():  # before the first step ends there is no snapshot yet (test_regressions.py)
            assert engine.get_stats().get("requests_running", 0) <= 4

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_threads([client(index) for index in range(THREADS)], timeout_s=150)
    finally:
        done.set()
        watcher.join(10)
    assert [outputs[index] for index in range(THREADS)] == solo
    engine.check_invariants()
    assert engine.get_stats()["finished_requests"] == THREADS


@pytest.mark.timeout(60)
def test_stats_during_the_first_step_are_complete(model: PreTrainedModel) -> None:
    engine = KVCacheEngine(model, store_config(num_blocks=64, block_size=16, max_tokens=128))
    seen: list[dict] = []

    def stats_from_another_thread(*_: object) -> None:  # a pre-hook returning None leaves the inputs alone
        if not seen:
            run_threads([lambda: seen.append(engine.get_stats())], timeout_s=10)

    hook = model.register_forward_pre_hook(stats_from_another_thread)
    try:
        engine.generate([encode("def f(x):").tolist()], SamplingParams(max_new_tokens=2))
    finally:
        hook.remove()
    assert "requests_running" in seen[0] and "blocks_used" in seen[0]


def interleaved_store() -> tuple[KVStore, int, int]:
    """Two sequences whose blocks alternate in the pool, so reads gather into the shared workspace."""
    store = KVStore(store_config(), num_layers=1)
    first, second = store.add_sequence(), store.add_sequence()
    for seq in (first, second, first, second):
        store.append([seq], 0, torch.randn(1, HEADS, 4, DIM), torch.randn(1, HEADS, 4, DIM))
    return store, first, second


@pytest.mark.timeout(30)
def test_a_read_is_not_overwritten_by_another_threads_read() -> None:
    store, first, second = interleaved_store()
    keys, _ = store.read([first], 0)
    expected = keys.clone()
    run_threads([lambda: store.read([second], 0)], timeout_s=10)  # any other thread, any time
    assert torch.equal(keys, expected)


@pytest.mark.timeout(30)
def test_stats_while_another_thread_frees_a_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    store, first, _ = interleaved_store()
    num_tokens = store.num_tokens

    def freed_meanwhile(seq_id: int, layer: int | None = None) -> int:
        if seq_id == first and first in store.sequence_ids:
            run_threads([lambda: store.free(first)], timeout_s=10)  # the other thread wins the race
        return num_tokens(seq_id, layer)

    monkeypatch.setattr(store, "num_tokens", freed_meanwhile)
    assert store_gauges(store)["sequences"] in (1, 2)
