"""`EngineConfig`: the knobs of `KVCacheEngine` (scheduling, prefix caching, preemption, CPU and Redis tiers).

The cache itself (block size, pool size, dtype, quantization, eviction strategy) stays in `KVCacheConfig`; this
dataclass holds only what the engine adds on top. Every field is checked in `__post_init__`; a bad value raises
`CacheValidationError` naming the field, the value and what is allowed. The Redis fields are checked by
`kv_cache.tiers.redis.RedisTierConfig`'s rules (so they need the `redis` extra once `redis_url` is set), and the
repr masks the password of `redis_url`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from kv_cache.config import check_int, check_mib, parse_enum
from kv_cache.errors import CacheValidationError

if TYPE_CHECKING:  # needs the `redis` extra: imported when a redis_url is set
    from kv_cache.tiers.redis import RedisTierConfig


class PreemptionMode(str, Enum):
    """What happens to a preempted request's blocks: copied to the CPU tier, or dropped and recomputed later."""

    SWAP = "swap"
    RECOMPUTE = "recompute"


class InvariantCheck(str, Enum):
    """When the engine verifies block conservation: never, when idle (SGLang's default), or after every step."""

    OFF = "off"
    IDLE = "idle"
    EVERY_STEP = "every_step"


@dataclass(repr=False)
class EngineConfig:
    """Configuration of `KVCacheEngine`.

    Attributes:
        enable_prefix_caching: reuse the full blocks of earlier prompts that start the same way (hash chained
            over the block tokens); freed requests' blocks stay cached until evicted.
        prefill_chunk_size: prompt tokens computed per step, over all prefilling requests (tokens); a longer
            prompt is split over several steps so running requests keep decoding in between.
        max_num_seqs: requests running at once (decoding or prefilling); more wait in the queue.
        preemption_mode: `SWAP` copies a preempted request's blocks to the CPU tier (needs `cpu_tier_blocks` or
            `cpu_tier_mb`); `RECOMPUTE` drops them and recomputes prompt and output when it resumes. A swap that
            finds the CPU tier full falls back to recompute (counted in stats).
        cpu_tier_blocks: blocks of each of the store's formats in the host (CPU) tier; None: no block count.
        cpu_tier_mb: alternatively, MiB of host memory for the tier (split over the store's pools by their size).
            With neither set there is no CPU tier: no swap, no demotion of cold prefix blocks.
        pin_memory: page-lock the CPU tier so its copies are asynchronous; takes effect only with a CUDA device
            (`get_stats()["cpu_tier"]["pinned"]` is False otherwise, with `pinned_reason`).
        oom_retries: retries of a step after `torch.OutOfMemoryError` (each after freeing cached blocks and
            emptying the CUDA allocator's cache) before `CacheMemoryError`.
        namespace: mixed into every block hash: requests of different namespaces (tenants, weight versions)
            never share blocks.
        invariant_check: `IDLE` verifies block conservation whenever the engine has no request left; tests use
            `EVERY_STEP`.
        redis_url: share prefix blocks with other engine processes through Redis (`redis://[[user]:password@]host
            :port/db`, `rediss://` for TLS, `unix://`); lookups go device pool -> CPU tier -> Redis, new blocks are
            written down in the background. Needs prefix caching and the `redis` extra. None: no Redis tier.
        redis_namespace: the key namespace (`kvc:{namespace}:...`): deployments sharing one server never read
            each other's blocks. 1-128 characters of `A-Z a-z 0-9 . _ -`.
        redis_ttl_s: expire each block this many seconds after its write; None leaves eviction to the server's
            maxmemory policy (`allkeys-lru` is the intended global policy).
        redis_max_value_bytes: blocks encoded larger than this are not written (nor read back).
        decode_graphs: run decode steps over fixed buffers (`kv_cache.decode_graphs`), the batch padded to the next
            power of two up to `max_num_seqs`, each such batch captured once in a CUDA graph and then replayed.
            None (the default): on CUDA only; True also on other devices (the same static step, eagerly: what the
            tests check); False: every step eager.
    """

    enable_prefix_caching: bool = True
    prefill_chunk_size: int = 512
    max_num_seqs: int = 32
    preemption_mode: PreemptionMode = PreemptionMode.RECOMPUTE
    cpu_tier_blocks: int | None = None
    cpu_tier_mb: float | None = None
    pin_memory: bool = True
    oom_retries: int = 3
    namespace: str = "default"
    invariant_check: InvariantCheck = InvariantCheck.IDLE
    redis_url: str | None = None
    redis_namespace: str = "default"
    redis_ttl_s: float | None = None
    redis_max_value_bytes: int = 16 * 2**20
    decode_graphs: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enable_prefix_caching, bool):
            raise CacheValidationError(f"enable_prefix_caching={self.enable_prefix_caching!r} must be True or False")
        check_int("prefill_chunk_size", self.prefill_chunk_size, 1)
        check_int("max_num_seqs", self.max_num_seqs, 1)
        check_int("oom_retries", self.oom_retries, 0)
        self.preemption_mode = parse_enum("preemption_mode", PreemptionMode, self.preemption_mode)
        self.invariant_check = parse_enum("invariant_check", InvariantCheck, self.invariant_check)
        if not isinstance(self.namespace, str):
            raise CacheValidationError(f"namespace={self.namespace!r} must be a string")
        if self.decode_graphs is not None and not isinstance(self.decode_graphs, bool):
            raise CacheValidationError(f"decode_graphs={self.decode_graphs!r} must be True, False or None")
        if not isinstance(self.pin_memory, bool):
            raise CacheValidationError(f"pin_memory={self.pin_memory!r} must be True or False")
        if self.cpu_tier_blocks is not None:
            check_int("cpu_tier_blocks", self.cpu_tier_blocks, 1)
        if self.cpu_tier_mb is not None:
            check_mib("cpu_tier_mb", self.cpu_tier_mb)
            if self.cpu_tier_blocks is not None:
                raise CacheValidationError(
                    f"cpu_tier_blocks={self.cpu_tier_blocks} and cpu_tier_mb={self.cpu_tier_mb} are both set; "
                    "set only one"
                )
        if self.preemption_mode is PreemptionMode.SWAP and not self.has_cpu_tier:
            raise CacheValidationError(
                "preemption_mode='swap' needs a CPU tier to swap to: set cpu_tier_blocks or cpu_tier_mb, "
                "or use preemption_mode='recompute'"
            )
        if self.redis_url is not None:
            if not self.enable_prefix_caching:
                raise CacheValidationError("redis_url needs enable_prefix_caching=True (Redis holds prefix blocks)")
            self.redis_tier_config("validation")

    def redis_tier_config(self, fingerprint: str) -> RedisTierConfig:
        """The Redis tier's settings for blocks of `fingerprint` (the engine passes its prefix root's hex digest).

        Raises `CacheValidationError` naming the `redis_*` field at fault, and `ImportError` without redis-py.
        """
        from kv_cache.tiers.redis import RedisTierConfig

        if self.redis_url is None:
            raise CacheValidationError("redis_url is not set: this engine has no Redis tier")
        try:
            return RedisTierConfig(
                url=self.redis_url, namespace=self.redis_namespace, fingerprint=fingerprint,
                ttl_s=self.redis_ttl_s, max_value_bytes=self.redis_max_value_bytes,
            )  # fmt: skip
        except CacheValidationError as error:  # its messages start with its own field name
            raise CacheValidationError(f"redis_{error}") from None

    def __repr__(self) -> str:
        shown = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        if self.redis_url is not None:
            from kv_cache.tiers.redis import mask_url

            shown["redis_url"] = mask_url(self.redis_url)
        return f"EngineConfig({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    @property
    def swaps_on_preemption(self) -> bool:
        return self.preemption_mode is PreemptionMode.SWAP

    @property
    def has_cpu_tier(self) -> bool:
        return self.cpu_tier_blocks is not None or self.cpu_tier_mb is not None
