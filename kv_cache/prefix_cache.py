"""`PrefixCache`: full blocks of earlier requests, found again by a content hash of their tokens and prefix.

Block `i` of a token sequence (tokens `[i * block_size, (i + 1) * block_size)`) is addressed by a chained hash:

    root = BLAKE2b-128(tag, namespace, model fingerprint, block-format fingerprint)   (each field length-prefixed)
    h[0] = BLAKE2b-128(root   || tokens of block 0 as little-endian int64)
    h[i] = BLAKE2b-128(h[i-1] || tokens of block i as little-endian int64)

so a block's key covers every token before it, the model (its config and dtype) and how the block is stored.
No Python `hash()` is involved: keys are equal in every process whatever `PYTHONHASHSEED` says (LMCache#1095),
unpredictable without the namespace (vllm GHSA-rm76-4mrf-v9r8), and not algebraic (Megatron-LM#4158).

A hit is never trusted on the hash alone (A3/A4 in RELIABILITY.md): each cached block keeps its token ids and the
serial number of the cached block it follows, and `lookup` walks the chain from block 0, accepting block `i` only
if its tokens equal the request's and its parent is the block accepted at `i - 1` (serials are never reused). A
forced collision (even a constant hash) therefore costs hits, never correctness.

Only full blocks whose bytes are written are registered (the engine registers after the forward that wrote them:
vllm#43569). The cache holds one reference to each device block it indexes; when that is the only reference the
block is *evictable*, and `evict` lets the policy (`make_policy(config.cache_strategy)`) pick victims. With a CPU
tier a victim is demoted (copied to host memory, its device block freed) and a later hit promotes it back; the
host copies have their own policy and are dropped when the tier needs room. Lookup touches the matched blocks
tail first, so a chain's last blocks are evicted before its first (vLLM frees a request's blocks in that order).

Below the CPU tier a remote tier (Redis, through `kv_cache.tiers.remote.RemoteLink`) continues the chain:
`insert_chain` caches blocks fetched from it as if they had been computed here, and with `collect_new` the cache
remembers the blocks registered since `take_new_blocks` last ran, for writing them down.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig

from kv_cache.block_format import BlockFormat
from kv_cache.block_pool import BlockPool
from kv_cache.config import CacheStrategy
from kv_cache.policies import make_policy
from kv_cache.tiers.codec import format_fingerprint
from kv_cache.tiers.cpu import CpuTier

HASH_TAG = b"kv_cache/prefix-block/v1"
DIGEST_BYTES = 16


def block_hash(parent: bytes, token_bytes: bytes) -> bytes:
    """The key of a block: BLAKE2b-128 over the parent's key and the block's tokens (little-endian int64 bytes)."""
    digest = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
    digest.update(token_bytes)
    return digest.digest()


def root_hash(namespace: str, model_fingerprint: str, block_format: BlockFormat) -> bytes:
    """The parent key of every sequence's block 0, over the tag, `namespace`, `model_fingerprint` (UTF-8) and
    `kv_cache.tiers.codec.format_fingerprint(block_format)`, each length-prefixed (u32 little-endian)."""
    digest = hashlib.blake2b(HASH_TAG, digest_size=DIGEST_BYTES)
    for field in (namespace.encode("utf-8"), model_fingerprint.encode("utf-8"), format_fingerprint(block_format)):
        digest.update(len(field).to_bytes(4, "little") + field)
    return digest.digest()


def model_fingerprint(model_config: PretrainedConfig, dtype: torch.dtype) -> str:
    """A stable digest of the model's config (canonical JSON, private and version keys left out) and dtype."""
    settings = {
        key: value
        for key, value in model_config.to_dict().items()
        if key == "_name_or_path" or (not key.startswith("_") and key != "transformers_version")
    }
    text = json.dumps(settings, sort_keys=True, default=str) + str(dtype)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=DIGEST_BYTES).hexdigest()


def chain_hashes(root: bytes, tokens: Sequence[int], block_size: int, known: list[bytes]) -> None:
    """Extend `known` (keys of the first blocks of `tokens`) with the keys of every further full block."""
    first, full = len(known), len(tokens) // block_size
    if full <= first:
        return
    data = np.asarray(tokens[first * block_size : full * block_size], dtype="<i8").tobytes()
    width = 8 * block_size
    parent = known[-1] if known else root
    for offset in range(0, len(data), width):
        parent = block_hash(parent, data[offset : offset + width])
        known.append(parent)


