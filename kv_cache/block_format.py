"""`BlockFormat`: how a block is stored, what it costs in bytes, and the storage tensors it allocates.

A block holds `block_size` tokens of `kv_heads x head_dim` keys and values in each of `num_layers` layers, either
in full precision (`dtype`) or, per layer, as packed integer codes (`layer_bits`) with fp16 scales and zero points
laid out as `kv_cache.quantizer` describes:

    full precision  keys, values            [num_blocks, block_size, kv_heads, head_dim]  dtype
    quantized       key_codes, value_codes  [num_blocks, block_size, kv_heads, packed_dim]  uint8
                    key_scale, key_zero     [num_blocks, kv_heads, head_dim]  fp16  (per channel over the block)
                    value_scale, value_zero [num_blocks, block_size, kv_heads, head_dim // group]  fp16

The pool, the memory planner and the stats all read sizes from here, so bytes per token are stated in one place.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kv_cache.quantizer import (
    dequantize_keys,
    dequantize_values,
    packed_dim,
    quantize_keys,
    quantize_values,
    value_group_size,
)

_SCALE_BYTES = 2  # scales and zero points are stored in fp16


@dataclass
class DenseBlocks:
    """One layer's full-precision blocks; `key_slots`/`value_slots` view them one token per row."""

    keys: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        num_blocks, block_size, kv_heads, head_dim = self.keys.shape
        self.key_slots = self.keys.view(num_blocks * block_size, kv_heads, head_dim)
        self.value_slots = self.values.view(num_blocks * block_size, kv_heads, head_dim)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write tokens into slots (`block_id * block_size + offset`).

        slots: `[n]` int64; keys, values: `[n, kv_heads, head_dim]` (cast to the storage dtype).
        """
        self.key_slots.index_copy_(0, slots, keys.to(self.keys.dtype))
        self.value_slots.index_copy_(0, slots, values.to(self.values.dtype))

    def read(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks `[n, block_size, kv_heads, head_dim]` (storage dtype) for `block_ids` `[n]` int64."""
        return self.keys.index_select(0, block_ids), self.values.index_select(0, block_ids)


