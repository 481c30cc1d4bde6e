"""`BlockPool`: preallocated storage for blocks of one `BlockFormat`, and the allocator of its block ids.

Storage is one entry per layer (see `block_format` for the tensors: full-precision `[num_blocks, block_size,
kv_heads, head_dim]` keys/values, vLLM's "NHD" layout, or packed codes with fp16 scales). A block id names the same
slab in every layer, so a block is the unit of allocation, sharing and transfer for all layers at once. Token `t`
of a sequence lives in block `block_table[t // block_size]` at offset `t % block_size`.

Allocation is O(1) per block: free ids sit on a stack (the most recently freed block is reused first, so it is
likely still in cache). Every block is either free (reference count 0, on the stack) or referenced (count >= 1,
one per holder); `check_invariants` verifies that conservation law against the holders. Inside `atomic()` every
reference change is journaled, so a store operation that fails halfway can put the allocator back exactly as it
was (same counts, same free stack order); outside it nothing is recorded.

A host pool built with `pin_memory=True` is allocated in page-locked memory when CUDA is present (so copies to and
from the GPU can be asynchronous), and in plain memory otherwise (`pinned` says which).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from kv_cache.block_format import BlockFormat, DenseBlocks, LayerBlocks, LayerStack, QuantizedBlocks
from kv_cache.errors import CacheError, CacheMemoryError, CacheValidationError


class BlockPool:
    """Preallocated storage for `num_blocks` blocks of format `block_format`, and their allocator.

    Args:
        block_format: shape and dtype of a block (all layers).
        num_blocks: blocks in the pool (all allocated now, never grown).
        device: where the storage lives.
        capacity_hint: the config field a user should raise when the pool runs out, for error messages.
        pin_memory: page-lock the storage when CUDA is present (host pools only: `device` must be the CPU).
        stacked: keep the layers in `LayerStack`s (`stacks`): the pools that seal, so that a seal gathers and
            stores every layer at once (not with pin_memory; not in training mode, see `BlockFormat.allocate`).
    """

    def __init__(
        self,
        block_format: BlockFormat,
        num_blocks: int,
        device: torch.device,
        capacity_hint: str = "num_blocks",
        pin_memory: bool = False,
        stacked: bool = False,
    ) -> None:
        fmt = block_format
        if pin_memory and device.type != "cpu":
            raise CacheValidationError(f"pin_memory=True is for host pools; this pool is on {device}")
        if pin_memory and stacked:
            raise CacheValidationError("a pool is either pinned (a host tier) or stacked (it seals), not both")
        self.block_format = fmt
        self.num_blocks = num_blocks
        self.block_size = fmt.block_size
        self.capacity_hint = capacity_hint
        self.pinned = pin_memory and torch.cuda.is_available()
        try:
            # Zero-filled, not `empty`: the memory is committed now (no page faults on the first appends).
            self.stacks: list[LayerStack] = []
            if self.pinned:
                self.layers: list[LayerBlocks] = _pinned_zeros(fmt.allocate(num_blocks, torch.device("meta"))[0])
            else:
                self.layers, self.stacks = fmt.allocate(num_blocks, device, stacked)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            # A CPU allocator that cannot serve the request raises a plain RuntimeError; anything else is a bug.
            if not isinstance(exc, torch.OutOfMemoryError) and "alloc" not in str(exc).lower():
                raise
            raise CacheMemoryError(
                f"could not allocate {num_blocks} blocks ({num_blocks * fmt.bytes_per_block / 2**20:.1f} MiB) "
                f"on {device}; lower {capacity_hint}"
            ) from exc
        self.device = device
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_counts: list[int] = [0] * num_blocks
        self._journal: list[tuple[int, int]] | None = None  # (block id, +1 or -1) per reference change, in `atomic`

    def dense(self, layer: int) -> DenseBlocks:
        """The full-precision storage of `layer` (this pool's format must be full precision)."""
        blocks = self.layers[layer]
        if not isinstance(blocks, DenseBlocks):
            raise CacheError(f"layer {layer} of this pool is quantized, not full precision")
        return blocks

    def quantized(self, layer: int) -> QuantizedBlocks:
        """The quantized storage of `layer` (this pool's format must be quantized)."""
        blocks = self.layers[layer]
        if not isinstance(blocks, QuantizedBlocks):
            raise CacheError(f"layer {layer} of this pool is full precision, not quantized")
        return blocks

    @property
    def memory_bytes(self) -> int:
        """Bytes of K/V storage the pool holds (used or not)."""
        return self.num_blocks * self.block_format.bytes_per_block

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        """Take `count` free blocks (reference count 1 each). Raises `CacheMemoryError` if too few are free."""
        if count > len(self._free):
            raise CacheMemoryError(
                f"requested {count} blocks but only {len(self._free)} of {self.num_blocks} are free "
                f"({self.block_size} tokens each); raise {self.capacity_hint}, or free or shorten sequences"
            )
        if count == 0:
            return []
        ids = self._free[-count:][::-1]  # ascending ids: a fresh sequence gets one contiguous run
        del self._free[-count:]
        for block_id in ids:
            self._ref_counts[block_id] = 1
        if self._journal is not None:
            self._journal += [(block_id, 1) for block_id in ids]
        return ids

    def check_held(self, block_ids: Iterable[int]) -> None:
        """Raise `CacheValidationError` unless every id names a block of this pool that something holds."""
        for block_id in block_ids:
            if isinstance(block_id, bool) or not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
                raise CacheValidationError(f"block id {block_id!r} is not a block of this pool [0, {self.num_blocks})")
            if self._ref_counts[block_id] == 0:
                raise CacheValidationError(f"block {block_id} is free; only referenced blocks can be shared")

    def share(self, block_ids: Sequence[int]) -> None:
        """Add one reference to each block (a new holder shares it, e.g. a forked sequence); all or none."""
        self.check_held(block_ids)
        for block_id in block_ids:
            self._ref_counts[block_id] += 1
        if self._journal is not None:
            self._journal += [(block_id, 1) for block_id in block_ids]

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; a block whose count reaches 0 returns to the free stack."""
        counts = self._ref_counts
        for block_id in block_ids:
            if counts[block_id] == 0:
                raise CacheError(f"block {block_id} released twice (double free)")
            counts[block_id] -= 1
            if counts[block_id] == 0:
                self._free.append(block_id)
            if self._journal is not None:
                self._journal.append((block_id, -1))

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Undo every `allocate`, `share` and `release` made inside the `with` block if it raises.

        Undoing replays the journal backwards: a block allocated goes back on top of the free stack, a block a
        release freed comes off it, so the stack's order is restored too. Block data is not restored: write into
        blocks only once nothing can fail any more. Nests (an inner block that succeeds joins the outer one).
        """
        journal: list[tuple[int, int]] = []
        outer, self._journal = self._journal, journal
        try:
            yield
        except BaseException:
            self._undo(journal)
            raise
        finally:
            self._journal = outer
        if outer is not None:
            outer += journal

    def _undo(self, journal: list[tuple[int, int]]) -> None:
        counts = self._ref_counts
        for block_id, change in reversed(journal):
            if change < 0 and counts[block_id] == 0:  # that release freed it: it is the top of the stack
                self._free.pop()
            counts[block_id] -= change
            if change > 0 and counts[block_id] == 0:  # allocated from the stack: back on top
                self._free.append(block_id)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src` into block `dst` in every layer (copy-on-write of a shared block); allocates nothing."""
        if self.stacks:
            for stack in self.stacks:
                for tensor in stack.tensors:
                    tensor[:, dst].copy_(tensor[:, src])
            return
        for layer in self.layers:
            for tensor in layer.tensors():
                tensor[dst].copy_(tensor[src])

    def copy_blocks(self, pairs: Iterable[tuple[int, int]]) -> None:
        """`copy_block(src, dst)` for each `(src, dst)`, in order."""
        for src, dst in pairs:
            self.copy_block(src, dst)

    def detach_(self) -> None:
        """Drop the autograd history the storage gathered from appended tensors (training mode, between steps;
        never stacked)."""
        self.layers = [
            DenseBlocks(layer.keys.detach(), layer.values.detach()) if isinstance(layer, DenseBlocks) else layer
            for layer in self.layers
        ]

    def storage(self) -> list[torch.Tensor]:
        """Every storage tensor, `[num_blocks, ...]`: each layer's `tensors()`, layer by layer."""
        return [tensor for layer in self.layers for tensor in layer.tensors()]

    def export_blocks(self, block_ids: Sequence[int]) -> list[list[torch.Tensor]]:
        """Host copies of blocks: `[block][tensor]`, each tensor a block's slice of `storage()` (per-block shape,
        storage dtype), what `kv_cache.tiers.codec.encode_block` takes. One gather and one copy per tensor."""
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        gathered = [tensor.index_select(0, index).cpu() for tensor in self.storage()]
        return [[tensor[row] for tensor in gathered] for row in range(len(block_ids))]

    def import_blocks(self, block_ids: Sequence[int], blocks: Sequence[Sequence[torch.Tensor]]) -> None:
        """Overwrite blocks with `blocks[i]` (`export_blocks`' per-block order; any device, copied here): one
        stacked copy and one `index_copy_` per storage tensor."""
        if len(block_ids) != len(blocks):
            raise CacheValidationError(f"import_blocks got {len(blocks)} blocks for {len(block_ids)} block ids")
        targets = self.storage()
        if any(len(tensors) != len(targets) for tensors in blocks):
            raise CacheValidationError(f"import_blocks needs {len(targets)} tensors per block (this format's)")
        if not blocks:
            return
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        for position, target in enumerate(targets):
            stacked = torch.stack([tensors[position] for tensors in blocks]).to(self.device, non_blocking=True)
            target.index_copy_(0, index, stacked)

    def check_invariants(self, holders: Iterable[Sequence[int]]) -> None:
        """Raise `CacheError` unless free + referenced == capacity and each count equals its holders.

        Args:
            holders: the block-id lists of everything holding references (block tables).
        """
        expected = Counter(block_id for held in holders for block_id in held)
        free = set(self._free)
        problems = []
        if len(free) != len(self._free):
            problems.append("a block is on the free stack twice")
        for block_id, count in enumerate(self._ref_counts):
            if count != expected.get(block_id, 0):
                problems.append(f"block {block_id}: ref count {count}, held {expected.get(block_id, 0)} times")
            if (count == 0) != (block_id in free):
                problems.append(f"block {block_id}: ref count {count} but free={block_id in free}")
        if problems:
            raise CacheError("block pool invariant violated: " + "; ".join(problems[:10]))


def _pinned_zeros(layers: list[LayerBlocks]) -> list[LayerBlocks]:
    """Zero-filled page-locked host storage shaped like `layers` (which may be on the meta device)."""

    def zeros(like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(like.shape, dtype=like.dtype, pin_memory=True)

    return [
        DenseBlocks(zeros(layer.keys), zeros(layer.values))
        if isinstance(layer, DenseBlocks)
        else QuantizedBlocks(layer.bits, layer.group_size, *(zeros(tensor) for tensor in layer.tensors()))
        for layer in layers
    ]
