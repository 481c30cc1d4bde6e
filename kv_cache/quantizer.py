"""`Quantizer`: KIVI-style asymmetric INT8/INT4/INT2 quantization of KV blocks, bit-packed into uint8.

Layout (the contract with the block pool and the attention kernels). One block of one layer is
`[block_size, kv_heads, head_dim]`; every function also takes extra leading dims, `[..., tokens, kv_heads, head_dim]`
(e.g. `[num_blocks, block_size, kv_heads, head_dim]`), and treats each leading index as a block of its own:

    tensor            keys (per channel, over the block's tokens)    values (per token, over groups of channels)
    codes  uint8      [..., tokens, kv_heads, packed_dim]            [..., tokens, kv_heads, packed_dim]
    scale  fp16       [..., kv_heads, head_dim]                      [..., tokens, kv_heads, head_dim // group]
    zero   fp16       [..., kv_heads, head_dim]                      [..., tokens, kv_heads, head_dim // group]

`x ≈ code * scale + zero` with `zero = min`, `scale = (max - min) / (2**bits - 1)` over the group, computed in fp32
and stored in fp16; codes are unsigned, in `[0, 2**bits - 1]`. The fp16 conversions are directed: zero is `min`
rounded *down* and scale is `(max - zero) / (2**bits - 1)` rounded *up*, so the stored grid `zero + k * scale` still
spans `[min, max]` and no code is clipped. Codes are rounded against the *stored* fp16 scale and zero, and
dequantization reads those same fp16 values, so per element, fp32 arithmetic aside,

    |x - dequantized| <= scale / 2        (scale: the stored fp16 value; it includes the fp16 rounding of both)

A constant group (max == min) of a value fp16 holds gets scale 0 (the division is guarded) and dequantizes to that
value exactly: all fp16 inputs, and bf16 inputs within fp16's normal range. NaN/Inf, and groups whose fp16 zero or
scale would overflow (min < -65504, or max - min > 65504 * (2**bits - 1)), are rejected, never stored.

Packing, split-half (a kernel unpacks with shifts and masks, no interleaving), `P = packed_dim`:

    INT8  P = D      byte j = code(j)
    INT4  P = D / 2  byte j = [ code(j + P) | code(j) ]                                high nibble | low nibble
    INT2  P = D / 4  byte j = [ code(j + 3P) | code(j + 2P) | code(j + P) | code(j) ]  bits 7-6 | 5-4 | 3-2 | 1-0

Reference: KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
arXiv:2402.02750) — keys per channel, values per token, a full-precision window of recent tokens. Where we depart:
- key groups span one whole block (64 tokens by default, not KIVI's G=32) and value groups 64 channels, which
  halves the scale overhead (PERFORMANCE.md section 2);
- scale and zero are computed in fp32 with a guarded division and stored in fp16 with directed rounding (KIVI
  computes in the input dtype, rounds to nearest, and divides by zero on a constant group);
- codes are packed split-half into uint8 along channels, for keys and values alike (KIVI packs 32 // bits
  neighbouring codes into an int32, along tokens for keys);
- the recent full-precision window belongs to the cache, not to this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from kv_cache.errors import CacheValidationError

SUPPORTED_BITS = (2, 4, 8)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP16_MAX = 65504.0


class QuantizedTensor(NamedTuple):
    """Packed codes with their fp16 scale and zero (shapes in the module docstring); unpacks as a 3-tuple."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def check_bits(bits: int) -> int:
    """Return `bits` if it is 2, 4 or 8, else raise CacheValidationError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise CacheValidationError(f"bits={bits!r} is not supported; use 2, 4 or 8")
    return bits


def packed_dim(head_dim: int, bits: int) -> int:
    """Bytes per (token, kv_head) row of codes: `head_dim * bits / 8`; head_dim must fill whole bytes."""
    per_byte = 8 // check_bits(bits)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % per_byte:
        raise CacheValidationError(
            f"head_dim={head_dim!r} cannot be packed at INT{bits}: {per_byte} codes share a byte, so head_dim must "
            f"be a positive multiple of {per_byte} (real models use 64, 80, 96, 128, 256)"
        )
    return head_dim // per_byte


def check_group_size(group_size: int) -> int:
    """Return `group_size` if it is a positive int, else raise CacheValidationError."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise CacheValidationError(f"group_size={group_size!r} must be a positive number of channels, e.g. 64")
    return group_size