@dataclass
class QuantizedBlocks:
    """One layer's quantized blocks at `bits` bits, values grouped over `group_size` channels (shapes above)."""

    bits: int
    group_size: int
    key_codes: torch.Tensor
    key_scale: torch.Tensor
    key_zero: torch.Tensor
    value_codes: torch.Tensor
    value_scale: torch.Tensor
    value_zero: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale, self.value_zero

    @property
    def head_dim(self) -> int:
        return int(self.key_scale.shape[-1])

    def encode(self, keys: torch.Tensor, values: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, ...]:
        """Quantize whole blocks (KIVI: keys per channel over the block, values per token over channel groups).

        keys, values: `[n, block_size, kv_heads, head_dim]` float. Returns the six tensors, in the order of
        `tensors()` (the sealer stores them). Raises `CacheValidationError` on NaN/Inf (`check=False`: the caller
        checks the scales and zeros, entries 1, 2, 4 and 5, with `quantizer.stats_finite`).
        """
        return (*quantize_keys(keys, self.bits, check), *quantize_values(values, self.bits, self.group_size, check))

    def read(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized blocks `[n, block_size, kv_heads, head_dim]` fp32 for `block_ids` `[n]` int64."""
        return self.decode(tuple(tensor.index_select(0, block_ids) for tensor in self.tensors()))

    def decode(self, encoded: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize `encode` output (or stored blocks) to fp32 keys and values."""
        key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = encoded
        keys = dequantize_keys(key_codes, key_scale, key_zero, self.head_dim)
        values = dequantize_values(value_codes, value_scale, value_zero, self.head_dim)
        return keys, values


LayerBlocks = DenseBlocks | QuantizedBlocks


@dataclass(frozen=True)
class LayerStack:
    """The storage of several layers of one kind (full precision, or quantized at one bit width) as one tensor per
    role, `[len(layers), num_blocks, ...]` in the order of the layers' `tensors()`; each layer's storage is a view
    of its row. Sealing gathers and stores the blocks of every layer with one operation per tensor."""

    layers: tuple[int, ...]
    tensors: tuple[torch.Tensor, ...]

    def flat(self, role: int) -> torch.Tensor:
        """Tensor `role` with the layer and block axes merged: row `r * num_blocks + block_id` is block
        `block_id` of `layers[r]`."""
        return self.tensors[role].flatten(0, 1)


@dataclass(frozen=True)
class BlockFormat:
    """Storage format of a block: `num_layers x [block_size, kv_heads, head_dim]` keys and values.

    Attributes:
        dtype: the full-precision dtype (of dense blocks, and of what quantized blocks dequantize to).
        layer_bits: bits per layer (8, 4 or 2) for quantized blocks; None for full-precision blocks.
        group_size: channels sharing one value scale (quantized blocks; `head_dim` if larger).
    """

    block_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    layer_bits: tuple[int, ...] | None = None
    group_size: int = 64

    def layer_bytes_per_block(self, layer: int) -> int:
        """Bytes of one block in `layer`: keys and values, codes plus fp16 scales and zeros."""
        elements = self.block_size * self.kv_heads * self.head_dim
        if self.layer_bits is None:
            return 2 * elements * torch.empty((), dtype=self.dtype).element_size()
        codes = 2 * self.block_size * self.kv_heads * packed_dim(self.head_dim, self.layer_bits[layer])
        key_stats = 2 * _SCALE_BYTES * self.kv_heads * self.head_dim
        value_groups = self.head_dim // value_group_size(self.head_dim, self.group_size)
        value_stats = 2 * _SCALE_BYTES * self.block_size * self.kv_heads * value_groups
        return codes + key_stats + value_stats

    @functools.cached_property
    def bytes_per_block(self) -> int:
        """Bytes of one block in all layers (computed once: the stats read it every step)."""
        return sum(self.layer_bytes_per_block(layer) for layer in range(self.num_layers))

    @property
    def bytes_per_token(self) -> float:
        """Bytes one token's keys and values take in all layers, scales and zero points included."""
        return self.bytes_per_block / self.block_size

    def describe(self) -> str:
        kind = str(self.dtype).removeprefix("torch.")
        if self.layer_bits is not None:
            kind = "INT" + "/".join(str(b) for b in sorted(set(self.layer_bits), reverse=True))
        return (
            f"{kind} blocks of {self.block_size} tokens x {self.kv_heads} KV heads x {self.head_dim} dims "
            f"x {self.num_layers} layers ({self.bytes_per_token:g} bytes/token)"
        )

    def allocate(
        self, num_blocks: int, device: torch.device, stacked: bool = False
    ) -> tuple[list[LayerBlocks], list[LayerStack]]:
        """Zero-filled storage for `num_blocks` blocks: one entry per layer, and with `stacked` the `LayerStack`s
        the layers are views of (one per kind; else none, and each layer owns its tensors: what autograd needs
        in training mode, where an in-place write to one layer must not touch the others' version counters)."""
        kinds: dict[int | None, list[int]] = {}  # bits (None: full precision) -> its layers
        for layer in range(self.num_layers):
            kinds.setdefault(None if self.layer_bits is None else self.layer_bits[layer], []).append(layer)
        layers: list[LayerBlocks | None] = [None] * self.num_layers
        stacks = []
        for bits, members in kinds.items():
            for rows in [members] if stacked else [[layer] for layer in members]:
                tensors = tuple(
                    torch.zeros((len(rows), num_blocks, *shape), dtype=dtype, device=device)
                    for shape, dtype in self._roles(bits)
                )
                for row, layer in enumerate(rows):
                    views = [tensor[row] for tensor in tensors]
                    layers[layer] = (
                        DenseBlocks(*views) if bits is None else QuantizedBlocks(bits, self.group_size, *views)
                    )
                if stacked:
                    stacks.append(LayerStack(tuple(rows), tensors))
        return [blocks for blocks in layers if blocks is not None], stacks

    def _roles(self, bits: int | None) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Per-block shape and dtype of each storage tensor of a layer (`tensors()` order)."""
        tokens = (self.block_size, self.kv_heads, self.head_dim)
        if bits is None:
            return [(tokens, self.dtype)] * 2
        codes = ((self.block_size, self.kv_heads, packed_dim(self.head_dim, bits)), torch.uint8)
        key_stats = ((self.kv_heads, self.head_dim), torch.float16)
        groups = self.head_dim // value_group_size(self.head_dim, self.group_size)
        value_stats = ((self.block_size, self.kv_heads, groups), torch.float16)
        return [codes, key_stats, key_stats, codes, value_stats, value_stats]
