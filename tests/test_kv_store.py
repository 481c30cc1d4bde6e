"""KVStore: appends and reads against a contiguous reference, forks with copy-on-write, and no leaks.

The hypothesis state machine drives random append / fork / free / truncate / read programs and compares every
read with plain `torch.cat` tensors, checking the pool's conservation law after every step.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kv_cache import CacheMemoryError, CacheValidationError, KVCacheConfig, KVStore
from kv_cache.block_format import DenseBlocks

HEADS, DIM = 2, 4


def kv(batch: int, tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (batch, HEADS, tokens, DIM)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_append_read_round_trip_across_blocks() -> None:
    gen = torch.Generator().manual_seed(0)
    store = KVStore(KVCacheConfig(max_tokens=64, block_size=4, device="cpu"), num_layers=2)
    seqs = [store.add_sequence() for _ in range(3)]
    keys, values = kv(3, 7, gen)
    for layer in range(2):
        store.append(seqs, layer, keys, values)
    more_k, more_v = kv(3, 6, gen)
    for layer in range(2):
        store.append(seqs, layer, more_k, more_v)
        got_k, got_v = store.read(seqs, layer)
        assert torch.equal(got_k, torch.cat([keys, more_k], dim=2))
        assert torch.equal(got_v, torch.cat([values, more_v], dim=2))
    assert store.pool is not None and store.pool.num_used == 3 * 4  # 13 tokens -> 4 blocks of 4 each
    store.check_invariants()


def test_fork_shares_blocks_until_written() -> None:
    gen = torch.Generator().manual_seed(1)
    store = KVStore(KVCacheConfig(max_tokens=64, block_size=4, device="cpu"), num_layers=1)
    parent = store.add_sequence()
    keys, values = kv(1, 6, gen)
    store.append([parent], 0, keys, values)
    child = store.fork(parent)
    assert store.block_ids(child) == store.block_ids(parent)
    assert store.pool is not None and store.pool.ref_count(store.block_ids(parent)[1]) == 2
    new_k, new_v = kv(1, 1, gen)
    store.append([child], 0, new_k, new_v)  # writes into the shared, partly filled block -> copy on write
    assert store.block_ids(child)[0] == store.block_ids(parent)[0]  # the full block stays shared
    assert store.block_ids(child)[1] != store.block_ids(parent)[1]
    assert torch.equal(store.read([parent], 0)[0], keys)
    assert torch.equal(store.read([child], 0)[0], torch.cat([keys, new_k], dim=2))
    store.check_invariants()


def test_pool_exhaustion_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(2)
    store = KVStore(KVCacheConfig(max_tokens=64, block_size=4, num_blocks=3, device="cpu"), num_layers=1)
    a, b = store.add_sequence(), store.add_sequence()
    store.append([a, b], 0, *kv(2, 4, gen))
    with pytest.raises(CacheMemoryError, match=r"requested 2 blocks but only 1 of 3 are free.*raise num_blocks"):
        store.append([a, b], 0, *kv(2, 1, gen))
    assert store.num_tokens(a) == 4 and store.num_tokens(b) == 4
    store.check_invariants()


def test_max_tokens_is_enforced_with_a_clear_message() -> None:
    store = KVStore(KVCacheConfig(max_tokens=5, block_size=4, device="cpu"), num_layers=1)
    seq = store.add_sequence()
    with pytest.raises(CacheMemoryError, match="would hold 6 tokens but max_tokens=5; raise max_tokens"):
        store.append([seq], 0, *kv(1, 6, torch.Generator().manual_seed(3)))


def test_memory_budget_sizes_the_pool() -> None:
    store = KVStore(KVCacheConfig(block_size=4, memory_budget_mb=1.0, device="cpu"), num_layers=1)
    seq = store.add_sequence()
    store.append([seq], 0, *kv(1, 1, torch.Generator().manual_seed(4)))
    assert store.pool is not None
    bytes_per_block = 4 * 2 * HEADS * DIM * 4
    assert store.pool.num_blocks == 2**20 // bytes_per_block


def test_storage_dtype_differs_from_model_dtype() -> None:
    store = KVStore(KVCacheConfig(block_size=4, dtype=torch.float16, device="cpu"), num_layers=1)
    seq = store.add_sequence()
    keys, values = kv(1, 5, torch.Generator().manual_seed(5))
    store.append([seq], 0, keys, values)
    got_k, _ = store.read([seq], 0)
    assert got_k.dtype == torch.float32 and store.pool is not None and store.pool.dense(0).keys.dtype == torch.float16
    torch.testing.assert_close(got_k, keys.half().float(), rtol=0, atol=0)


def test_inputs_requiring_grad_are_stored_detached() -> None:
    store = KVStore(KVCacheConfig(block_size=4, device="cpu"), num_layers=1)
    seq = store.add_sequence()
    keys = torch.randn(1, HEADS, 3, DIM, requires_grad=True)
    store.append([seq], 0, keys, keys * 2)
    assert store.pool is not None and not store.pool.dense(0).keys.requires_grad
    assert not store.read([seq], 0)[0].requires_grad


BAD_INPUTS = [
    ("not a tensor", lambda: ([0], 0, [1.0], torch.zeros(1, HEADS, 1, DIM)), "must be tensors"),
    ("rank", lambda: ([0], 0, torch.zeros(HEADS, 1, DIM), torch.zeros(HEADS, 1, DIM)), "expected 4 dims"),
    ("shape mismatch", lambda: ([0], 0, torch.zeros(1, HEADS, 1, DIM), torch.zeros(1, HEADS, 2, DIM)), "differs"),
    ("batch", lambda: ([0], 0, torch.zeros(2, HEADS, 1, DIM), torch.zeros(2, HEADS, 1, DIM)), "batch 2 but 1"),
    ("heads", lambda: ([0], 0, torch.zeros(1, 3, 1, DIM), torch.zeros(1, 3, 1, DIM)), "3 KV heads"),
    ("head_dim", lambda: ([0], 0, torch.zeros(1, HEADS, 1, 5), torch.zeros(1, HEADS, 1, 5)), "head_dim 5"),
    ("int dtype", lambda: ([0], 0, *(torch.zeros(1, HEADS, 1, DIM, dtype=torch.int32),) * 2), "dtypes"),
    ("dtype change", lambda: ([0], 0, *(torch.zeros(1, HEADS, 1, DIM, dtype=torch.half),) * 2), "filled with"),
    ("layer", lambda: ([0], 3, torch.zeros(1, HEADS, 1, DIM), torch.zeros(1, HEADS, 1, DIM)), "layer=3"),
    ("unknown sequence", lambda: ([99], 0, torch.zeros(1, HEADS, 1, DIM), torch.zeros(1, HEADS, 1, DIM)), "99"),
]


@pytest.mark.parametrize(("name", "make", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_and_leave_the_store_usable(name: str, make, message: str) -> None:
    store = KVStore(KVCacheConfig(block_size=4, device="cpu"), num_layers=1)
    seq = store.add_sequence()
    keys, values = kv(1, 2, torch.Generator().manual_seed(6))
    store.append([seq], 0, keys, values)
    with pytest.raises(CacheValidationError, match=message):
        store.append(*make())
    assert torch.equal(store.read([seq], 0)[0], keys)
    store.check_invariants()


class StoreMachine(RuleBasedStateMachine):
    """Random programs over a small pool, checked against contiguous tensors per sequence and layer."""

    LAYERS = 2

    def __init__(self) -> None:
        super().__init__()
        self.store = KVStore(KVCacheConfig(max_tokens=40, block_size=4, num_blocks=24, device="cpu"), self.LAYERS)
        self.model: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.gen = torch.Generator().manual_seed(0)

    @rule()
    def add(self) -> None:
        seq = self.store.add_sequence()
        empty = torch.zeros(1, HEADS, 0, DIM)
        self.model[seq] = [(empty, empty)] * self.LAYERS

    @precondition(lambda self: self.model)
    @rule(data=st.data(), tokens=st.integers(1, 9), rows=st.integers(1, 3))
    def append(self, data: st.DataObject, tokens: int, rows: int) -> None:
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=rows, unique=True))
        keys, values = kv(len(seqs), tokens, self.gen)
        try:
            for layer in range(self.LAYERS):
                self.store.append(seqs, layer, keys, values)
        except CacheMemoryError:
            # All-or-nothing per call: the failing layer changed nothing; undo the layers that succeeded.
            for seq in seqs:
                old = self.model[seq][0][0].shape[2]
                self.store.truncate(seq, old)
            return
        for row, seq in enumerate(seqs):
            self.model[seq] = [
                (torch.cat([k, keys[row : row + 1]], 2), torch.cat([v, values[row : row + 1]], 2))
                for k, v in self.model[seq]
            ]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(sorted(self.model)))
        self.model[self.store.fork(parent)] = list(self.model[parent])

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.model)))
        self.store.free(seq)
        del self.model[seq]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), keep=st.integers(0, 40))
    def truncate(self, data: st.DataObject, keep: int) -> None:
        seq = data.draw(st.sampled_from(sorted(self.model)))
        self.store.truncate(seq, keep)
        self.model[seq] = [(k[:, :, :keep], v[:, :, :keep]) for k, v in self.model[seq]]

    @invariant()
    def reads_match_and_nothing_leaks(self) -> None:
        self.store.check_invariants()
        pool = self.store.pool
        if pool is not None:
            assert pool.num_free + pool.num_used == pool.num_blocks
        for seq, layers in self.model.items():
            for layer, (keys, values) in enumerate(layers):
                assert self.store.num_tokens(seq, layer) == keys.shape[2]
                if keys.shape[2]:
                    got_k, got_v = self.store.read([seq], layer)
                    assert torch.equal(got_k, keys) and torch.equal(got_v, values)


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestStoreMachine = StoreMachine.TestCase


def test_layers_in_the_same_state_share_block_tables() -> None:
    """A decode step: every layer after the first writes in place and reads the block tables built for the first."""
    gen = torch.Generator().manual_seed(7)
    store = KVStore(KVCacheConfig(max_tokens=64, block_size=4, device="cpu"), num_layers=3)
    seqs = [store.add_sequence() for _ in range(3)]
    prompts = [kv(1, tokens, gen) for tokens in (5, 8, 2)]  # rows of different lengths, one on a block boundary
    for seq, (keys, values) in zip(seqs, prompts, strict=True):
        for layer in range(3):
            store.append([seq], layer, keys, values)
    step_k, step_v = kv(3, 1, gen)
    views = []
    for layer in range(3):
        store.append(seqs, layer, step_k, step_v)
        views.append(store.paged_kv(seqs, layer))
    assert store.pool is not None
    for layer, view in enumerate(views):
        assert view.block_table is views[0].block_table and view.seq_lens is views[0].seq_lens
        assert view.key_cache is store.pool.dense(layer).keys
        assert view.seq_lens.tolist() == [6, 9, 3]
        for row, (keys, _) in enumerate(prompts):
            got = store.read([seqs[row]], layer)[0]
            assert torch.equal(got, torch.cat([keys, step_k[row : row + 1]], dim=2))
    store.check_invariants()


def test_layers_in_different_states_get_their_own_tables() -> None:
    gen = torch.Generator().manual_seed(8)
    store = KVStore(KVCacheConfig(max_tokens=64, block_size=4, device="cpu"), num_layers=2)
    seqs = [store.add_sequence() for _ in range(2)]
    keys, values = kv(2, 4, gen)
    for layer in range(2):
        store.append(seqs, layer, keys, values)
    store.append(seqs, 0, *kv(2, 1, gen))  # layer 0 runs one token ahead (and allocated a block)
    assert store.paged_kv(seqs, 0).seq_lens.tolist() == [5, 5]
    assert store.paged_kv(seqs, 1).seq_lens.tolist() == [4, 4]


def test_in_place_write_still_copies_a_shared_block() -> None:
    """Forked rows share their partly filled tail block: a batched decode write must copy it first."""
    gen = torch.Generator().manual_seed(9)
    store = KVStore(KVCacheConfig(max_tokens=64, block_size=4, device="cpu"), num_layers=2)
    parent = store.add_sequence()
    keys, values = kv(1, 6, gen)
    for layer in range(2):
        store.append([parent], layer, keys, values)
    child = store.fork(parent)
    step_k, step_v = kv(2, 1, gen)
    for layer in range(2):
        store.append([parent, child], layer, step_k, step_v)
        for row, seq in enumerate((parent, child)):
            assert torch.equal(store.read([seq], layer)[0], torch.cat([keys, step_k[row : row + 1]], dim=2))
    assert store.block_ids(child)[1] != store.block_ids(parent)[1]
    store.check_invariants()


def test_in_place_writes_into_adjacent_blocks_take_one_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt's blocks, allocated in one ascending run for both rows, take one contiguous copy per layer (layer 0
    planning them, layer 1 writing in place); a decode step's tokens in separate blocks go through an index."""
    gen = torch.Generator().manual_seed(11)
    store = KVStore(KVCacheConfig(max_tokens=64, block_size=4, device="cpu"), num_layers=2)
    seqs = [store.add_sequence() for _ in range(2)]
    indexed: list[int] = []
    write = DenseBlocks.write
    monkeypatch.setattr(
        DenseBlocks, "write", lambda self, slots, k, v: indexed.append(len(slots)) or write(self, slots, k, v)
    )
    prompt_k, prompt_v = kv(2, 12, gen)  # three whole blocks per row, allocated in one ascending run
    step_k, step_v = kv(2, 1, gen)  # a new block per row
    for keys, values in ((prompt_k, prompt_v), (step_k, step_v)):
        for layer in range(2):
            store.append(seqs, layer, keys, values)
    assert indexed == [2, 2]  # only the decode token, one slot per row, in each layer
    for layer in range(2):
        got_k, got_v = store.read(seqs, layer)
        assert torch.equal(got_k, torch.cat([prompt_k, step_k], 2)) and torch.equal(
            got_v, torch.cat([prompt_v, step_v], 2)
        )
    store.check_invariants()


