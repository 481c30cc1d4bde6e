"""`RemoteLink`: the prefix cache's remote level (the Redis tier), and `FetchCost`, which keeps it worth asking.

A new request's prompt blocks are looked up, in order, in

    device pool  ->  CPU tier  ->  remote tier  ->  recompute
    (`PrefixCache.lookup`, promoting host copies)   (`RemoteLink.fetch`: `get_chain`, `decode_block`, `insert_chain`)

so the remote tier is asked only for the blocks after the local chain ends. Its hits are decoded (header, format
fingerprint, token digest and checksum checked: a bad value is a counted miss, never loaded), copied into pool
blocks and cached like computed ones; the request then adopts them. Blocks computed here are written down after
each engine step (`write_down`: one gather and copy per pool tensor, `encode_block`, one `put_many`, whose
pipelines run on the tier's own thread), never blocking a request on the network.

Never slower than cold: `FetchCost` estimates the fetch (a round trip plus seconds per block, measured end to end:
lookup, decode and copy into the pool) against recomputing the same tokens (seconds per prompt token, measured on
the engine's prefill forwards, seeded by a calibration at start), and the fetch is skipped unless it is the faster
(each decision counted). A fetch that runs slow is cut at the recompute estimate: no further lookup starts after
it. What remains is one round trip for a miss (short, bounded by the tier's socket timeout and breaker).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from kv_cache.prefix_cache import CachedBlock, PrefixCache
from kv_cache.tiers.base import StatValue, Tier
from kv_cache.tiers.codec import HEADER, decode_block, encode_block

SMOOTHING = 0.25  # weight of the newest measurement in each moving average
PRIOR_ROUND_TRIP_S = 1e-3  # before the first fetch: a slow loopback round trip (measured ~0.1-0.4 ms)
PRIOR_BYTES_PER_S = 250e6  # and a pessimistic throughput (pipelines of large values: 0.1-0.3 GB/s here)


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


class FetchCost:
    """Estimates, in seconds, of recomputing prompt blocks and of fetching them from the remote tier.

    Recompute: a prefill forward of n tokens takes `overhead_s + n * token_s`; `calibrate` fits both from two
    forward sizes, `record_prefill` then keeps `token_s` current (marginal cost, overhead taken off). Without a
    measurement there is no estimate and nothing is fetched. Fetch: `round_trip_s + blocks * block_s`, from
    lookups that found nothing and from those that did; priors from `value_bytes` until then.

    Args:
        block_size: tokens per block; value_bytes: bytes of one encoded block.
    """

    def __init__(self, block_size: int, value_bytes: int) -> None:
        self.block_size = block_size
        self.overhead_s = 0.0
        self.token_s: float | None = None
        self.round_trip_s = PRIOR_ROUND_TRIP_S
        self.block_s = value_bytes / PRIOR_BYTES_PER_S

    def calibrate(self, small: tuple[int, float], large: tuple[int, float]) -> None:
        """Fit the recompute model to two prefill forwards `(tokens, seconds)` of different sizes."""
        (n1, t1), (n2, t2) = small, large
        slope = max(0.0, (t2 - t1) / (n2 - n1))  # noise can make it negative: then it is ~0 (never fetch)
        self.token_s = slope
        self.overhead_s = max(0.0, t1 - slope * n1)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill forward of `tokens` tokens took `seconds` (device work finished)."""
        if tokens > 0 and self.token_s is not None:
            self.token_s = _average(self.token_s, max(0.0, seconds - self.overhead_s) / tokens)

    def record_fetch(self, blocks: int, seconds: float) -> None:
        """A fetch that yielded `blocks` blocks took `seconds`, lookup to blocks in the pool."""
        if blocks == 0:
            self.round_trip_s = _average(self.round_trip_s, seconds)
        else:
            self.block_s = _average(self.block_s, max(0.0, seconds - self.round_trip_s) / blocks)

    def recompute_s(self, blocks: int) -> float | None:
        """Seconds that computing `blocks` more prompt blocks adds to a prefill; None before any measurement."""
        return None if self.token_s is None else blocks * self.block_size * self.token_s

    def fetch_s(self, blocks: int) -> float:
        """Seconds that fetching `blocks` blocks is expected to take, if all hit."""
        return self.round_trip_s + blocks * self.block_s

    def stats(self) -> dict[str, StatValue]:
        """The estimates now (`recompute_s_per_token` only once measured)."""
        out: dict[str, StatValue] = {"fetch_s_per_block": self.block_s, "fetch_round_trip_s": self.round_trip_s}
        if self.token_s is not None:
            out["recompute_s_per_token"] = self.token_s
        return out


