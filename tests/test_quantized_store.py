"""KVStore with quantization: sealed blocks read back as dequantize(quantize(block)), the tail stays exact.

Reference: the contiguous tokens of a sequence, split at `sealed = max(0, (T - residual) // block) * block`; the
sealed part is quantized block by block with `kv_cache.quantizer` and dequantized, the rest is copied.
Whatever the chunking of the appends, reads must equal that reference (float rounding aside: atol 1e-6).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_cache import CacheMemoryError, CacheValidationError, KVCacheConfig, KVStore
from kv_cache.quantizer import dequantize_keys, dequantize_values, quantize_keys, quantize_values

HEADS, DIM, BLOCK, WINDOW, GROUP = 2, 16, 8, 16, 8


def config(**overrides: object) -> KVCacheConfig:
    options = {
        "max_tokens": 512,
        "block_size": BLOCK,
        "use_quantization": True,
        "quantization_bits": 4,
        "quantization_group_size": GROUP,
        "residual_tokens": WINDOW,
        "device": "cpu",
        **overrides,
    }
    return KVCacheConfig(**options)  # type: ignore[arg-type]


def reference(states: torch.Tensor, bits: int, keys: bool) -> torch.Tensor:
    """states: [batch, heads, T, dim] -> what a quantized cache must return for them."""
    batch, heads, length, dim = states.shape
    sealed = max(0, (length - WINDOW) // BLOCK) * BLOCK
    tokens = states.transpose(1, 2)
    blocks = tokens[:, :sealed].reshape(batch, sealed // BLOCK, BLOCK, heads, dim)
    if keys:
        restored = dequantize_keys(*quantize_keys(blocks, bits), head_dim=dim)
    else:
        restored = dequantize_values(*quantize_values(blocks, bits, GROUP), head_dim=dim)
    return torch.cat([restored.reshape(batch, sealed, heads, dim), tokens[:, sealed:].float()], 1).transpose(1, 2)


def assert_matches(store: KVStore, seqs: list[int], layer: int, keys: torch.Tensor, values: torch.Tensor, bits: int):
    got_k, got_v = store.read(seqs, layer)
    torch.testing.assert_close(got_k.float(), reference(keys, bits, True), rtol=0, atol=1e-6)
    torch.testing.assert_close(got_v.float(), reference(values, bits, False), rtol=0, atol=1e-6)


@given(chunks=st.lists(st.integers(1, 40), min_size=1, max_size=8), bits=st.sampled_from([2, 4, 8]))
@settings(max_examples=15, deadline=None)
def test_any_chunking_reads_back_the_reference(chunks: list[int], bits: int) -> None:
    gen = torch.Generator().manual_seed(sum(chunks))
    total = sum(chunks)
    keys = torch.randn(2, HEADS, total, DIM, generator=gen)
    values = torch.randn(2, HEADS, total, DIM, generator=gen)
    store = KVStore(config(quantization_bits=bits), num_layers=2)
    seqs = [store.add_sequence(), store.add_sequence()]
    position = 0
    for chunk in chunks:
        for layer in range(2):
            new = slice(position, position + chunk)
            store.append(seqs, layer, keys[:, :, new], values[:, :, new])
        position += chunk
        store.check_invariants()
        for layer in range(2):
            assert_matches(store, seqs, layer, keys[:, :, :position], values[:, :, :position], bits)
    # The full-precision tail never holds more than the window plus two blocks per sequence.
    assert store.pool is not None and store.pool.num_used <= 2 * (WINDOW // BLOCK + 2)


def test_memory_of_a_quantized_block_is_its_real_bytes() -> None:
    store = KVStore(config(quantization_bits=4), num_layers=3)
    store.initialize(HEADS, DIM, torch.float32, torch.device("cpu"), batch_size=1)
    assert store.quantized_pool is not None
    fmt = store.quantized_pool.block_format
    real = sum(t.numel() * t.element_size() for layer in store.quantized_pool.layers for t in layer.tensors())
    assert fmt.bytes_per_block * store.quantized_pool.num_blocks == real
    # Per element: INT4 codes 0.5 B; keys add 4 B of fp16 scale+zero per channel per block, values per GROUP channels.
    assert fmt.bytes_per_token == 3 * HEADS * DIM * ((0.5 + 4 / BLOCK) + (0.5 + 4 / GROUP))


def test_mixed_precision_per_layer() -> None:
    store = KVStore(config(layer_bits={0: 8, -1: 2}), num_layers=3)
    assert store.layer_bits == (8, 4, 2)
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, HEADS, 40, DIM, generator=gen), torch.randn(1, HEADS, 40, DIM, generator=gen)
    seq = [store.add_sequence()]
    for layer in range(3):
        store.append(seq, layer, keys, values)
    for layer, bits in enumerate((8, 4, 2)):
        assert_matches(store, seq, layer, keys, values, bits)
    with pytest.raises(CacheValidationError, match="names layer 5"):
        KVStore(config(layer_bits={5: 8}), num_layers=3)


@pytest.mark.parametrize("layer_bits", [None, {0: 8, -1: 2}])
def test_one_seal_over_every_layer_matches_the_reference(layer_bits: dict[int, int] | None) -> None:
    """Layer 0 seals a block the other layers already hold whole: all four layers (one or three bit widths) are
    gathered, quantized and stored together, and each reads back its own reference."""
    store = KVStore(config(layer_bits=layer_bits), num_layers=4)
    bits = store.layer_bits
    gen = torch.Generator().manual_seed(2)
    keys, values = torch.randn(2, HEADS, 28, DIM, generator=gen), torch.randn(2, HEADS, 28, DIM, generator=gen)
    seqs = [store.add_sequence(), store.add_sequence()]
    for layer in range(4):
        store.append(seqs, layer, keys[:, :, :20], values[:, :, :20])  # within the window + a block: unsealed
    assert store.quantized_pool is not None and store.quantized_pool.num_used == 0
    store.append(seqs, 0, keys[:, :, 20:], values[:, :, 20:])
    assert [store.num_sealed(seqs[0], layer) for layer in range(4)] == [8] * 4
    for layer in range(1, 4):
        store.append(seqs, layer, keys[:, :, 20:], values[:, :, 20:])
    store.check_invariants()
    for layer in range(4):
        assert_matches(store, seqs, layer, keys, values, bits[layer])


@pytest.mark.parametrize("layer_bits", [None, {0: 8, -1: 2}])
def test_a_chunk_appended_unsealed_then_sealed_once_equals_sealing_per_layer(
    layer_bits: dict[int, int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`append(..., seal=False)` in every layer keeps a 45-token chunk in full precision (past the 16-token window);
    `seal` then seals all layers in one encode, and every layer holds exactly what sealing per layer stores."""
    gen = torch.Generator().manual_seed(4)
    keys, values = torch.randn(2, HEADS, 50, DIM, generator=gen), torch.randn(2, HEADS, 50, DIM, generator=gen)
    stores = [KVStore(config(layer_bits=layer_bits), num_layers=4) for _ in range(2)]
    for store in stores:  # room for the chunk in the tail pool
        store.initialize(HEADS, DIM, torch.float32, torch.device("cpu"), batch_size=2, spare_tokens=64)
        seqs = [store.add_sequence(), store.add_sequence()]
        for layer in range(4):
            store.append(seqs, layer, keys[:, :, :5], values[:, :, :5])
    per_layer, deferred = stores
    for layer in range(4):
        per_layer.append(seqs, layer, keys[:, :, 5:], values[:, :, 5:])
    assert deferred.fits_unsealed(seqs, 45)
    encodes: list[int] = []
    assert deferred.sealer is not None
    encode = deferred.sealer.encode
    monkeypatch.setattr(deferred.sealer, "encode", lambda *args: encodes.append(1) or encode(*args))
    for layer in range(4):
        deferred.append(seqs, layer, keys[:, :, 5:], values[:, :, 5:], seal=False)
        assert deferred.num_sealed(seqs[0], layer) == 0 and deferred.num_tokens(seqs[0], layer) == 50
    assert deferred.quantized_pool is not None and deferred.quantized_pool.num_used == 0 and not encodes
    deferred.seal(seqs)
    assert len(encodes) == 1  # layer 0's seal covers the other layers' whole blocks too
    for store in stores:
        store.check_invariants()
        for layer in range(4):
            assert_matches(store, seqs, layer, keys, values, store.layer_bits[layer])
    for layer in range(4):
        for got, want in zip(deferred.read(seqs, layer), per_layer.read(seqs, layer), strict=True):
            assert torch.equal(got, want)
    assert deferred.pool is not None and per_layer.pool is not None
    assert deferred.pool.num_used == per_layer.pool.num_used


