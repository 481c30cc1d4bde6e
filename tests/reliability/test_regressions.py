"""Minimal programs for the bugs the generated tests found, shrunk to a few calls each.

They were `xfail(strict=True)` while the bugs stood; the bugs are fixed and each program now guards its fix.
"""

from __future__ import annotations

import pytest
import torch

from kv_cache import BaseKVCache, CacheMemoryError, KVStore, PagedKVCache

from .reference import DIM, HEADS, quantized, store_config


def states(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(1, HEADS, tokens, DIM, generator=torch.Generator().manual_seed(seed))


def test_sealing_a_shared_block_does_not_write_into_the_other_holder() -> None:
    """Layer 1 runs ahead and seals block 0 (allocating it for every layer); after a fork both sequences seal
    their own layer-0 tokens into that one shared block, and the parent reads the child's keys."""
    store = KVStore(quantized(4, residual_tokens=0), num_layers=2)
    parent = store.add_sequence()
    store.append([parent], 1, states(4, 0), states(4, 0))
    child = store.fork(parent)
    store.append([parent], 0, states(4, 1), states(4, 1))
    store.append([child], 0, states(4, 2), states(4, 2))
    assert (store.read([parent], 0)[0] - states(4, 1)).abs().max() < 0.5  # INT4 error is ~0.1 here; 3+ if not


def test_a_row_sealing_alone_in_a_batch_seals_its_own_tokens() -> None:
    """Continuous batching with residual_tokens=0: row 1 completes a block (and seals it) while row 0 does not;
    the sealed block must hold row 1's token, not row 0's."""
    store = KVStore(quantized(8, residual_tokens=0), num_layers=1)
    short, long = store.add_sequence(), store.add_sequence()
    store.append([long], 0, states(3, 0), states(3, 0))
    new = torch.cat([states(1, 1) + 100, states(1, 2)])  # row 0 -> `short`, row 1 -> `long`
    store.append([short, long], 0, new, new)
    assert (store.read([long], 0)[0][0, :, 3] - new[1, :, 0]).abs().max() < 0.1  # INT8 error; 100 if mixed up


def test_a_fork_does_not_receive_its_parents_attention_mass() -> None:
    """Beam search forks a sequence; heavy-hitter scores added to one beam must not change the other's."""
    store = KVStore(store_config(token_budget=8, cache_strategy="lfu"), num_layers=1)
    parent = store.add_sequence()
    store.append([parent], 0, states(5, 0), states(5, 1))
    child = store.fork(parent)
    store.add_attention_mass([parent], 0, torch.ones(1, HEADS, 5))
    assert torch.equal(store.attention_mass(child, 0), torch.zeros(HEADS, 5))


def test_quantized_reads_do_not_depend_on_how_appends_were_chunked() -> None:
    """The same 12 tokens, appended at once or one by one, into INT4 blocks with an fp16 full-precision tail."""
    keys, values = states(12, 0), states(12, 1)
    reads = []
    for chunks in ([12], [1] * 12):
        store = KVStore(quantized(4, residual_tokens=4, dtype="float16"), num_layers=1)
        seq, start = store.add_sequence(), 0
        for count in chunks:
            store.append([seq], 0, keys[:, :, start : start + count], values[:, :, start : start + count])
            start += count
        reads.append(store.read([seq], 0)[0].clone())
    assert torch.equal(reads[0], reads[1])


def test_a_rewrite_that_does_not_fit_leaves_the_cache_as_it_was() -> None:
    """`forward` from a position before the end that then runs out of room must not have dropped anything."""
    cache = BaseKVCache(store_config(max_tokens=8))
    cache.forward(states(6, 0), states(6, 1))
    with pytest.raises(CacheMemoryError, match="max_tokens=8"):
        cache.forward(states(7, 2), states(7, 3), cache_position=2)
    assert cache.seq_length == 6


def test_page_token_counts_skip_sealed_blocks() -> None:
    """With 6 tokens in INT4 blocks of 4 and no window, block 0 is sealed and the one tail page holds 2 tokens."""
    cache = PagedKVCache(quantized(4, residual_tokens=0))
    cache.forward(states(6, 0), states(6, 1))
    (page,) = cache.store.block_ids(cache.seq_ids[0])
    assert cache.get_page(page)["tokens"] == 2


def test_keep_tokens_that_runs_out_of_blocks_changes_no_row() -> None:
    """Row 0 needs no copy; row 1 shares its first block with `parent` and the pool is full."""
    store = KVStore(store_config(num_blocks=4), num_layers=1)
    parent, private, filler = (store.add_sequence() for _ in range(3))
    for seq, tokens in ((parent, 8), (private, 4), (filler, 4)):
        store.append([seq], 0, states(tokens, seq), states(tokens, seq))
    forked = store.fork(parent)
    with pytest.raises(CacheMemoryError, match="copy-on-write"):
        store.keep_tokens([private, forked], 0, torch.tensor([1, 3]).expand(1, HEADS, 2).repeat(2, 1, 1))
    assert store.num_tokens(private) == 4


def test_a_batch_read_with_only_later_rows_sealed() -> None:
    """Equal lengths, uneven seals (after a truncation): row 0 all full precision, row 1 with a sealed block."""
    store = KVStore(quantized(4), num_layers=1)
    unsealed, sealed = store.add_sequence(), store.add_sequence()
    store.append([unsealed], 0, states(6, 0), states(6, 1))
    store.append([sealed], 0, states(12, 2), states(12, 3))
    store.truncate(sealed, 6)
    keys, _ = store.read([unsealed, sealed], 0)
    assert torch.equal(keys[0], states(6, 0)[0])