class RemoteLink:
    """Connects `cache` (the engine's prefix cache) to a remote `tier`; see the module docstring.

    Args:
        cache: built with `collect_new=True`, so the blocks it registers can be written down.
        tier: the remote store (a `RedisTier`), keyed by the cache's block hashes; closed by `close`.
    """

    def __init__(self, cache: PrefixCache, tier: Tier) -> None:
        self.cache = cache
        self.tier = tier
        self.format = cache.pool.block_format
        self.cost = FetchCost(cache.block_size, HEADER.size + self.format.bytes_per_block)
        self.counters = dict.fromkeys(
            ("fetches", "fetched_blocks", "fetch_cut_at_deadline", "skipped_slower", "skipped_unmeasured",
             "skipped_no_room", "skipped_unavailable", "written_blocks", "write_skipped_unavailable"),
            0,
        )  # fmt: skip
        self.seconds = {"fetch_s": 0.0, "write_down_s": 0.0}  # on the request path: fetching; after steps: writing

    def fetch(
        self, hashes: Sequence[bytes], tokens: Sequence[int], chain: list[CachedBlock], max_blocks: int, reserved: int
    ) -> list[CachedBlock]:
        """The blocks after `chain` (the local hits) found in the remote tier, cached on the device; [] when the
        fetch is not worth it. `hashes`/`tokens`: the request's block keys and token ids; at most `max_blocks`
        blocks in all; `reserved` device blocks stay free (promised to this step's other requests)."""
        first = len(chain)
        wanted = min(max_blocks, len(hashes)) - first
        if wanted <= 0 or self.cache.contains(hashes[first]):  # the local chain ended on a block it holds
            return []
        protect = {entry.serial for entry in chain}
        wanted = self._worth_fetching(min(wanted, self.cache.room(reserved, protect)))
        if not wanted:
            return []
        size, start = self.cache.block_size, time.perf_counter()
        deadline = start + (self.cost.recompute_s(wanted) or 0.0)

        def decode(index: int, data: bytes) -> list[torch.Tensor] | None:
            return decode_block(data, self.format, tokens[(first + index) * size : (first + index + 1) * size])

        found = self.tier.get_chain(hashes[first : first + wanted], decode, deadline=deadline)
        blocks = [
            (hashes[first + i], tuple(tokens[(first + i) * size : (first + i + 1) * size]), tensors)
            for i, tensors in enumerate(found)
        ]
        entries = self.cache.insert_chain(blocks, chain[-1] if chain else None, reserved, protect)
        elapsed = time.perf_counter() - start
        self.cost.record_fetch(len(entries), elapsed)
        self.seconds["fetch_s"] += elapsed
        self.counters["fetches"] += 1
        self.counters["fetched_blocks"] += len(entries)
        self.counters["fetch_cut_at_deadline"] += int(len(found) < wanted and time.perf_counter() > deadline)
        return entries

    def _worth_fetching(self, blocks: int) -> int:
        """`blocks` if fetching them is expected to beat recomputing them, else 0; each decision is counted."""
        recompute = self.cost.recompute_s(blocks)
        if blocks == 0:
            reason = "skipped_no_room"
        elif not self.tier.is_available():
            reason = "skipped_unavailable"
        elif recompute is None:
            reason = "skipped_unmeasured"
        elif self.cost.fetch_s(blocks) >= recompute:
            reason = "skipped_slower"
        else:
            return blocks
        self.counters[reason] += 1
        return 0

    def write_down(self) -> None:
        """Write the blocks the cache registered since the last call to the tier (queued: `put_many`)."""
        entries = self.cache.take_new_blocks()
        if not entries:
            return
        if not self.tier.is_available():  # dropped at once: not worth encoding
            self.counters["write_skipped_unavailable"] += len(entries)
            return
        start = time.perf_counter()
        block_ids = [entry.block_id for entry in entries if entry.block_id is not None]
        exported = self.cache.pool.export_blocks(block_ids)
        items = [
            (entry.key, encode_block(self.format, tensors, entry.tokens))
            for entry, tensors in zip(entries, exported, strict=True)
        ]
        self.tier.put_many(items)
        self.counters["written_blocks"] += len(items)
        self.seconds["write_down_s"] += time.perf_counter() - start

    def stats(self) -> dict[str, Any]:
        """The tier's counters (faults by kind, breaker state; no secrets), this link's decisions and seconds spent
        (`fetch_s` on requests' admission, `write_down_s` after steps), the cost estimates."""
        return {**self.tier.stats(), **self.counters, **self.seconds, **self.cost.stats()}

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait up to `timeout_s` seconds for queued writes; True if all were attempted."""
        return self.tier.flush(timeout_s)

    def close(self) -> None:
        self.tier.close()