def test_fits_unsealed_counts_the_tail_pool() -> None:
    store = KVStore(config(), num_layers=2)
    store.initialize(HEADS, DIM, torch.float32, torch.device("cpu"), batch_size=1, spare_tokens=40)
    seq = [store.add_sequence()]
    assert store.pool is not None and store.pool.num_free == WINDOW // BLOCK + 3 + 5
    assert store.fits_unsealed(seq, 80) and not store.fits_unsealed(seq, 81)  # 10 free blocks of 8 tokens
    store.append(seq, 0, torch.randn(1, HEADS, 9, DIM), torch.randn(1, HEADS, 9, DIM))
    store.append(seq, 1, torch.randn(1, HEADS, 9, DIM), torch.randn(1, HEADS, 9, DIM))
    assert store.fits_unsealed(seq, 71) and not store.fits_unsealed(seq, 72)  # 2 blocks held, 7 tokens left in one


def test_fits_unsealed_counts_the_sealed_pool_the_seal_after_needs() -> None:
    store = KVStore(config(num_blocks=2), num_layers=2)  # two sealed blocks of 8 tokens
    store.initialize(HEADS, DIM, torch.float32, torch.device("cpu"), batch_size=1, spare_tokens=64)
    seq = [store.add_sequence()]
    assert store.fits_unsealed(seq, 39)  # seals 16 tokens after the window of 16: two blocks
    assert not store.fits_unsealed(seq, 40)  # three


