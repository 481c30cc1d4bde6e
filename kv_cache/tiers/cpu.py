"""`CpuTier`: host-memory copies of device blocks, for swap-preemption and for demoted prefix-cache blocks.

One host `BlockPool` per block format of the device store (the full-precision format, and the sealed format of a
quantized store), so a block moves between devices byte for byte in its stored format (packed codes and fp16
scales included) and comes back bit-exact. Host block ids are allocated and reference counted by the host pools;
whoever stores a block (the memory manager for a swapped sequence, the prefix cache for a demoted block) owns
its host ids and frees them.

Copies, per tensor of each layer (keys/values, or codes/scales/zeros), `[n, block_size, ...]` at a time:

    device -> host   gather the device blocks into one temporary (`index_select`), then copy each run of
                     consecutive host ids in one `copy_(non_blocking=True)` into the (pinned) host pool
    host -> device   copy each run of host ids into a device temporary, then `index_copy_` into the pool

On CUDA the host pools are pinned and the copies run on a side stream that first waits for the compute stream
(the blocks' bytes are written, and any kernel still reading a block about to be overwritten has run); the
compute stream then waits for the side stream, so nothing reuses a block before its copy finished (the race of
sglang#35049) and the host thread never blocks. Without CUDA the host pools are plain memory and the copies are
synchronous (`stats()["pinned"]` is False and says why); `pin_memory=False` asks for that on CUDA too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kv_cache.block_format import BlockFormat
from kv_cache.block_pool import BlockPool
from kv_cache.errors import CacheMemoryError, CacheValidationError


def _runs(ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split ids into runs of consecutive values: `(first id, length, offset in ids)` each."""
    runs: list[tuple[int, int, int]] = []
    for offset, block_id in enumerate(ids):
        if runs and runs[-1][0] + runs[-1][1] == block_id:
            first, length, start = runs[-1]
            runs[-1] = (first, length + 1, start)
        else:
            runs.append((block_id, 1, offset))
    return runs


