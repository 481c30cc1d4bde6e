"""Generated programs over the seed API's `PagedKVCache`, checked after every step against `reference.Reference`.

`CacheMachine` drives `forward` (append, rewrite from a `cache_position` given as an int or a tensor, LRU token
eviction), beam reordering, selection and repetition (`BatchCacheOperations`), `reset`, stats and pages, in full
precision, bf16, INT4 and INT2. After every step: the conservation invariant, token and sealed counts, hit and
eviction counters, and every page's tokens; every `forward` returns the reference's keys and values.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kv_cache import BatchCacheOperations, CacheMemoryError, CacheValidationError, PagedKVCache

from . import machine_settings
from .reference import BLOCK, DIM, HEADS, MAX_TOKENS, Reference, Spec, assert_read, quantized, randn, store_config

CACHE_SPECS = [
    Spec("fp32", store_config(num_blocks=64), num_layers=1),
    Spec("bf16 model", store_config(num_blocks=64), model_dtype=torch.bfloat16, num_layers=1),
    Spec("INT4", quantized(4, num_blocks=64), num_layers=1),
    Spec("INT2 no window", quantized(2, residual_tokens=0, num_blocks=64), num_layers=1),
    Spec("LRU window", store_config(num_blocks=64, token_budget=12, sink_tokens=2), num_layers=1),
]


class CacheMachine(RuleBasedStateMachine):
    """Random programs over one `PagedKVCache` (the seed API): forward, beam operations, reset, stats, pages."""

    @initialize(name=st.sampled_from([spec.name for spec in CACHE_SPECS]))
    def build(self, name: str) -> None:
        self.spec = next(spec for spec in CACHE_SPECS if spec.name == name)
        self.cache = PagedKVCache(self.spec.config)
        self.ops = BatchCacheOperations(self.cache)
        self.ref = Reference(self.spec, HEADS, DIM)
        self.gen = torch.Generator().manual_seed(0)
        self.reads = {"cached_tokens_read": 0, "new_tokens_read": 0}
        self.pool_rows = 3
        self.evicted = 0  # tokens evicted, all rows

    @property
    def max_rows(self) -> int:
        """Rows a batch may grow to: 4, or quantized the first batch (the tail pool is sized from it)."""
        return self.pool_rows if self.spec.quantized else 4

    @property
    def held(self) -> int:
        """Tokens each row holds (all rows alike)."""
        return self.ref.seqs[self.cache.seq_ids[0]].num_tokens if self.cache.seq_ids else 0

    @property
    def seen(self) -> int:
        """Tokens each row has seen, evicted ones included (the next position)."""
        layer = self.ref.seqs[self.cache.seq_ids[0]].layers[0] if self.cache.seq_ids else None
        return 0 if layer is None else layer.length + layer.evicted

    @rule(
        data=st.data(), tokens=st.integers(1, 9), batch=st.integers(1, 3), how=st.sampled_from(["end", "int", "tensor"])
    )
    def forward(self, data: st.DataObject, tokens: int, batch: int, how: str) -> None:
        """Append at the end, or rewrite from a position (an int, or a tensor of positions as HF passes it)."""
        rows = len(self.cache.seq_ids) or min(batch, self.max_rows)
        if self.cache.store.pool is None:
            self.pool_rows = rows
        start = self.seen if how == "end" else data.draw(st.integers(0, self.seen))
        position = {"end": None, "int": start, "tensor": torch.arange(start, start + tokens)}[how]
        keys, values = (randn(self.gen, rows, tokens, self.spec.model_dtype) for _ in range(2))
        try:
            got_keys, got_values, info = self.cache.forward(keys, values, position)
        except CacheMemoryError:  # the invariant then checks that nothing changed
            assert start + tokens > MAX_TOKENS, "CacheMemoryError with room left"
            return
        except CacheValidationError:
            assert start < self.seen and self.held < self.seen, "only a rewrite after eviction may be refused"
            return
        cached = self.expect(keys, values, start)
        for row, seq in enumerate(self.cache.seq_ids):
            sealed = self.ref.seqs[seq].layers[0].sealed
            assert_read((got_keys[row : row + 1], got_values[row : row + 1]), self.ref.read(seq, 0), sealed)
        assert info == {
            "cache_position": start,
            "seq_length": start + tokens,
            "cached_tokens": cached,
            "new_tokens": tokens,
            "evicted_tokens": start - cached,
        }
        self.reads["cached_tokens_read"] += cached * rows
        self.reads["new_tokens_read"] += tokens * rows

    def expect(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> int:
        """Update the reference as `forward` must have: rewind to `start` or evict, then append; returns the
        tokens each row held before the append."""
        cached = 0
        for row, seq in enumerate(self.cache.seq_ids):
            if seq not in self.ref.seqs:
                self.ref.add(seq)
            self.ref.truncate(seq, start)
            self.evict(seq, keys.shape[2])
            cached = self.ref.seqs[seq].num_tokens
            self.ref.append(seq, 0, keys[row], values[row])
        return cached

    def evict(self, seq: int, incoming: int) -> None:
        """The LRU window (`kv_cache.token_eviction`): once `incoming` more would put a row a block over budget,
        keep the sinks and the newest tokens, `budget - incoming` in all."""
        config, layer = self.spec.config, self.ref.seqs[seq].layers[0]
        length = layer.length
        if config.token_budget is None or not length or length + incoming <= config.token_budget + BLOCK:
            return
        target = min(length, max(config.sink_tokens, config.token_budget - incoming))
        sinks = min(config.sink_tokens, target)
        keep = [*range(sinks), *range(length - (target - sinks), length)]
        self.ref.keep(seq, 0, torch.tensor([keep] * HEADS))
        self.evicted += length - target

    @precondition(lambda self: self.cache.seq_ids)
    @rule(data=st.data())
    def reorder(self, data: st.DataObject) -> None:
        """Beam reordering and selection: row i continues old row sources[i] (possibly fewer or more rows)."""
        rows = len(self.cache.seq_ids)
        sources = data.draw(st.lists(st.integers(0, rows - 1), min_size=0, max_size=self.max_rows))
        old = list(self.cache.seq_ids)
        self.ops.reorder(torch.tensor(sources, dtype=torch.long))
        self.rebuild(old, sources)

    @precondition(lambda self: 0 < 2 * len(self.cache.seq_ids) <= self.max_rows)
    @rule(repeats=st.integers(1, 2))
    def repeat_interleave(self, repeats: int) -> None:
        old = list(self.cache.seq_ids)
        self.ops.repeat_interleave(repeats)
        self.rebuild(old, [row for row in range(len(old)) for _ in range(repeats)])

    def rebuild(self, old: list[int], sources: list[int]) -> None:
        rows = [self.ref.seqs[old[source]].copy() for source in sources]
        for seq in old:
            del self.ref.seqs[seq]
        self.ref.seqs.update(zip(self.cache.seq_ids, rows, strict=True))

    @rule()
    def reset(self) -> None:
        self.cache.reset()
        self.ref.seqs.clear()

    @invariant()
    def matches_the_reference(self) -> None:
        store = self.cache.store
        store.check_invariants()
        assert sorted(self.cache.seq_ids) == sorted(self.ref.seqs) == sorted(store.sequence_ids)
        stats = self.cache.get_stats()
        assert stats["tokens"] == sum(r.num_tokens for r in self.ref.seqs.values())
        assert {name: stats[name] for name in self.reads} == self.reads
        assert stats.get("evictions_by_policy", {}).get("lru", 0) == self.evicted
        for seq, reference in self.ref.seqs.items():
            assert store.num_tokens(seq, 0) == reference.num_tokens
            assert store.num_seen(seq, 0) == reference.num_tokens + reference.layers[0].evicted
            assert store.num_sealed(seq, 0) == reference.layers[0].sealed
        self.check_pages()

    def check_pages(self) -> None:
        """`get_page` of every full-precision block held: tokens filled (the most any holder wrote), holders,
        and keys equal to the reference's tokens of that block."""
        pool = self.cache.store.pool
        if pool is None:
            return
        page_stats = self.cache.get_page_stats()
        assert (page_stats["pages_used"], page_stats["pages_total"]) == (pool.num_used, pool.num_blocks)
        filled: dict[int, int] = {}
        for seq, reference in self.ref.seqs.items():
            for logical, block in self.cache.store.dense_blocks(seq).items():
                tokens = min(BLOCK, reference.num_tokens - logical * BLOCK)
                filled[block] = max(filled.get(block, 0), tokens)
                page = self.cache.get_page(block)
                assert seq in page["sequences"] and page["ref_count"] == pool.ref_count(block)
                expected = reference.layers[0].keys[:, logical * BLOCK :][:, :tokens].transpose(0, 1)
                assert torch.equal(page["keys"][:tokens].float(), expected)
        assert {block: self.cache.get_page(block)["tokens"] for block in filled} == filled


CacheMachine.TestCase.settings = machine_settings(0.3)
TestCacheMachine = CacheMachine.TestCase
