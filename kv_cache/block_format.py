"""`BlockFormat`: how one block is stored, and what it costs in bytes.

A format fixes the block's shape (`block_size` tokens x `kv_heads` x `head_dim`, for `num_layers` layers) and its
storage dtype. The pool, the memory planner and the stats all read sizes from here, so bytes per token is stated
in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockFormat:
    """Storage format of a block: `[num_layers] x [block_size, kv_heads, head_dim]` keys and values in `dtype`."""

    block_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token's keys and values take in all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * element

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"{dtype} blocks of {self.block_size} tokens x {self.kv_heads} KV heads x {self.head_dim} dims "
            f"x {self.num_layers} layers ({self.bytes_per_token} bytes/token)"
        )