class CpuTier:
    """Host pools mirroring the device store's block formats, and the copies between them.

    Args:
        formats: the block formats to hold (one host pool each), e.g. `[store.pool.block_format]`.
        num_blocks: host blocks per format, same order.
        device: the device the device pools live on (decides pinning and the side stream).
        pin_memory: page-lock the host pools (and copy on a side stream); only possible with a CUDA device, and
            `stats()` says why when the pools are not pinned.
    """

    def __init__(
        self,
        formats: Sequence[BlockFormat],
        num_blocks: Sequence[int],
        device: torch.device,
        pin_memory: bool = True,
    ) -> None:
        if len(formats) != len(num_blocks) or not formats:
            raise CacheValidationError(f"CpuTier needs one block count per format; got {len(num_blocks)} counts")
        if not isinstance(pin_memory, bool):
            raise CacheValidationError(f"pin_memory={pin_memory!r} must be True or False")
        self.device = device
        self.pin_memory = pin_memory
        self.pinned = pin_memory and device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.pinned else None
        self._pools = {
            fmt: BlockPool(fmt, count, torch.device("cpu"), "cpu_tier_blocks (or cpu_tier_mb)", pin_memory=self.pinned)
            for fmt, count in zip(formats, num_blocks, strict=True)
        }
        self.counters = {"blocks_to_cpu": 0, "blocks_to_device": 0, "bytes_to_cpu": 0, "bytes_to_device": 0}

    def host_pool(self, fmt: BlockFormat) -> BlockPool:
        try:
            return self._pools[fmt]
        except KeyError:
            raise CacheValidationError(f"the CPU tier holds no pool for {fmt.describe()}") from None

    def num_free(self, fmt: BlockFormat) -> int:
        """Host blocks of format `fmt` not holding anything."""
        return self.host_pool(fmt).num_free

    def store(self, pool: BlockPool, block_ids: Sequence[int]) -> list[int]:
        """Copy device blocks `block_ids` of `pool` into newly allocated host blocks; returns their host ids.

        Raises `CacheMemoryError` (before copying anything) if the host pool has too few free blocks.
        """
        host = self.host_pool(pool.block_format)
        host_ids = sorted(host.allocate(len(block_ids)))  # ascending: one copy per run of consecutive ids
        try:
            with self._side_stream():
                index = torch.tensor(list(block_ids), dtype=torch.long, device=pool.device)
                for source, target in zip(pool.storage(), host.storage(), strict=True):
                    gathered = source.index_select(0, index)
                    for first, length, offset in _runs(host_ids):
                        target[first : first + length].copy_(gathered[offset : offset + length], non_blocking=True)
        except BaseException:  # e.g. OOM for the gather: the caller keeps nothing, so nothing may stay taken
            host.release(host_ids)
            raise
        self._count("to_cpu", pool, len(block_ids))
        return host_ids

    def load(self, host_ids: Sequence[int], pool: BlockPool, block_ids: Sequence[int]) -> None:
        """Copy host blocks `host_ids` into device blocks `block_ids` of `pool` (already allocated; on an error
        the caller still owns them and releases them)."""
        if len(host_ids) != len(block_ids):
            raise CacheValidationError(f"load got {len(host_ids)} host blocks for {len(block_ids)} device blocks")
        if not host_ids:
            return
        host = self.host_pool(pool.block_format)
        # In host-id order, so each run of consecutive host ids is one copy (a chain demoted tail first comes
        # back in descending host ids: unsorted, every block was its own copy, ~12x slower on an H100).
        pairs = sorted(zip(host_ids, block_ids, strict=True))
        with self._side_stream():
            index = torch.tensor([block for _, block in pairs], dtype=torch.long, device=pool.device)
            for source, target in zip(host.storage(), pool.storage(), strict=True):
                staged = torch.empty((len(pairs), *source.shape[1:]), dtype=source.dtype, device=pool.device)
                for first, length, offset in _runs([host_id for host_id, _ in pairs]):
                    staged[offset : offset + length].copy_(source[first : first + length], non_blocking=True)
                target.index_copy_(0, index, staged)
        self._count("to_device", pool, len(block_ids))

    def free(self, fmt: BlockFormat, host_ids: Sequence[int]) -> None:
        """Release host blocks (the holder no longer needs its copy)."""
        self.host_pool(fmt).release(host_ids)

    def check_invariants(self, holders: dict[BlockFormat, list[list[int]]]) -> None:
        """Raise `CacheError` unless each host pool's reference counts equal its holders' (format -> id lists)."""
        for fmt, pool in self._pools.items():
            pool.check_invariants(holders.get(fmt, []))

    def stats(self) -> dict[str, Any]:
        """Blocks and MiB per host pool, whether pinned (and why not), and the copy counters."""
        pools = list(self._pools.values())
        out: dict[str, Any] = {
            "pinned": self.pinned,
            "blocks_total": sum(p.num_blocks for p in pools),
            "blocks_used": sum(p.num_used for p in pools),
            "memory_mb": sum(p.memory_bytes for p in pools) / 2**20,
            **self.counters,
        }
        if not self.pin_memory:
            out["pinned_reason"] = "pin_memory=False: plain host memory, synchronous copies"
        elif not self.pinned:
            out["pinned_reason"] = "no CUDA device: plain host memory, synchronous copies"
        return out

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        """Run the enclosed copies on the side stream, ordered after and before the compute stream (CUDA)."""
        if self._stream is None:
            yield
            return
        compute = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            yield
        compute.wait_stream(self._stream)

    def _count(self, direction: str, pool: BlockPool, blocks: int) -> None:
        self.counters[f"blocks_{direction}"] += blocks
        self.counters[f"bytes_{direction}"] += blocks * pool.block_format.bytes_per_block


def host_blocks_per_format(pools: Sequence[BlockPool], num_blocks: int | None, memory_mb: float | None) -> list[int]:
    """Host blocks for each device pool: `num_blocks` each, or `memory_mb` MiB split by the pools' sizes."""
    if num_blocks is not None:
        return [num_blocks] * len(pools)
    if memory_mb is None:
        raise CacheValidationError("a CPU tier needs cpu_tier_blocks or cpu_tier_mb")
    total = sum(p.memory_bytes for p in pools)
    counts = [int(memory_mb * 2**20 * p.memory_bytes / total // p.block_format.bytes_per_block) for p in pools]
    if min(counts) < 1:
        raise CacheMemoryError(
            f"cpu_tier_mb={memory_mb} holds no block of every format (largest block "
            f"{max(p.block_format.bytes_per_block for p in pools) / 2**20:.3f} MiB); raise cpu_tier_mb"
        )
    return counts
