"""`Policy`: which entries to evict first. One interface serves prefix-cache blocks and tokens.

Entries (blocks of a prefix cache, any hashable key: an int, a bytes digest):

* the cache reports each entry's life: `insert` when it becomes cached, `touch` on each access (with a float
  weight, 1.0 by default), `remove` when it leaves for a reason of the cache's own (invalidated, freed);
* when it needs room the cache calls `victims(count)`: the policy names up to `count` entries, first to evict
  first, **and forgets them at once**: they are handed over and the cache must evict exactly those. Entries the
  cache may not evict right now (a block that requests still hold) stay in the policy with their history: the
  cache passes `evictable`, a predicate, and the policy skips the entries it rejects, leaving them in place.

Tokens inside a sequence (vectorised, no Python loop over tokens): `select_tokens(positions, attention_mass,
budget)` returns the indices of the tokens to keep, `[..., budget]` int64, sorted ascending along the last axis.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import ClassVar, Generic, TypeVar

import torch

from kv_cache.config import CacheStrategy
from kv_cache.errors import CacheValidationError

K = TypeVar("K", bound=Hashable)
_INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def check_weight(weight: float) -> None:
    """Raise `CacheValidationError` unless `weight` is a finite number >= 0 (NaN fails the chained compare)."""
    try:
        valid = 0.0 <= weight < math.inf
    except TypeError:
        valid = False
    if not valid:
        raise CacheValidationError(f"weight={weight!r} must be a finite number >= 0 (1.0 for a plain access)")


def missing(key: Hashable, action: str) -> CacheValidationError:
    """The error for `touch`/`remove` of an entry the policy does not hold."""
    return CacheValidationError(f"key={key!r} is not in the policy; insert it before you {action} it")


def present(key: Hashable) -> CacheValidationError:
    """The error for `insert` of an entry the policy already holds."""
    return CacheValidationError(f"key={key!r} is already in the policy; call touch() to record an access")


class Policy(ABC, Generic[K]):
    """Eviction order over cached entries, and token selection inside a sequence.

    Subclasses implement the entry methods, `_victims` and `_keep_tokens`; `victims` and `select_tokens` validate their
    arguments here and delegate.
    """

    strategy: ClassVar[CacheStrategy]

    @abstractmethod
    def insert(self, key: K, weight: float = 1.0) -> None:
        """Start tracking `key` (its first access, of `weight`); `CacheValidationError` if it is present."""

    @abstractmethod
    def touch(self, key: K, weight: float = 1.0) -> None:
        """Record an access of `weight` (>= 0) to `key`; `CacheValidationError` if it is absent."""

    @abstractmethod
    def remove(self, key: K) -> None:
        """Forget `key` (the cache dropped it itself); `CacheValidationError` if it is absent."""

    @abstractmethod
    def __len__(self) -> int:
        """Entries tracked (the resident ones; ghost history of `AdaptivePolicy` does not count)."""

    @abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether `key` is tracked (resident)."""

    @abstractmethod
    def _victims(self, count: int, evictable: Callable[[K], bool] | None) -> list[K]:
        """Name and forget up to `count` entries accepted by `evictable`, in eviction order."""

    @abstractmethod
    def _keep_tokens(self, positions: torch.Tensor, attention_mass: torch.Tensor, budget: int) -> torch.Tensor:
        """Indices of the `budget` tokens to keep, any order; inputs already broadcast, 0 < budget < tokens."""

    def victims(self, count: int, evictable: Callable[[K], bool] | None = None) -> list[K]:
        """Name up to `count` entries to evict, first victim first, and forget them.

        Args:
            count: how many victims the cache needs (>= 0). Fewer come back when fewer entries are evictable.
            evictable: None (every entry may go), or a predicate; entries it rejects are skipped and keep their
                place and history. Each rejected entry it meets costs one more step (O(log n) for LFU).

        Returns:
            Distinct keys, each of which was tracked and is not any more.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise CacheValidationError(f"count={count!r} must be an int >= 0 (the number of victims wanted)")
        return self._victims(count, evictable)

    def select_tokens(self, positions: torch.Tensor, attention_mass: torch.Tensor, budget: int) -> torch.Tensor:
        """Which tokens to keep within `budget`, per row (batch, head, ...), without Python loops over tokens.

        Args:
            positions: `[..., tokens]` integer dtype, each cached token's position in its sequence (larger is
                newer); broadcastable to `attention_mass` (e.g. `torch.arange(tokens)`).
            attention_mass: `[..., tokens]` floating dtype, attention each token has received, summed over the
                queries so far (H2O's accumulated score); finite and >= 0. LRU reads only its shape.
            budget: tokens to keep per row, >= 0; a budget >= tokens keeps every token.

        Returns:
            `[..., min(budget, tokens)]` int64 indices into the tokens axis, ascending along the last axis (so
            gathered positions stay in cache order), on `attention_mass`'s device.
        """
        positions, attention_mass = _broadcast_tokens(positions, attention_mass)
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise CacheValidationError(f"budget={budget!r} must be an int >= 0 (tokens to keep per row)")
        tokens = attention_mass.shape[-1]
        if budget >= tokens:
            return torch.arange(tokens, device=attention_mass.device).expand(attention_mass.shape).contiguous()
        if budget == 0:
            return torch.empty((*attention_mass.shape[:-1], 0), dtype=torch.int64, device=attention_mass.device)
        return self._keep_tokens(positions, attention_mass, budget).sort(dim=-1).values


def _broadcast_tokens(positions: torch.Tensor, attention_mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check dtypes and devices, and broadcast both to one `[..., tokens]` shape (views, no copies)."""
    if not isinstance(positions, torch.Tensor) or positions.dtype not in _INTEGER_DTYPES:
        raise CacheValidationError(f"positions must be an integer tensor [..., tokens]; got {_describe(positions)}")
    if not isinstance(attention_mass, torch.Tensor) or not attention_mass.is_floating_point():
        raise CacheValidationError(
            f"attention_mass must be a floating tensor [..., tokens]; got {_describe(attention_mass)}"
        )
    if attention_mass.dim() == 0:
        raise CacheValidationError("attention_mass must have a tokens axis [..., tokens]; got a 0-d tensor")
    if positions.device != attention_mass.device:
        raise CacheValidationError(
            f"positions is on {positions.device} but attention_mass on {attention_mass.device}; move one of them"
        )
    try:
        positions, attention_mass = torch.broadcast_tensors(positions, attention_mass)
    except RuntimeError:
        raise CacheValidationError(
            f"positions {tuple(positions.shape)} does not broadcast to attention_mass {tuple(attention_mass.shape)}"
        ) from None
    return positions, attention_mass


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, {value.dtype}, {value.device}"
    return type(value).__name__


def keep_heaviest(score: torch.Tensor, positions: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the `budget` highest scores per row; among equal scores the newest (largest position) win.

    A selection and one top-k instead of a stable sort (~5x faster on CPU): find the budget-th largest score, then
    keep every token above it and fill the rest with the newest tokens equal to it.

    Args:
        score: `[..., tokens]` floating, no NaN; positions: `[..., tokens]` integer, same shape; 0 < budget <= tokens.
    Returns:
        `[..., budget]` int64, in no particular order.
    """
    threshold = score.kthvalue(score.shape[-1] - budget + 1, dim=-1, keepdim=True).values  # budget-th largest
    rank = torch.iinfo(torch.int64)
    tied = torch.where(score == threshold, positions.to(torch.int64), rank.min)
    return torch.where(score > threshold, rank.max, tied).topk(budget, dim=-1).indices
