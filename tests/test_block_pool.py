"""BlockPool: allocation, sharing, release, copy-on-write copies, and the conservation invariant."""

from __future__ import annotations

import pytest
import torch

from kv_cache import BlockFormat, BlockPool, CacheError, CacheMemoryError, CacheValidationError


def make_pool(num_blocks: int = 4) -> BlockPool:
    fmt = BlockFormat(block_size=4, num_layers=2, kv_heads=2, head_dim=8, dtype=torch.float32)
    return BlockPool(fmt, num_blocks, torch.device("cpu"))


def test_allocate_release_reuses_most_recent_block() -> None:
    pool = make_pool()
    first = pool.allocate(2)
    assert len(set(first)) == 2 and pool.num_free == 2 and pool.num_used == 2
    pool.release([first[1]])
    assert pool.allocate(1) == [first[1]]
    pool.check_invariants([first])


def test_exhaustion_message_names_counts_and_setting() -> None:
    pool = make_pool(num_blocks=3)
    pool.allocate(2)
    with pytest.raises(CacheMemoryError, match=r"requested 2 blocks but only 1 of 3 are free.*raise num_blocks"):
        pool.allocate(2)
    assert pool.num_free == 1  # a failed allocation changes nothing


def test_share_and_release_count_references() -> None:
    pool = make_pool()
    (block,) = pool.allocate(1)
    pool.share([block])
    assert pool.ref_count(block) == 2
    pool.release([block])
    assert pool.ref_count(block) == 1 and pool.num_free == 3
    pool.release([block])
    assert pool.num_free == 4
    with pytest.raises(CacheError, match="double free"):
        pool.release([block])
    with pytest.raises(CacheError, match="is free"):
        pool.share([block])


def test_copy_block_copies_every_layer() -> None:
    pool = make_pool()
    src, dst = pool.allocate(2)
    for layer in range(2):
        dense = pool.dense(layer)
        dense.keys[src] = torch.randn_like(dense.keys[src])
        dense.values[src] = torch.randn_like(dense.values[src])
    pool.copy_block(src, dst)
    for layer in range(2):
        dense = pool.dense(layer)
        assert torch.equal(dense.keys[dst], dense.keys[src]) and torch.equal(dense.values[dst], dense.values[src])


def test_invariant_check_catches_a_leak() -> None:
    pool = make_pool()
    held = pool.allocate(2)
    with pytest.raises(CacheError, match="ref count 1, held 0"):
        pool.check_invariants([held[:1]])


def test_memory_accounting() -> None:
    pool = make_pool(num_blocks=5)
    assert pool.block_format.bytes_per_token == 2 * 2 * 2 * 8 * 4
    assert pool.memory_bytes == 5 * 4 * pool.block_format.bytes_per_token
    assert pool.dense(1).keys.shape == (5, 4, 2, 8)


def allocator_state(pool: BlockPool) -> tuple[list[int], list[int]]:
    return list(pool._free), [pool.ref_count(b) for b in range(pool.num_blocks)]


@pytest.mark.parametrize("seed", range(20))
def test_atomic_undoes_any_mix_of_allocations_shares_and_releases(seed: int) -> None:
    """A failing operation puts counts and the free stack's order back exactly, nested blocks included."""
    rng = torch.Generator().manual_seed(seed)
    pool = make_pool(12)
    held = pool.allocate(5)
    pool.share(held[:2])
    pool.release(held[3:4])

    def scramble() -> None:
        for _ in range(8):
            live = [b for b in range(pool.num_blocks) if pool.ref_count(b)]
            action = int(torch.randint(3, (1,), generator=rng))
            if action == 0 and pool.num_free:
                pool.allocate(int(torch.randint(1, pool.num_free + 1, (1,), generator=rng)))
            elif action == 1 and live:
                pool.share([live[int(torch.randint(len(live), (1,), generator=rng))]])
            elif live:
                pool.release([live[int(torch.randint(len(live), (1,), generator=rng))]])

    before = allocator_state(pool)
    with pytest.raises(RuntimeError, match="injected"), pool.atomic():
        scramble()
        with pool.atomic():  # an inner block that succeeds is undone with the outer one
            scramble()
        raise RuntimeError("injected")
    assert allocator_state(pool) == before

    with pool.atomic():  # success keeps every change, and nothing is journaled afterwards
        pool.allocate(1)
    assert pool._journal is None and allocator_state(pool) != before


def test_a_stacked_pool_keeps_each_layer_a_view_of_its_stack() -> None:
    fmt = BlockFormat(block_size=4, num_layers=3, kv_heads=2, head_dim=8, dtype=torch.float32, layer_bits=(8, 4, 8))
    pool = BlockPool(fmt, 5, torch.device("cpu"), stacked=True)
    assert sorted(stack.layers for stack in pool.stacks) == [(0, 2), (1,)]
    stack = next(stack for stack in pool.stacks if stack.layers == (0, 2))
    pool.quantized(2).key_codes[3].fill_(7)
    assert int(stack.tensors[0][1, 3].max()) == 7 and int(stack.flat(0)[5 + 3].max()) == 7
    src, dst = pool.allocate(2)
    for layer in range(3):
        for tensor in pool.quantized(layer).tensors():
            tensor[src].random_(0, 100)
    pool.copy_block(src, dst)
    for layer in range(3):
        assert all(torch.equal(tensor[dst], tensor[src]) for tensor in pool.quantized(layer).tensors())
    real = sum(t.numel() * t.element_size() for s in pool.stacks for t in s.tensors)
    assert real == pool.memory_bytes


def test_a_pool_is_pinned_or_stacked_not_both() -> None:
    fmt = BlockFormat(block_size=4, num_layers=2, kv_heads=2, head_dim=8, dtype=torch.float32)
    with pytest.raises(CacheValidationError, match=r"pinned \(a host tier\) or stacked"):
        BlockPool(fmt, 2, torch.device("cpu"), pin_memory=True, stacked=True)
