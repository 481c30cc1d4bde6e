"""Generated programs over `KVStore`, checked after every step against `reference.Reference`.

`StoreMachine` drives one store (add_sequence, append to any layers in any order, fork, free, truncate,
keep_tokens, adopt_blocks, replace_rows, batched reads, attention mass) in full precision, with a storage dtype
other than the model's, with tight pools, and quantized at INT8/INT4/INT2 and mixed per layer
(test_cache_machine.py does the same for the seed API's `PagedKVCache`). After every step: the conservation
invariant (`check_invariants`), token counts, sealed counts, and every read equal to the reference (the
full-precision tail bit-exact, sealed blocks within fp32 rounding of dequantize(quantize(block))). A memory error
must leave everything as it was.

The minimal programs of the bugs it found are kept in test_regressions.py.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kv_cache import CacheMemoryError, CacheValidationError, KVStore

from . import machine_settings
from .reference import BLOCK, DIM, HEADS, MAX_TOKENS, Reference, Spec, assert_read, quantized, randn, store_config

STORE_SPECS = [
    Spec("fp32", store_config()),
    Spec("fp16 storage, fp32 model", store_config(dtype="float16")),
    Spec("bf16 model", store_config(), model_dtype=torch.bfloat16),
    Spec("tight pool, sized lazily", store_config(num_blocks=None, max_tokens=16), initialize_batch=None),
    Spec("three layers, tight pool", store_config(num_blocks=9), num_layers=3),
    Spec("attention mass (LFU)", store_config(token_budget=8, cache_strategy="lfu")),
    Spec("INT8", quantized(8)),
    Spec("INT4", quantized(4)),
    Spec("INT2", quantized(2)),
    Spec("INT4 no window", quantized(4, residual_tokens=0)),
    Spec("INT8/INT4/INT2 per layer, tight", quantized(4, layer_bits={0: 8, -1: 2}, num_blocks=10), num_layers=3),
]


class StoreMachine(RuleBasedStateMachine):
    """Random programs over one `KVStore`."""

    @initialize(name=st.sampled_from([spec.name for spec in STORE_SPECS]))
    def build(self, name: str) -> None:
        self.spec = spec = next(spec for spec in STORE_SPECS if spec.name == name)
        self.store = KVStore(spec.config, spec.num_layers)
        if spec.initialize_batch is not None:
            self.store.initialize(HEADS, DIM, spec.model_dtype, torch.device("cpu"), spec.initialize_batch)
        self.ref = Reference(spec, HEADS, DIM, track_mass=spec.config.token_budget is not None)
        self.gen = torch.Generator().manual_seed(0)

    def seqs(self, data: st.DataObject, most: int = 3) -> list[int]:
        """Live sequences to act on (any of them may be forked or gain a holder)."""
        live = sorted(self.ref.seqs)
        return data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=most, unique=True)) if live else []

    def shape(self, seq: int) -> list[tuple[int, int]]:
        return [(x.length, x.sealed) for x in self.ref.seqs[seq].layers]

    @rule()
    def add_sequence(self) -> None:
        self.ref.add(self.store.add_sequence())

    @precondition(lambda self: self.ref.seqs)
    @rule(data=st.data(), tokens=st.integers(0, 9), layers=st.lists(st.integers(0, 2), min_size=1, max_size=4))
    def append(self, data: st.DataObject, tokens: int, layers: list[int]) -> None:
        """Append the same new tokens to some layers, in the drawn order (a model step, or a layer running ahead);
        rows of a batch may differ in length and seal."""
        seqs = self.seqs(data)
        keys, values = (randn(self.gen, len(seqs), tokens, self.spec.model_dtype) for _ in range(2))
        limit = self.spec.config.max_tokens
        for layer in [x % self.spec.num_layers for x in layers]:
            over = any(self.ref.seqs[s].layers[layer].length + tokens > limit for s in seqs)
            try:
                self.store.append(seqs, layer, keys, values)
            except CacheMemoryError:
                assert over or self.pool_is_short(len(seqs), tokens), "CacheMemoryError with enough free blocks"
                return
            assert not over or tokens == 0, "max_tokens was not enforced"
            for row, seq in enumerate(seqs):
                self.ref.append(seq, layer, keys[row], values[row])

    def pool_is_short(self, rows: int, tokens: int) -> bool:
        """Whether a full-precision pool may really lack blocks for `rows` x `tokens` (quantized: not judged)."""
        pool = self.store.pool
        if self.spec.quantized or pool is None:
            return True
        return pool.num_free < rows * (-(-tokens // BLOCK) + 1)  # new blocks plus one copy-on-write per row

    @precondition(lambda self: self.ref.seqs)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        for parent in self.seqs(data, 1):
            self.ref.seqs[self.store.fork(parent)] = self.ref.seqs[parent].copy()

    @precondition(lambda self: self.ref.seqs)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = self.seqs(data, 1)[0]
        self.store.free(seq)
        del self.ref.seqs[seq]

    @precondition(lambda self: self.ref.seqs)
    @rule(data=st.data(), keep=st.integers(0, MAX_TOKENS))
    def truncate(self, data: st.DataObject, keep: int) -> None:
        seq = self.seqs(data, 1)[0]
        if self.ref.truncate_refused(seq, keep):
            try:
                self.store.truncate(seq, keep)
            except CacheValidationError:
                return
            raise AssertionError("truncating into sealed blocks of uneven layers was not refused")
        try:
            self.store.truncate(seq, keep)
        except CacheMemoryError:
            assert self.spec.quantized, "only unsealing a cut block may need a free block"
            return
        self.ref.truncate(seq, keep)

    @precondition(lambda self: self.ref.seqs and not self.spec.quantized and self.store.pool is not None)
    @rule(data=st.data(), layer=st.integers(0, 2))
    def keep_tokens(self, data: st.DataObject, layer: int) -> None:
        """Evict all but a random ascending subset per row and KV head (the same count for all)."""
        layer %= self.spec.num_layers
        seqs = self.seqs(data)
        shortest = min(self.ref.seqs[s].layers[layer].length for s in seqs)
        kept = data.draw(st.integers(0, shortest))
        keep = torch.stack([self.subset(data, self.ref.seqs[s].layers[layer].length, kept) for s in seqs])
        try:
            self.store.keep_tokens(seqs, layer, keep)
        except CacheMemoryError:
            return  # copy-on-write of a shared block found no free one: nothing may have changed
        for row, seq in enumerate(seqs):
            self.ref.keep(seq, layer, keep[row])

    def subset(self, data: st.DataObject, length: int, kept: int) -> torch.Tensor:
        """`[kv_heads, kept]` int64: per head, `kept` ascending indices below `length`."""
        indices = st.sets(st.integers(0, max(0, length - 1)), min_size=kept, max_size=kept)
        return torch.tensor([sorted(data.draw(indices)) for _ in range(HEADS)], dtype=torch.long).reshape(HEADS, kept)

    @precondition(lambda self: self.ref.seqs)
    @rule(data=st.data())
    def adopt_blocks(self, data: st.DataObject) -> None:
        """A new sequence starts with another's first blocks (as a prefix cache or a swap-in hands them out):
        whole sealed blocks, then full-precision ones up to a drawn token count (the last one maybe partial)."""
        sources = self.seqs(data, 1)
        if not sources:
            return
        source = sources[0]
        layers = self.ref.seqs[source].layers
        shortest, sealed = min(x.length for x in layers), {x.sealed for x in layers}
        whole = min(sealed) // BLOCK
        count = data.draw(st.integers(0, whole))
        tokens = count * BLOCK
        if sealed == {tokens} and shortest > tokens:  # the full-precision tail starts right after them
            tokens = data.draw(st.integers(tokens, shortest))
        if tokens == 0:
            return
        dense = self.store.dense_blocks(source)
        dense_ids = [dense[x] for x in range(count, -(-tokens // BLOCK))]
        seq = self.store.add_sequence()
        self.store.adopt_blocks(seq, self.store.quantized_block_ids(source)[:count], dense_ids, tokens)
        self.ref.add(seq)
        self.ref.adopt(source, seq, tokens, count * BLOCK)

    @precondition(lambda self: self.ref.seqs)
    @rule(data=st.data())
    def replace_rows(self, data: st.DataObject) -> None:
        """Beam reordering / selection / repetition: new row i continues old row sources[i]."""
        seqs = self.seqs(data)
        if not seqs:
            return
        sources = data.draw(st.lists(st.integers(0, len(seqs) - 1), min_size=0, max_size=4))
        rows = [self.ref.seqs[seqs[source]].copy() for source in sources]
        new_ids = self.store.replace_rows(seqs, sources)
        for seq in seqs:
            del self.ref.seqs[seq]
        self.ref.seqs.update(zip(new_ids, rows, strict=True))

    @precondition(lambda self: self.ref.seqs)
    @rule(data=st.data(), layer=st.integers(0, 2))
    def read_batch(self, data: st.DataObject, layer: int) -> None:
        """Read several sequences at once (rows of equal length): the workspace and gather paths."""
        layer %= self.spec.num_layers
        seq = self.seqs(data, 1)[0]
        length = self.shape(seq)[layer][0]
        peers = [s for s in sorted(self.ref.seqs) if self.shape(s)[layer][0] == length]  # seals may differ
        batch = data.draw(st.lists(st.sampled_from(peers), min_size=1, max_size=3, unique=True))
        if length == 0:
            return
        keys, values = self.store.read(batch, layer)
        for row, peer in enumerate(batch):
            expected = self.ref.read(peer, layer)
            assert_read((keys[row : row + 1], values[row : row + 1]), expected, self.shape(peer)[layer][1])

    @precondition(lambda self: self.ref.seqs and self.ref.track_mass)
    @rule(data=st.data(), layer=st.integers(0, 1))
    def add_attention_mass(self, data: st.DataObject, layer: int) -> None:
        """Accumulate attention on a sequence, forks and adopted blocks included (mass is each sequence's own)."""
        layer %= self.spec.num_layers
        seq = self.seqs(data, 1)[0]
        length = self.ref.seqs[seq].layers[layer].length
        mass = torch.rand(1, HEADS, length, generator=self.gen)
        self.store.add_attention_mass([seq], layer, mass)
        self.ref.add_mass(seq, layer, mass[0])

    @invariant()
    def matches_the_reference(self) -> None:
        self.store.check_invariants()
        assert sorted(self.store.sequence_ids) == sorted(self.ref.seqs)
        for seq, reference in self.ref.seqs.items():
            for index, layer in enumerate(reference.layers):
                assert self.store.num_tokens(seq, index) == layer.length
                assert self.store.num_seen(seq, index) == layer.length + layer.evicted
                assert self.store.num_sealed(seq, index) == layer.sealed
                if layer.length:
                    got = self.store.read([seq], index)
                    assert_read(got, self.ref.read(seq, index), layer.sealed)
                if layer.mass is not None:
                    assert torch.allclose(self.store.attention_mass(seq, index), layer.mass, atol=1e-6)


StoreMachine.TestCase.settings = machine_settings(0.7)
TestStoreMachine = StoreMachine.TestCase