@pytest.mark.parametrize("first_append", [True, False])
@pytest.mark.parametrize("position", [3, 39])  # a token the seal quantizes; one of the window it leaves unsealed
def test_a_non_finite_chunk_appended_unsealed_fails_at_the_seal_and_seals_nothing(
    position: int, first_append: bool
) -> None:
    """`append(..., seal=False)` defers its NaN/Inf check to `seal`, which raises before sealing anything, whether
    the bad token is one it would quantize or one of the window it keeps (the tokens stay stored unsealed until the
    caller truncates them); truncating drops the failed check, and the sequence is good for a clean chunk again."""
    store = KVStore(config(), num_layers=2)
    seq = [store.add_sequence()]
    if not first_append:
        store.initialize(HEADS, DIM, torch.float32, torch.device("cpu"), batch_size=1, spare_tokens=64)
    bad = torch.randn(1, HEADS, 40, DIM)
    bad[0, 1, position, 2] = float("nan")
    for layer in range(2):
        store.append(seq, layer, bad, bad, seal=False)
    assert store.num_tokens(seq[0]) == 40
    with pytest.raises(CacheValidationError, match=r"NaN|Inf|non-finite"):
        store.seal(seq)
    assert store.quantized_pool is not None and store.quantized_pool.num_used == 0
    assert [store.num_sealed(seq[0], layer) for layer in range(2)] == [0, 0]
    store.check_invariants()
    store.truncate(seq[0], 0)
    good = torch.randn(1, HEADS, 40, DIM)
    for layer in range(2):
        store.append(seq, layer, good, good, seal=False)
    store.seal(seq)
    assert [store.num_sealed(seq[0], layer) for layer in range(2)] == [24, 24]
    store.check_invariants()


def test_the_deferred_check_covers_every_unsealed_append_of_a_sequence() -> None:
    """A NaN in a layer's chunk is caught by `seal` even when nothing in any layer is old enough to seal."""
    store = KVStore(config(), num_layers=2)
    seq = [store.add_sequence()]
    bad = torch.randn(1, HEADS, 10, DIM)
    store.append(seq, 0, bad, bad, seal=False)
    bad = bad.clone()
    bad[0, 0, 9, 0] = float("inf")
    store.append(seq, 1, bad, bad, seal=False)
    with pytest.raises(CacheValidationError, match=r"NaN|Inf|non-finite"):
        store.seal(seq)
    store.seal(seq)  # the failed check is spent: nothing left to check or seal


def test_fork_shares_sealed_blocks_and_copies_the_tail_on_write() -> None:
    gen = torch.Generator().manual_seed(2)
    store = KVStore(config(), num_layers=1)
    parent = store.add_sequence()
    keys, values = torch.randn(1, HEADS, 37, DIM, generator=gen), torch.randn(1, HEADS, 37, DIM, generator=gen)
    store.append([parent], 0, keys, values)
    child = store.fork(parent)
    assert store.quantized_block_ids(child) == store.quantized_block_ids(parent)
    more_k, more_v = torch.randn(1, HEADS, 1, DIM, generator=gen), torch.randn(1, HEADS, 1, DIM, generator=gen)
    store.append([child], 0, more_k, more_v)
    assert_matches(store, [parent], 0, keys, values, 4)
    assert_matches(store, [child], 0, torch.cat([keys, more_k], 2), torch.cat([values, more_v], 2), 4)
    store.check_invariants()
    store.free(parent)
    store.free(child)
    assert store.pool is not None and store.pool.num_used == 0
    assert store.quantized_pool is not None and store.quantized_pool.num_used == 0