def value_group_size(head_dim: int, group_size: int) -> int:
    """Channels per value group: `group_size`, or `head_dim` when head_dim is smaller; must divide head_dim."""
    group = min(check_group_size(group_size), head_dim)
    if head_dim % group:
        divisor = max(d for d in range(1, group + 1) if head_dim % d == 0)
        raise CacheValidationError(
            f"head_dim={head_dim} is not divisible by group_size={group_size}; set group_size to a divisor of "
            f"{head_dim} (e.g. {divisor}) or to >= {head_dim}"
        )
    return group


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes split-half into bytes.

    codes: `[..., head_dim]` uint8, each in `[0, 2**bits - 1]`. Returns `[..., packed_dim]` uint8.
    """
    packed_dim(codes.shape[-1] if codes.dim() else 0, bits)
    if codes.dtype != torch.uint8:
        raise CacheValidationError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise CacheValidationError(f"codes hold {int(codes.max())}, which does not fit in {bits} bits")
    return _pack(codes, bits)


def unpack(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of `pack`. packed: `[..., packed_dim]` uint8. Returns codes `[..., head_dim]` uint8."""
    expected = packed_dim(head_dim, bits)
    if packed.dtype != torch.uint8 or packed.dim() == 0 or packed.shape[-1] != expected:
        raise CacheValidationError(
            f"packed codes must be uint8 [..., {expected}] for head_dim={head_dim} at INT{bits}, "
            f"got {packed.dtype} {list(packed.shape)}"
        )
    return _unpack(packed, bits)


def quantize_keys(keys: torch.Tensor, bits: int, check: bool = True) -> QuantizedTensor:
    """Quantize keys per (kv_head, channel) over the tokens of each block.

    keys: `[..., tokens, kv_heads, head_dim]` fp32/fp16/bf16. Returns codes `[..., tokens, kv_heads, packed_dim]`
    uint8, scale and zero `[..., kv_heads, head_dim]` fp16. With 0 tokens, scale and zero are all zeros.
    Raises `CacheValidationError` for NaN/Inf or an fp16 overflow (one device sync); `check=False` leaves that to
    the caller (`stats_finite` over many results at once).
    """
    _check_input(keys, "keys", bits)
    x = keys.float()
    if x.shape[-3] == 0:
        stats = x.new_zeros(x.shape[:-3] + x.shape[-2:], dtype=torch.float16)
        return QuantizedTensor(_pack(x.to(torch.uint8), bits), stats, stats.clone())
    low, high = torch.aminmax(x, dim=-3)
    scale, zero = _scale_and_zero(low, high, bits)
    if check:
        _check_finite(keys, "keys", scale, zero)
    codes = _encode(x, scale.unsqueeze(-3), zero.unsqueeze(-3), bits)
    return QuantizedTensor(_pack(codes, bits), scale, zero)


