"""`BlockTable`: which pool blocks hold a sequence's tokens, in order, and how far each layer has written.

Logical block `i` covers tokens `[i * block_size, (i + 1) * block_size)`. Without quantization every logical block
is a full-precision block, `dense_blocks[i]`. With quantization a sequence is split at a block boundary:

    logical block:   0   1   2   3 | 4   5   6
    stored in:       quantized_ids | dense_blocks {4: id, 5: id, 6: id}  (full precision)
                     (the oldest)  | (the newest `residual_tokens` or more, still exact)

Layers write one after another within a model step (layer 0 first), so each layer keeps its own length and its
own sealed (quantized) length; blocks are shared by all layers (see `block_pool`), so a full-precision block is
released only once every layer has sealed it. `dense_blocks` maps logical index to block id because, within a
step, a long chunk sealed at once by layer 0 never passes through full precision while the later layers still
read their older tail: the logical indices held in full precision need not be contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


@dataclass
class BlockTable:
    """A sequence's blocks and per-layer counts: tokens held, tokens sealed into quantized blocks, and tokens
    evicted (held + evicted = tokens seen, the next token's position)."""

    layer_lengths: list[int]
    layer_sealed: list[int]
    layer_evicted: list[int]
    dense_blocks: dict[int, int] = field(default_factory=dict)
    quantized_ids: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, num_layers: int) -> BlockTable:
        return cls(layer_lengths=[0] * num_layers, layer_sealed=[0] * num_layers, layer_evicted=[0] * num_layers)

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence (the furthest any layer has written)."""
        return max(self.layer_lengths)

    @property
    def block_ids(self) -> list[int]:
        """The full-precision block ids, oldest first."""
        return list(self.dense_blocks.values())

    def copy(self) -> BlockTable:
        return BlockTable(
            layer_lengths=list(self.layer_lengths),
            layer_sealed=list(self.layer_sealed),
            layer_evicted=list(self.layer_evicted),
            dense_blocks=dict(self.dense_blocks),
            quantized_ids=list(self.quantized_ids),
        )

    def restore(self, saved: BlockTable) -> None:
        """Make this table equal to `saved` (a `copy()` taken before an operation that failed halfway)."""
        self.layer_lengths, self.layer_sealed, self.layer_evicted = (
            saved.layer_lengths,
            saved.layer_sealed,
            saved.layer_evicted,
        )
        self.dense_blocks, self.quantized_ids = saved.dense_blocks, saved.quantized_ids


@dataclass
class WritePlan:
    """Where `append` puts one sequence's new tokens in one layer, and what it must allocate first.

    Tokens `[start, end)` arrive; afterwards the layer holds `[0, seal_to)` in quantized blocks (sealing tokens
    `[sealed, seal_to)`) and `[dense_from, end)` in full-precision blocks.
    """

    start: int
    end: int
    sealed: int
    seal_to: int
    dense_from: int
    new_dense: list[int]  # logical blocks that need a full-precision block
    overwritten: list[int]  # logical full-precision blocks that exist already and receive tokens
    new_sealed: int  # quantized blocks to allocate


def plan_append(table: BlockTable, layer: int, count: int, block_size: int, seal_to: int) -> WritePlan:
    """Plan appending `count` tokens to `layer` of `table`, sealing up to `seal_to` tokens."""
    start = table.layer_lengths[layer]
    end = start + count
    dense_from = max(start, seal_to)
    written = range(dense_from // block_size, blocks_needed(end, block_size)) if dense_from < end else range(0)
    return WritePlan(
        start=start,
        end=end,
        sealed=table.layer_sealed[layer],
        seal_to=seal_to,
        dense_from=dense_from,
        new_dense=[logical for logical in written if logical not in table.dense_blocks],
        overwritten=[logical for logical in written if logical in table.dense_blocks],
        new_sealed=max(0, seal_to // block_size - len(table.quantized_ids)),
    )


@dataclass
class SealBatch:
    """Tables of one layer whose plans seal blocks now; `rows[i]` is table i's row in the append's batch (its new
    tokens' row), or None when only stored tokens are sealed."""

    layer: int
    tables: list[BlockTable]
    plans: list[WritePlan]
    rows: list[int] | None = None
