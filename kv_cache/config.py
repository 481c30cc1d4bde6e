"""`KVCacheConfig`: every knob of the cache in one validated, serialisable dataclass.

Each field is checked in `__post_init__`; a bad value raises `CacheValidationError` naming the field, the value
and what is allowed. `to_dict`/`from_dict` and `to_json`/`from_json` round-trip exactly; unknown keys are an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, cast

import torch

from kv_cache.devices import resolve_device
from kv_cache.errors import CacheValidationError
from kv_cache.low_rank import Compressor

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
MAX_BLOCK_SIZE = 1024
FULL_PRECISION_BLOCK_SIZE = 16
QUANTIZED_BLOCK_SIZE = 64  # the key quantization group: keys share a scale per channel over one block
QUANTIZATION_BITS = (2, 4, 8)


class CacheStrategy(str, Enum):
    """Which entries to drop first when the cache is over budget (blocks of the prefix cache, or tokens)."""

    LRU = "lru"
    LFU = "lfu"
    ADAPTIVE = "adaptive"


class CacheMode(str, Enum):
    """`INFERENCE` stores detached tensors; `TRAINING` keeps the autograd graph through the cache."""

    INFERENCE = "inference"
    TRAINING = "training"


def _parse_dtype(value: Any) -> torch.dtype | None:
    if value is None or (isinstance(value, torch.dtype) and value in _DTYPES.values()):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise CacheValidationError(
        f"dtype={value!r} is not supported; use None (the model's dtype), torch.float32, torch.float16 or "
        "torch.bfloat16 (or their names 'float32', 'float16', 'bfloat16')"
    )


def parse_enum(name: str, enum: type[Enum], value: Any) -> Any:
    """`value` as a member of `enum` (a member, its value, or its value's name in any case); else
    `CacheValidationError` naming the field and the allowed values."""
    if isinstance(value, enum):
        return value
    try:
        return enum(value.lower() if isinstance(value, str) else value)
    except ValueError:
        allowed = ", ".join(repr(member.value) for member in enum)
        raise CacheValidationError(f"{name}={value!r} is not supported; use one of {allowed}") from None


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """`CacheValidationError` naming `name` unless `value` is an int (not a bool) in `[low, high]`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CacheValidationError(f"{name}={value!r} must be an int")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise CacheValidationError(f"{name}={value} is out of range; use a value {bound}")


def check_mib(name: str, value: Any) -> None:
    """`CacheValidationError` naming `name` unless `value` is a finite, positive number of MiB."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CacheValidationError(f"{name}={value!r} must be a finite number of MiB")
    if value <= 0:
        raise CacheValidationError(f"{name}={value} must be > 0")


@dataclass
class KVCacheConfig:
    """Configuration of a paged KV cache.

    Attributes:
        max_tokens: tokens one sequence may hold (its budget); appending past it raises `CacheMemoryError`.
        block_size: tokens per block, a power of two; the unit of allocation, sharing and transfer. None picks 16,
            or 64 with quantization (keys are quantized per channel over one block, and a group of 64 tokens keeps
            the scales' overhead at 1/16 byte per element).
        num_blocks: blocks in the pool. None: derived from `memory_budget_mb`, or else sized on first use so that
            every sequence of the first batch can reach `max_tokens` (plus one spare block each for copy-on-write).
        memory_budget_mb: size the pool to this many MiB of K/V storage (all layers) instead of `num_blocks`.
        dtype: storage dtype of keys and values. None stores them in the model's dtype (exact).
        device: "auto" (CUDA, then MPS, then CPU), or an explicit device such as "cpu" or "cuda:0".
        cache_strategy: which cached entries to drop first when over budget.
        cache_mode: `CacheMode.INFERENCE` (detached, every option allowed) or `CacheMode.TRAINING`.
        enable_profiling: time every cache operation (perf counters); reported under `get_stats()["profiling"]`.
        history_size: how many snapshots `get_stats(include_history=True)` keeps (a ring buffer).
        snapshot_interval_s: take a history snapshot at most this often (0: on every operation).
        use_quantization: store blocks older than the `residual_tokens` newest tokens as packed integer codes
            (KIVI: keys per channel over a block, values per token over `quantization_group_size` channels).
        quantization_bits: 8, 4 or 2 bits per element.
        quantization_group_size: channels sharing one value scale/zero (head_dim if smaller).
        residual_tokens: the newest tokens kept in full precision (a multiple of `block_size`; KIVI uses 128).
        layer_bits: per-layer bit widths overriding `quantization_bits`, e.g. `{0: 8, -1: 8}` keeps the first and
            last layers at 8 bits; negative indices count from the last layer.
        check_finite: with quantization, reject NaN/Inf keys or values when they are appended (one device sync per
            call on a GPU). False skips the check: a non-finite value then raises when its block is sealed, and
            that sequence cannot grow past it; nothing non-finite is ever stored in a quantized block. Steps that
            replay CUDA graphs (`decode_graphs`, the engine's step graphs) always work the second way.
        token_budget: keep at most this many tokens per layer and KV head of a sequence; older tokens are evicted
            by `cache_strategy` (LRU: a sliding window; LFU: heavy hitters by accumulated attention, H2O; ADAPTIVE:
            a recent window plus heavy hitters) once a layer holds a block more than the budget.
        compression_ratio: instead of a fixed budget, evict this fraction of the tokens seen (kvpress's convention:
            0.75 keeps a quarter, "4x").
        sink_tokens: the first tokens of a sequence are never evicted (StreamingLLM's attention sinks).
        observation_window: with LFU/ADAPTIVE eviction, a prompt is scored by the attention of its last
            `observation_window` queries (SnapKV); each decoded token then adds its own attention (H2O).
        low_rank_ratio: store each token's keys and values as coefficients on a per-layer, per-KV-head basis
            keeping this fraction of head_dim (`low_rank.LowRankProjection`: the blocks shrink to it); None: off.
        low_rank_method: "low_rank" (centred PCA) or "svd" (uncentred), fitted on each layer's first states.
    """

    max_tokens: int = 4096
    block_size: int | None = None
    num_blocks: int | None = None
    memory_budget_mb: float | None = None
    dtype: torch.dtype | None = None
    device: str = "auto"
    cache_strategy: CacheStrategy = CacheStrategy.LRU
    cache_mode: CacheMode = CacheMode.INFERENCE
    enable_profiling: bool = False
    history_size: int = 128
    snapshot_interval_s: float = 0.0
    use_quantization: bool = False
    quantization_bits: int = 4
    quantization_group_size: int = 64
    residual_tokens: int = 128
    layer_bits: dict[int, int] | None = field(default=None)
    check_finite: bool = True
    token_budget: int | None = None
    compression_ratio: float | None = None
    sink_tokens: int = 0
    observation_window: int = 32
    low_rank_ratio: float | None = None
    low_rank_method: str = "low_rank"

    def __post_init__(self) -> None:
        check_int("max_tokens", self.max_tokens, 1)
        if not isinstance(self.use_quantization, bool):
            raise CacheValidationError(f"use_quantization={self.use_quantization!r} must be True or False")
        if self.block_size is None:
            self.block_size = QUANTIZED_BLOCK_SIZE if self.use_quantization else FULL_PRECISION_BLOCK_SIZE
        check_int("block_size", self.block_size, 1, MAX_BLOCK_SIZE)
        if self.block_size & (self.block_size - 1):
            raise CacheValidationError(f"block_size={self.block_size} must be a power of two (1, 2, 4, ..., 1024)")
        if self.num_blocks is not None:
            check_int("num_blocks", self.num_blocks, 1)
        if self.memory_budget_mb is not None:
            check_mib("memory_budget_mb", self.memory_budget_mb)
            if self.num_blocks is not None:
                raise CacheValidationError(
                    f"num_blocks={self.num_blocks} and memory_budget_mb={self.memory_budget_mb} are both set; "
                    "set only one of them"
                )
        self.dtype = _parse_dtype(self.dtype)
        if not isinstance(self.device, (str, torch.device)):
            raise CacheValidationError(f"device={self.device!r} must be a string such as 'auto', 'cpu', 'cuda:0'")
        self.device = str(self.device)
        resolve_device(self.device)  # raises CacheDeviceError for a device this machine does not have
        self.cache_strategy = parse_enum("cache_strategy", CacheStrategy, self.cache_strategy)
        self.cache_mode = parse_enum("cache_mode", CacheMode, self.cache_mode)
        if not isinstance(self.enable_profiling, bool):
            raise CacheValidationError(f"enable_profiling={self.enable_profiling!r} must be True or False")
        check_int("history_size", self.history_size, 1)
        interval = self.snapshot_interval_s
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval < math.inf:
            raise CacheValidationError(f"snapshot_interval_s={interval!r} must be a number of seconds >= 0")
        self._check_quantization()
        self._check_eviction()
        self._check_low_rank()

    @property
    def evicts_tokens(self) -> bool:
        """Whether tokens are evicted inside a sequence (`token_budget` or `compression_ratio` is set)."""
        return self.token_budget is not None or self.compression_ratio is not None

    def _check_eviction(self) -> None:
        if self.token_budget is not None:
            check_int("token_budget", self.token_budget, 1)
        ratio = self.compression_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
            raise CacheValidationError(f"compression_ratio={ratio!r} must be a fraction of tokens evicted, in (0, 1)")
        if self.token_budget is not None and ratio is not None:
            raise CacheValidationError("token_budget and compression_ratio are both set; set only one of them")
        check_int("sink_tokens", self.sink_tokens, 0)
        check_int("observation_window", self.observation_window, 1)
        if self.token_budget is not None and self.sink_tokens >= self.token_budget:
            raise CacheValidationError(
                f"sink_tokens={self.sink_tokens} must be smaller than token_budget={self.token_budget}"
            )
        if self.evicts_tokens and self.use_quantization:
            raise CacheValidationError(
                "token eviction (token_budget/compression_ratio) with use_quantization=True is not supported yet; "
                "use one of the two"
            )
        if self.evicts_tokens and self.cache_mode is CacheMode.TRAINING:
            raise CacheValidationError(
                "token eviction is a lossy option, refused with cache_mode=CacheMode.TRAINING; "
                "use CacheMode.INFERENCE or unset token_budget/compression_ratio"
            )

    def _check_low_rank(self) -> None:
        try:
            Compressor(1.0 if self.low_rank_ratio is None else self.low_rank_ratio, self.low_rank_method)
        except CacheValidationError as error:
            raise CacheValidationError(
                f"low_rank_ratio={self.low_rank_ratio!r}, low_rank_method={self.low_rank_method!r}: {error}"
            ) from None
        if self.low_rank_ratio is not None and self.cache_mode is CacheMode.TRAINING:
            raise CacheValidationError(
                "low_rank_ratio is a lossy option, refused with cache_mode=CacheMode.TRAINING; "
                "use CacheMode.INFERENCE or unset low_rank_ratio"
            )

    @property
    def compressor(self) -> Compressor | None:
        """The low-rank compressor the caches store coefficients with (None: full head_dim)."""
        return None if self.low_rank_ratio is None else Compressor(self.low_rank_ratio, self.low_rank_method)

    def _check_quantization(self) -> None:
        for name, bits in [("quantization_bits", self.quantization_bits), *self._layer_bit_items()]:
            if bits not in QUANTIZATION_BITS or isinstance(bits, bool):
                raise CacheValidationError(f"{name}={bits!r} is not supported; use 2, 4 or 8")
        check_int("quantization_group_size", self.quantization_group_size, 1)
        if not isinstance(self.check_finite, bool):
            raise CacheValidationError(f"check_finite={self.check_finite!r} must be True or False")
        check_int("residual_tokens", self.residual_tokens, 0)
        if self.use_quantization and self.residual_tokens % self.tokens_per_block:
            raise CacheValidationError(
                f"residual_tokens={self.residual_tokens} must be a multiple of block_size={self.block_size}"
            )
        if self.use_quantization and self.cache_mode is CacheMode.TRAINING:
            raise CacheValidationError(
                "use_quantization=True is a lossy option, refused with cache_mode=CacheMode.TRAINING; "
                "use CacheMode.INFERENCE or turn quantization off"
            )

    def _layer_bit_items(self) -> list[tuple[str, Any]]:
        if self.layer_bits is None:
            return []
        if not isinstance(self.layer_bits, dict):
            raise CacheValidationError(f"layer_bits={self.layer_bits!r} must be a dict {{layer index: bits}} or None")
        # JSON turns int keys into strings: accept "3" as layer 3.
        try:
            self.layer_bits = {int(layer): bits for layer, bits in self.layer_bits.items()}
        except (TypeError, ValueError):
            raise CacheValidationError(f"layer_bits={self.layer_bits!r} keys must be layer indices") from None
        return [(f"layer_bits[{layer}]", bits) for layer, bits in self.layer_bits.items()]

    def bits_per_layer(self, num_layers: int) -> tuple[int, ...] | None:
        """Bit width of each of `num_layers` layers, or None without quantization.

        Raises `CacheValidationError` if `layer_bits` names a layer the model does not have.
        """
        if not self.use_quantization:
            return None
        bits = [self.quantization_bits] * num_layers
        for layer, width in (self.layer_bits or {}).items():
            if not -num_layers <= layer < num_layers:
                raise CacheValidationError(f"layer_bits names layer {layer}; the model has {num_layers} layers")
            bits[layer] = width
        return tuple(bits)

    @property
    def tokens_per_block(self) -> int:
        """`block_size` as an int (`__post_init__` resolves None)."""
        return cast(int, self.block_size)

    @property
    def blocks_per_sequence(self) -> int:
        """Blocks one sequence needs to hold `max_tokens` tokens."""
        return -(-self.max_tokens // self.tokens_per_block)

    def resolved_device(self) -> torch.device:
        """The `torch.device` that `device` names on this machine ("auto" resolved)."""
        return resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (enums as their values, dtype as its name)."""
        out = dataclasses.asdict(self)
        out["dtype"] = None if self.dtype is None else str(self.dtype).removeprefix("torch.")
        out["cache_strategy"] = self.cache_strategy.value
        out["cache_mode"] = self.cache_mode.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVCacheConfig:
        """Build a config from `to_dict` output; unknown keys raise `CacheValidationError`."""
        if not isinstance(data, dict):
            raise CacheValidationError(f"data must be a dict of config fields; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CacheValidationError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KVCacheConfig:
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as error:
            raise CacheValidationError(f"text is not a JSON config: {error}") from None
        return cls.from_dict(data)
