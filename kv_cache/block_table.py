"""`BlockTable`: which pool blocks hold a sequence's tokens, in order, and how far each layer has written.

    token t  ->  block_ids[t // block_size], offset t % block_size

Layers write one after another within a model step (layer 0 first), so each layer keeps its own length; the
sequence's length is the longest of them. Blocks are shared by all layers (see `block_pool`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


@dataclass
class BlockTable:
    """A sequence's block ids (oldest first) and the number of tokens written per layer."""

    layer_lengths: list[int]
    block_ids: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, num_layers: int) -> BlockTable:
        return cls(layer_lengths=[0] * num_layers)

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence (the furthest any layer has written)."""
        return max(self.layer_lengths)

    def copy(self) -> BlockTable:
        return BlockTable(layer_lengths=list(self.layer_lengths), block_ids=list(self.block_ids))