@dataclass(eq=False)
class CachedBlock:
    """One cached block: its key, its verification data, and where it lives (device pool or CPU tier)."""

    key: bytes
    serial: int
    parent: int | None  # serial of the cached block before it (None for block 0)
    tokens: tuple[int, ...]
    block_id: int | None = None  # in the device pool
    host_id: int | None = None  # in the CPU tier


class PrefixCache:
    """Hash-addressed full blocks of `pool`, with eviction by `strategy` and optional demotion to `tier`.

    Args:
        pool: the device pool whose blocks are cached (the sealed pool of a quantized store).
        strategy: the eviction policy for device blocks (and for host copies).
        root: `root_hash(...)` of this model, format and namespace.
        tier: where evicted blocks are demoted; None drops them.
        collect_new: remember newly registered blocks for `take_new_blocks` (a remote tier writes them down).
    """

    def __init__(
        self,
        pool: BlockPool,
        strategy: CacheStrategy,
        root: bytes,
        tier: CpuTier | None = None,
        collect_new: bool = False,
    ) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.root = root
        self.tier = tier
        self._entries: dict[int, CachedBlock] = {}
        self._index: dict[bytes, int] = {}
        self._next_serial = 0
        self._device_policy = make_policy(strategy)
        self._host_policy = make_policy(strategy)
        self._new: list[int] | None = [] if collect_new else None  # serials registered since take_new_blocks
        self.counters = dict.fromkeys(
            ("lookups", "hit_blocks", "verify_failures", "insert_conflicts", "registered_blocks", "evicted_blocks",
             "demoted_blocks", "promoted_blocks", "dropped_host_blocks", "imported_blocks"),
            0,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------ lookup
    def lookup(
        self, hashes: Sequence[bytes], tokens: Sequence[int], max_blocks: int, reserved: int = 0
    ) -> list[CachedBlock]:
        """The longest verified chain of cached blocks starting `tokens`, at most `max_blocks`, all on the device.

        Blocks found in the CPU tier are promoted (copied back to new device blocks) while the device has room,
        leaving `reserved` free blocks untouched (promised to this step's other requests). The returned blocks
        are touched (most recently used) but not shared: the caller adopts them.
        """
        chain: list[CachedBlock] = []
        size = self.block_size
        for i, key in enumerate(hashes[:max_blocks]):
            serial = self._index.get(key)
            if serial is None:
                break
            entry = self._entries[serial]
            if entry.tokens != tuple(tokens[i * size : (i + 1) * size]) or entry.parent != (
                chain[-1].serial if chain else None
            ):
                self.counters["verify_failures"] += 1
                break
            chain.append(entry)
        chain = self._promote(chain, reserved)
        for entry in reversed(chain):  # the chain's first block ends most recent: tails are evicted first
            self._device_policy.touch(entry.serial)
        self.counters["lookups"] += 1
        self.counters["hit_blocks"] += len(chain)
        return chain

    def _promote(self, chain: list[CachedBlock], reserved: int) -> list[CachedBlock]:
        """Copy the chain's host-resident blocks back to the device; cut the chain where room runs out."""
        on_host = [entry for entry in chain if entry.block_id is None]
        if not on_host or self.tier is None:
            return chain
        promoted = on_host[: self._make_free(len(on_host), reserved, {entry.serial for entry in chain})]
        block_ids = self.pool.allocate(len(promoted))
        host_ids = [entry.host_id for entry in promoted if entry.host_id is not None]
        try:
            self.tier.load(host_ids, self.pool, block_ids)
        except BaseException:  # e.g. OOM: the entries stay on the host, the device blocks go back
            self.pool.release(block_ids)
            raise
        self.tier.free(self.pool.block_format, host_ids)
        for entry, block_id in zip(promoted, block_ids, strict=True):
            entry.block_id, entry.host_id = block_id, None
            self._host_policy.remove(entry.serial)
            self._device_policy.insert(entry.serial)
        self.counters["promoted_blocks"] += len(promoted)
        if len(promoted) < len(on_host):
            return chain[: chain.index(on_host[len(promoted)])]
        return chain

    # ---------------------------------------------------------------------------------------------- register
    def register(
        self, key: bytes, parent: int | None, tokens: tuple[int, ...], block_id: int, from_tier: bool = False
    ) -> int | None:
        """Cache device block `block_id` (full, written) under `key`; returns its serial, or None if refused.

        If a block with this key and the same tokens and parent is cached already, that one's serial comes back
        (the caller computed a duplicate, which stays private to it). A different block under the same key (a
        collision, or a block whose parent was evicted and cached anew) is replaced when nothing uses it, else
        the new block is refused. A block `from_tier` (fetched, not computed) is not collected as new.
        """
        serial = self._index.get(key)
        if serial is not None:
            entry = self._entries[serial]
            if entry.tokens == tokens and entry.parent == parent:
                return serial
            if not self._drop_unused(entry):
                self.counters["insert_conflicts"] += 1
                return None
        serial = self._next_serial
        self._next_serial += 1
        self.pool.share([block_id])
        self._entries[serial] = CachedBlock(key, serial, parent, tokens, block_id=block_id)
        self._index[key] = serial
        self._device_policy.insert(serial)
        self.counters["registered_blocks"] += 1
        if self._new is not None and not from_tier:
            self._new.append(serial)
        return serial

    def contains(self, key: bytes) -> bool:
        """Whether a block is cached under `key` (on the device or the host, verified or not)."""
        return key in self._index

    def take_new_blocks(self) -> list[CachedBlock]:
        """The blocks registered (not inserted from a tier) since the last call that are still on the device, in
        registration order (parents first); empty unless built with `collect_new`."""
        if not self._new:
            return []
        serials, self._new = self._new, []
        entries = (self._entries.get(serial) for serial in serials)
        return [entry for entry in entries if entry is not None and entry.block_id is not None]

    def room(self, reserved: int, protect: set[int] | frozenset[int] = frozenset()) -> int:
        """Device blocks `insert_chain` could get: free beyond `reserved`, plus evictable ones not in `protect`."""
        evictable = sum(
            1
            for entry in self._entries.values()
            if entry.block_id is not None and entry.serial not in protect and self.pool.ref_count(entry.block_id) == 1
        )
        return max(0, self.pool.num_free - reserved + evictable)

    def insert_chain(
        self,
        blocks: Sequence[tuple[bytes, tuple[int, ...], Sequence[torch.Tensor]]],
        parent: CachedBlock | None,
        reserved: int,
        protect: set[int] | frozenset[int] = frozenset(),
    ) -> list[CachedBlock]:
        """Cache blocks fetched from a lower tier as a chain after `parent`; returns the entries made, leading ones.

        blocks: `(key, token ids, tensors)` each, tensors in `BlockPool.export_blocks` order (decoded by
        `kv_cache.tiers.codec.decode_block`). Room is made by evicting cached blocks outside `protect`, leaving
        `reserved` blocks free; the chain is cut where room runs out or `register` refuses a key. The entries are
        touched (most recent, the chain's first last) but not shared: the caller adopts them.
        """
        count = self._make_free(len(blocks), reserved, protect)
        block_ids = self.pool.allocate(count)
        try:
            self.pool.import_blocks(block_ids, [tensors for _, _, tensors in blocks[:count]])
            entries: list[CachedBlock] = []
            previous = None if parent is None else parent.serial
            for (key, tokens, _), block_id in zip(blocks, block_ids, strict=False):
                if self._index.get(key) in protect:  # a colliding key: never replace a block being adopted
                    break
                serial = self.register(key, previous, tokens, block_id, from_tier=True)
                if serial is None:
                    break
                entries.append(self._entries[serial])
                previous = serial
        finally:
            self.pool.release(block_ids)  # the entries hold their blocks now; the rest go back
        self.touch([entry.serial for entry in entries])
        self.counters["imported_blocks"] += len(entries)
        return entries

    def touch(self, serials: Sequence[int]) -> None:
        """Mark cached blocks used now, the last one first (a finished request's chain, tail evicted first)."""
        for serial in reversed(serials):
            if serial in self._device_policy:
                self._device_policy.touch(serial)

    # ---------------------------------------------------------------------------------------------- eviction
    def evict(self, count: int, protect: set[int] | frozenset[int] = frozenset(), demote: bool = True) -> int:
        """Free up to `count` device blocks held only by the cache (demoted to the tier if `demote` and it has
        room, else dropped). Returns the number of device blocks freed. Blocks in `protect` (serials) stay.
        """
        victims = [
            self._entries[serial]
            for serial in self._device_policy.victims(
                count, lambda s: s not in protect and self.pool.ref_count(self._block(s)) == 1
            )
        ]
        block_ids = [self._block(entry.serial) for entry in victims]
        demoted = self._demote(victims, protect) if demote else 0
        for entry in victims[demoted:]:
            self._forget(entry)
        for entry in victims:
            entry.block_id = None
        self.pool.release(block_ids)
        self.counters["evicted_blocks"] += len(victims)
        return len(victims)

    def _demote(self, victims: list[CachedBlock], protect: set[int] | frozenset[int]) -> int:
        """Copy the first victims that fit into the CPU tier; returns how many were demoted."""
        if self.tier is None or not victims:
            return 0
        fmt = self.pool.block_format
        if self.tier.num_free(fmt) < len(victims):
            self.evict_host(len(victims) - self.tier.num_free(fmt), protect)
        moved = victims[: self.tier.num_free(fmt)]
        host_ids = self.tier.store(self.pool, [self._block(entry.serial) for entry in moved])
        for entry, host_id in zip(moved, host_ids, strict=True):
            entry.host_id = host_id
            self._host_policy.insert(entry.serial)
        self.counters["demoted_blocks"] += len(moved)
        return len(moved)

    def evict_host(self, count: int, protect: set[int] | frozenset[int] = frozenset()) -> int:
        """Drop up to `count` host copies (the CPU tier needs room); returns how many host blocks were freed."""
        if self.tier is None:
            return 0
        victims = [self._entries[s] for s in self._host_policy.victims(count, lambda s: s not in protect)]
        self.tier.free(self.pool.block_format, [entry.host_id for entry in victims if entry.host_id is not None])
        for entry in victims:
            self._forget(entry)
        self.counters["dropped_host_blocks"] += len(victims)
        return len(victims)

    def clear(self) -> int:
        """Evict every evictable device block, without demotion (OOM cleanup); returns the blocks freed."""
        return self.evict(len(self._device_policy), demote=False)

    def _make_free(self, count: int, reserved: int, protect: set[int] | frozenset[int]) -> int:
        """Evict cached blocks outside `protect` until `count` device blocks are free beyond `reserved`, or nothing
        more can go; returns how many of the `count` are free."""
        short = count - (self.pool.num_free - reserved)
        if short > 0:
            self.evict(short, protect)
        return max(0, min(count, self.pool.num_free - reserved))

    def _drop_unused(self, entry: CachedBlock) -> bool:
        """Forget `entry` and free its storage if only the cache holds it; False if a sequence uses it."""
        if entry.block_id is not None:
            if self.pool.ref_count(entry.block_id) > 1:
                return False
            self._device_policy.remove(entry.serial)
            self.pool.release([entry.block_id])
        elif entry.host_id is not None and self.tier is not None:
            self._host_policy.remove(entry.serial)
            self.tier.free(self.pool.block_format, [entry.host_id])
        self._forget(entry)
        return True

    def _forget(self, entry: CachedBlock) -> None:
        del self._entries[entry.serial]
        if self._index.get(entry.key) == entry.serial:
            del self._index[entry.key]

    def _block(self, serial: int) -> int:
        block_id = self._entries[serial].block_id
        if block_id is None:
            raise KeyError(f"cached block {serial} is not on the device")
        return block_id

    # -------------------------------------------------------------------------------------------- accounting
    def device_block_ids(self) -> list[int]:
        """Device blocks the cache holds a reference to (one each)."""
        return [e.block_id for e in self._entries.values() if e.block_id is not None]

    def host_block_ids(self) -> list[int]:
        """Host blocks of demoted entries."""
        return [e.host_id for e in self._entries.values() if e.host_id is not None]

    def check_invariants(self) -> list[str]:
        """Problems with the index (empty when consistent): index <-> entries, residency, policy membership."""
        problems = []
        for key, serial in self._index.items():
            if serial not in self._entries or self._entries[serial].key != key:
                problems.append(f"prefix index key {key.hex()} names serial {serial}, which is not cached there")
        for entry in self._entries.values():
            on_device, on_host = entry.block_id is not None, entry.host_id is not None
            if on_device == on_host:
                problems.append(f"cached block {entry.serial}: on device={on_device} and on host={on_host}")
            if on_device != (entry.serial in self._device_policy) or on_host != (entry.serial in self._host_policy):
                problems.append(f"cached block {entry.serial}: policy membership does not match its residency")
        return problems

    def stats(self) -> dict[str, Any]:
        device = self.device_block_ids()
        return {
            **self.counters,
            "cached_blocks": len(device),
            "cached_evictable_blocks": sum(1 for b in device if self.pool.ref_count(b) == 1),
            "cached_host_blocks": len(self._entries) - len(device),
        }