def quantize_values(values: torch.Tensor, bits: int, group_size: int = 64, check: bool = True) -> QuantizedTensor:
    """Quantize values per token over groups of `group_size` channels (`head_dim` if smaller).

    values: `[..., tokens, kv_heads, head_dim]` fp32/fp16/bf16. Returns codes `[..., tokens, kv_heads, packed_dim]`
    uint8, scale and zero `[..., tokens, kv_heads, head_dim // group]` fp16. `check`: as in `quantize_keys`.
    """
    _check_input(values, "values", bits)
    head_dim = values.shape[-1]
    group = value_group_size(head_dim, group_size)
    x = values.float().unflatten(-1, (head_dim // group, group))
    low, high = torch.aminmax(x, dim=-1)
    scale, zero = _scale_and_zero(low, high, bits)
    if check:
        _check_finite(values, "values", scale, zero)
    codes = _encode(x, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).flatten(-2)
    return QuantizedTensor(_pack(codes, bits), scale, zero)


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of `quantize_keys`; the bit width follows from `codes.shape[-1]` and head_dim.

    codes: `[..., tokens, kv_heads, packed_dim]` uint8; scale, zero: `[..., kv_heads, head_dim]` fp16.
    Returns `[..., tokens, kv_heads, head_dim]` fp32.
    """
    bits = bits_of(codes, head_dim)
    _check_stats(scale, zero, (*codes.shape[:-3], codes.shape[-2], head_dim), "key")
    return _decode(_unpack(codes, bits), scale.unsqueeze(-3), zero.unsqueeze(-3))


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of `quantize_values`; the group is `head_dim // scale.shape[-1]`.

    codes: `[..., tokens, kv_heads, packed_dim]` uint8; scale, zero: `[..., tokens, kv_heads, groups]` fp16.
    Returns `[..., tokens, kv_heads, head_dim]` fp32.
    """
    bits = bits_of(codes, head_dim)
    groups = scale.shape[-1] if scale.dim() else 0
    if groups == 0 or head_dim % groups:
        raise CacheValidationError(f"value scale has {groups} groups, which does not divide head_dim={head_dim}")
    _check_stats(scale, zero, (*codes.shape[:-1], groups), "value")
    channels = _unpack(codes, bits).unflatten(-1, (groups, head_dim // groups))
    return _decode(channels, scale.unsqueeze(-1), zero.unsqueeze(-1)).flatten(-2)


def bits_of(codes: torch.Tensor, head_dim: int) -> int:
    """The bit width at which `codes` (`[..., tokens, kv_heads, packed_dim]` uint8) packs `head_dim` channels."""
    if codes.dtype != torch.uint8 or codes.dim() < 3:
        raise CacheValidationError(
            f"codes must be uint8 [..., tokens, kv_heads, packed_dim], got {codes.dtype} {list(codes.shape)}"
        )
    for bits in SUPPORTED_BITS:
        if codes.shape[-1] * 8 == head_dim * bits:
            packed_dim(head_dim, bits)
            return bits
    raise CacheValidationError(
        f"codes have packed_dim={codes.shape[-1]}, which packs head_dim={head_dim} at no supported width: "
        f"expected {head_dim} (INT8), {head_dim / 2:g} (INT4) or {head_dim / 4:g} (INT2)"
    )


@dataclass(frozen=True)
class Quantizer:
    """KIVI-style quantizer: `bits` in {2, 4, 8}; values grouped over `group_size` channels.

    `use_amp=True` runs quantization and dequantization under `torch.autocast` of the tensor's device (where
    autocast exists for it). They are min/max, subtract, divide, round and multiply-add, ops autocast leaves in
    their input precision on every device, so the codes and the error bounds are the same as without it: the switch
    is there so a model running under autocast can say so, not to buy speed.
    """

    bits: int = 4
    group_size: int = 64
    use_amp: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        if not isinstance(self.use_amp, bool):
            raise CacheValidationError(f"use_amp={self.use_amp!r} must be True or False")

    def packed_dim(self, head_dim: int) -> int:
        """Bytes of codes per (token, kv_head)."""
        return packed_dim(head_dim, self.bits)

    def value_groups(self, head_dim: int) -> int:
        """Value scale/zero pairs per (token, kv_head)."""
        return head_dim // value_group_size(head_dim, self.group_size)

    def quantize_keys(self, keys: torch.Tensor) -> QuantizedTensor:
        """See `quantize_keys`: `[..., tokens, kv_heads, head_dim]` -> codes, scale, zero."""
        with self._autocast(keys):
            return quantize_keys(keys, self.bits)

    def quantize_values(self, values: torch.Tensor) -> QuantizedTensor:
        """See `quantize_values`: `[..., tokens, kv_heads, head_dim]` -> codes, scale, zero."""
        with self._autocast(values):
            return quantize_values(values, self.bits, self.group_size)

    def _autocast(self, tensor: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
        """Autocast of `tensor`'s device with `use_amp` (where the device has it), else nothing."""
        device_type = tensor.device.type
        if not self.use_amp or not torch.amp.is_autocast_available(device_type):
            return contextlib.nullcontext()
        return torch.autocast(device_type)

    def dequantize_keys(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, head_dim: int
    ) -> torch.Tensor:
        """See `dequantize_keys`; also checks that `codes` were packed at this quantizer's bit width."""
        self._check_width(codes, head_dim)
        with self._autocast(scale):
            return dequantize_keys(codes, scale, zero, head_dim)

    def dequantize_values(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, head_dim: int
    ) -> torch.Tensor:
        """See `dequantize_values`; also checks the bit width and this quantizer's value group."""
        self._check_width(codes, head_dim)
        groups = self.value_groups(head_dim)
        if scale.dim() == 0 or scale.shape[-1] != groups:
            raise CacheValidationError(
                f"value scale must be [..., {groups}] (head_dim // group_size) here, got {list(scale.shape)}"
            )
        with self._autocast(scale):
            return dequantize_values(codes, scale, zero, head_dim)

    def bytes_per_block(self, block_size: int, kv_heads: int, head_dim: int) -> int:
        """Real bytes of one block of one layer, keys and values: codes + fp16 scales + fp16 zeros."""
        for name, number in (("block_size", block_size), ("kv_heads", kv_heads)):
            if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
                raise CacheValidationError(f"{name}={number!r} must be a positive integer")
        codes = 2 * block_size * kv_heads * self.packed_dim(head_dim)
        key_stats = 2 * 2 * kv_heads * head_dim
        value_stats = 2 * 2 * block_size * kv_heads * self.value_groups(head_dim)
        return codes + key_stats + value_stats

    def bytes_per_token(self, block_size: int, kv_heads: int, head_dim: int) -> float:
        """Real bytes per token of one layer, keys and values, with key scales shared over `block_size` tokens."""
        return self.bytes_per_block(block_size, kv_heads, head_dim) / block_size

    def _check_width(self, codes: torch.Tensor, head_dim: int) -> None:
        bits = bits_of(codes, head_dim)
        if bits != self.bits:
            raise CacheValidationError(f"codes were packed at INT{bits} but this Quantizer has bits={self.bits}")


def _check_input(x: torch.Tensor, name: str, bits: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() < 3:
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise CacheValidationError(f"{name} must be fp32/fp16/bf16 [..., tokens, kv_heads, head_dim], got {got}")
    packed_dim(x.shape[-1], bits)


def _scale_and_zero(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 group min/max -> the stored fp16 (scale, zero): zero rounded down, scale up, so the grid spans the group."""
    zero = _to_fp16(low, float("-inf"))
    return _to_fp16((high - zero.float()) / (2**bits - 1), float("inf")), zero


def _to_fp16(x: torch.Tensor, direction: float) -> torch.Tensor:
    """fp32 -> fp16, rounded toward `direction` (-inf or +inf) instead of to nearest."""
    nearest = x.half()
    overshot = nearest.float() < x if direction > 0 else nearest.float() > x
    return torch.where(overshot, torch.nextafter(nearest, torch.full_like(nearest, direction)), nearest)


def stats_finite(stats: list[torch.Tensor], flags: Sequence[torch.Tensor] = ()) -> bool:
    """Whether every scale/zero tensor in `stats` is finite and every device bool in `flags` is true: one device
    sync however many there are."""
    checks = [torch.isfinite(t).all() for t in stats] + list(flags)
    return not checks or bool(torch.stack(checks).all())


def _check_finite(x: torch.Tensor, name: str, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """One device sync on the small stats tensors; the full input is scanned only to word the error."""
    if bool(torch.isfinite(scale).all() & torch.isfinite(zero).all()):
        return
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise CacheValidationError(
            f"{name} contain {bad} NaN/Inf values out of {x.numel()}; a poisoned block is never stored — "
            "check the model's activations upstream"
        )
    low, high = (float(v) for v in torch.aminmax(x.float()))
    raise CacheValidationError(
        f"{name} (min {low:.4g}, max {high:.4g}) overflow the fp16 zero or scale: a group's min must be >= -"
        f"{_FP16_MAX:g} and its range <= {_FP16_MAX:g} x (2**bits - 1); rescale them or keep this layer unquantized"
    )


def _encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 x and broadcastable fp16 scale/zero -> uint8 codes, rounded against the stored fp16 values."""
    scale32 = scale.float()
    # A constant group of fp16 values has scale 0: divide by 1 instead; any code then dequantizes to zero exactly.
    divisor = torch.where(scale32 > 0, scale32, torch.ones_like(scale32))
    return torch.round((x - zero.float()) / divisor).clamp_(0, 2**bits - 1).to(torch.uint8)


def _decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + zero.float()


def _check_stats(scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, ...], kind: str) -> None:
    for name, stats in (("scale", scale), ("zero", zero)):
        if stats.dtype != torch.float16 or tuple(stats.shape) != tuple(shape):
            raise CacheValidationError(
                f"{kind} {name} must be fp16 {list(shape)} to match the codes, got {stats.dtype} {list(stats.shape)}"
            )


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    """`[8 // bits, 1]` uint8: the bit offset of each slot in a byte."""
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device).unsqueeze(-1)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    # Slot k of byte j takes channel j + k * P. Slots never overlap, so summing the shifted codes is a bitwise OR.
    slots = codes.unflatten(-1, (8 // bits, codes.shape[-1] * bits // 8))
    return (slots << _shifts(bits, codes.device)).sum(dim=-2, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    slots = (packed.unsqueeze(-2) >> _shifts(bits, packed.device)) & (2**bits - 1)
    return slots.flatten(-2)