@pytest.mark.parametrize("batch", [1, 3])
def test_a_chunk_over_several_blocks_is_planned_once_then_written_in_place(
    batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first layer of a 9-token chunk allocates its blocks; the other layers write into them in place (one
    contiguous copy for one row, an index otherwise), and every layer reads back what it was given."""
    gen = torch.Generator().manual_seed(10)
    store = KVStore(KVCacheConfig(max_tokens=64, block_size=4, device="cpu"), num_layers=3)
    seqs = [store.add_sequence() for _ in range(batch)]
    first_k, first_v = kv(batch, 3, gen)
    chunk_k, chunk_v = kv(batch, 9, gen)  # positions 3..11: blocks 0 (partly), 1 and 2
    planned: list[int] = []
    plan = store._append_planned
    monkeypatch.setattr(
        store,
        "_append_planned",
        lambda tables, layer, rows, count, **options: (
            planned.append(layer) or plan(tables, layer, rows, count, **options)
        ),
    )
    for layer in range(3):
        store.append(seqs, layer, first_k, first_v)
    for layer in range(3):
        store.append(seqs, layer, chunk_k, chunk_v)
    assert planned == [0, 0]
    for layer in range(3):
        got_k, got_v = store.read(seqs, layer)
        assert torch.equal(got_k, torch.cat([first_k, chunk_k], dim=2))
        assert torch.equal(got_v, torch.cat([first_v, chunk_v], dim=2))
    store.check_invariants()