@pytest.mark.parametrize("keep", [30, 24, 13, 3, 0])
def test_truncate_inside_sealed_blocks_dequantizes_the_cut_block(keep: int) -> None:
    gen = torch.Generator().manual_seed(3)
    store = KVStore(config(), num_layers=2)
    seq = [store.add_sequence()]
    keys, values = torch.randn(1, HEADS, 45, DIM, generator=gen), torch.randn(1, HEADS, 45, DIM, generator=gen)
    for layer in range(2):
        store.append(seq, layer, keys, values)
    expected_k = reference(keys, 4, True)[:, :, :keep]
    store.truncate(seq[0], keep)
    store.check_invariants()
    assert store.num_tokens(seq[0]) == keep
    if keep:
        torch.testing.assert_close(store.read(seq, 1)[0], expected_k, rtol=0, atol=1e-6)
    for layer in range(2):  # the sequence keeps growing normally afterwards
        store.append(seq, layer, keys[:, :, :20], values[:, :, :20])
    store.check_invariants()


def test_non_finite_input_is_rejected_and_changes_nothing() -> None:
    store = KVStore(config(), num_layers=1)
    seq = [store.add_sequence()]
    good = torch.randn(1, HEADS, 20, DIM)
    store.append(seq, 0, good, good)
    bad = torch.randn(1, HEADS, 20, DIM)
    bad[0, 1, 3, 2] = float("nan")
    with pytest.raises(CacheValidationError, match="NaN or Inf"):
        store.append(seq, 0, bad, good[:, :, :20])
    assert store.num_tokens(seq[0]) == 20
    store.check_invariants()


@pytest.mark.parametrize(
    ("held", "new"),
    [(17, 1), (15, 2), (20, 20)],
    ids=["in place (a decode token)", "planned, no seal (a new block)", "planned and sealing"],
)
def test_non_finite_input_is_refused_on_every_append_path(held: int, new: int) -> None:
    """After the first append the NaN/Inf check reads a device flag late (with the seal's own check when the
    append seals): every path still refuses before anything is written."""
    store = KVStore(config(), num_layers=2)
    seq = [store.add_sequence()]
    gen = torch.Generator().manual_seed(4)
    keys, values = torch.randn(1, HEADS, held, DIM, generator=gen), torch.randn(1, HEADS, held, DIM, generator=gen)
    for layer in range(2):
        store.append(seq, layer, keys, values)
    before = [store.read(seq, layer) for layer in range(2)]
    bad = torch.randn(1, HEADS, new, DIM, generator=gen)
    bad[0, 0, -1, 1] = float("inf")
    with pytest.raises(CacheValidationError, match="NaN or Inf"):
        store.append(seq, 0, torch.randn(1, HEADS, new, DIM, generator=gen), bad)
    store.check_invariants()
    assert store.num_tokens(seq[0], 0) == held and store.num_sealed(seq[0], 0) == store.num_sealed(seq[0], 1)
    for layer in range(2):
        assert all(torch.equal(a, b) for a, b in zip(store.read(seq, layer), before[layer], strict=True))


def test_non_finite_with_the_check_off_fails_at_sealing_without_storing() -> None:
    store = KVStore(config(check_finite=False), num_layers=1)
    seq = [store.add_sequence()]
    bad = torch.randn(1, HEADS, 4, DIM)
    bad[0, 0, 1, 0] = float("inf")
    store.append(seq, 0, bad, bad)  # lands in the full-precision tail, unchecked
    with pytest.raises(CacheValidationError, match=r"NaN|Inf|non-finite"):
        store.append(seq, 0, torch.randn(1, HEADS, 30, DIM), torch.randn(1, HEADS, 30, DIM))
    assert store.num_tokens(seq[0]) == 4
    store.check_invariants()


def test_tail_pool_exhaustion_is_a_clear_memory_error() -> None:
    store = KVStore(config(), num_layers=1)
    store.initialize(HEADS, DIM, torch.float32, torch.device("cpu"), batch_size=1)
    seqs = [store.add_sequence() for _ in range(3)]
    with pytest.raises(CacheMemoryError, match="tail pool is sized from it"):
        store.append(seqs, 0, torch.randn(3, HEADS, 20, DIM), torch.randn(3, HEADS, 20, DIM))
