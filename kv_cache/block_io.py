"""Moving tokens between tensors and blocks: full-precision writes, and sealing blocks into quantized ones.

The functions take the storage of one layer (`DenseBlocks`, `QuantizedBlocks`) and the `BlockTable`s with their
`WritePlan`s, and do the index arithmetic (slot = block id * block_size + offset) in one place. New tokens
arrive as `[batch, kv_heads, tokens, head_dim]`; `token_rows` flattens them to rows `batch * tokens + t`.

What can run out of memory (index tensors, gathers, dtype casts, quantization) is split from what writes the pool:
`dense_write` and `gather_sealed` build tensors and change nothing; `SlotWrite.apply` and the sealer's stores
only copy in place. The store builds everything first and writes last (see `kv_store`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kv_cache.block_format import BlockFormat, DenseBlocks
from kv_cache.block_table import BlockTable, SealBatch, WritePlan
from kv_cache.devices import to_device
from kv_cache.errors import CacheValidationError

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TokenRows = tuple[torch.Tensor, torch.Tensor]
"""Keys and values as `[batch * tokens, kv_heads, head_dim]` rows (`token_rows`)."""

Run = tuple[int, int, int]
"""`(first, second, tokens)`: index `first + t` pairs with index `second + t` for `t < tokens` (`expand_runs`)."""


@dataclass(frozen=True)
class StateSpec:
    """What new keys/values must look like; None fields are not checked (nothing fixed them yet)."""

    batch: int | None
    block_format: BlockFormat | None
    dtype: torch.dtype | None
    device: torch.device | None
    finite: bool


def check_states(key: torch.Tensor, value: torch.Tensor, spec: StateSpec) -> None:
    """Raise `CacheValidationError` naming the problem unless `key`/`value` are `[batch, kv_heads, tokens,
    head_dim]` float tensors that match `spec` (shape, dtype, device, and finite values when asked)."""
    if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
        raise CacheValidationError(f"key and value must be tensors; got {type(key).__name__}, {type(value).__name__}")
    if key.layout != torch.strided or value.layout != torch.strided:
        raise CacheValidationError(
            f"key/value layouts are {key.layout}/{value.layout}; expected dense (strided) tensors"
        )
    if key.dim() != 4:
        raise CacheValidationError(
            f"key has shape {tuple(key.shape)}; expected 4 dims [batch, kv_heads, tokens, head_dim]"
        )
    if value.shape != key.shape:
        raise CacheValidationError(f"value shape {tuple(value.shape)} differs from key shape {tuple(key.shape)}")
    if spec.batch is not None and key.shape[0] != spec.batch:
        raise CacheValidationError(f"key has batch {key.shape[0]} but {spec.batch} sequence ids were given")
    if key.dtype not in _FLOAT_DTYPES or value.dtype != key.dtype:
        raise CacheValidationError(
            f"key/value dtypes are {key.dtype}/{value.dtype}; expected one of float32, float16, bfloat16, "
            "the same for both"
        )
    fmt = spec.block_format
    if fmt is not None and (key.shape[1] != fmt.kv_heads or key.shape[3] != fmt.head_dim):
        raise CacheValidationError(
            f"key has {key.shape[1]} KV heads x head_dim {key.shape[3]}; this cache holds "
            f"{fmt.kv_heads} KV heads x head_dim {fmt.head_dim}"
        )
    if spec.dtype is not None and key.dtype != spec.dtype:
        raise CacheValidationError(f"key dtype is {key.dtype}; this cache was filled with {spec.dtype}")
    if spec.device is not None and (key.device != spec.device or value.device != spec.device):
        raise CacheValidationError(f"key/value are on {key.device}/{value.device}; this cache lives on {spec.device}")
    if min(key.shape[1], key.shape[3]) == 0 or key.shape[0] == 0:
        raise CacheValidationError(f"key has shape {tuple(key.shape)}; batch, kv_heads and head_dim must be >= 1")
    if spec.finite:
        require_finite(finite_flag(key, value))


def finite_flag(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A device bool: whether every key and value is finite (`require_finite` reads it, a sync, when it is due)."""
    return torch.isfinite(key).all() & torch.isfinite(value).all()


def require_finite(flag: torch.Tensor | None) -> None:
    """Raise `CacheValidationError` if `finite_flag`'s `flag` is false (None: nothing was checked)."""
    if flag is not None and not bool(flag):
        raise CacheValidationError(
            "key/value hold NaN or Inf; a quantized cache refuses them (they would poison a block's scales). "
            "Fix the model's numerics, or set check_finite=False to skip this check"
        )


def token_rows(states: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[batch, kv_heads, tokens, head_dim]` -> `[batch * tokens, kv_heads, head_dim]` in `dtype` (the storage's),
    row `b * tokens + t`."""
    batch, heads, tokens, dim = states.shape
    rows = states.transpose(1, 2).reshape(batch * tokens, heads, dim)
    return rows if rows.dtype == dtype else rows.to(dtype)  # the check is cheaper than a no-op `to` per decode step


def write_runs(
    dense: DenseBlocks,
    runs: tuple[tuple[int, int], ...],
    rows: TokenRows,
    to_tensor: Callable[[tuple[tuple[int, int], ...]], Tensor],
) -> None:
    """Copy the new tokens `rows` (`[n, kv_heads, head_dim]`) into the slots of `runs` (`(first slot, tokens)`, row
    order, `n` tokens in all).

    One run takes one contiguous copy; otherwise `to_tensor` turns the runs into an int64 slot tensor on the
    pool's device (the store caches them: every layer of a step writes the same slots).
    """
    if len(runs) == 1:
        _copy_run(dense, runs[0][0], runs[0][1], rows)
        return
    dense.write(to_tensor(runs), rows[0], rows[1])


def _copy_run(dense: DenseBlocks, slot: int, count: int, rows: TokenRows) -> None:
    """One sequence's `count` tokens into consecutive slots from `slot`: one contiguous copy, no index tensor."""
    dense.key_slots.narrow(0, slot, count).copy_(rows[0])
    dense.value_slots.narrow(0, slot, count).copy_(rows[1])


@dataclass(frozen=True)
class SlotWrite:
    """New tokens ready to go into one layer's full-precision slots: indices built, rows selected and in the
    storage dtype, so `apply` only copies (it allocates nothing, so it cannot run out of memory halfway).

    slots: an `[n]` int64 index tensor, or the first of `n` consecutive slots; keys, values: `[n, kv_heads,
    head_dim]` in the storage dtype.
    """

    dense: DenseBlocks
    slots: Tensor | int
    keys: Tensor
    values: Tensor

    def apply(self) -> None:
        if isinstance(self.slots, int):
            _copy_run(self.dense, self.slots, self.keys.shape[0], (self.keys, self.values))
        else:
            self.dense.write(self.slots, self.keys, self.values)


def dense_write(
    dense: DenseBlocks, tables: list[BlockTable], plans: list[WritePlan], rows: TokenRows
) -> SlotWrite | None:
    """Prepare copying each table's tokens `[plan.dense_from, plan.end)` from `rows` (storage dtype) into its
    full-precision blocks, which the tables must hold already; None when every new token was sealed instead.
    Tokens that land in consecutive slots from consecutive rows (the blocks of a fresh prompt, usually every row's)
    take one contiguous copy, without an index tensor."""
    size = dense.keys.shape[1]
    per_table = rows[0].shape[0] // len(tables)
    runs: list[Run] = []
    for index, (table, plan) in enumerate(zip(tables, plans, strict=True)):
        runs += _slot_runs(table, (plan.dense_from, plan.end), size, index * per_table + plan.dense_from - plan.start)
    runs = _merged(runs)
    if not runs:
        return None
    keys, values = rows
    if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == keys.shape[0]:
        return SlotWrite(dense, runs[0][0], keys, values)
    slots, sources = expand_runs(runs, keys.device)
    if sources.shape[0] != keys.shape[0]:  # some new tokens were sealed instead
        keys, values = keys.index_select(0, sources), values.index_select(0, sources)
    return SlotWrite(dense, slots, keys, values)


def gather_sealed(
    slots: TokenRows, size: int, seals: list[tuple[SealBatch, int]], rows: TokenRows | None
) -> tuple[Tensor, Tensor]:
    """The tokens the seals seal (tokens `[plan.sealed, plan.seal_to)` of each plan) as whole blocks, seal after
    seal: keys and values `[n, size, kv_heads, head_dim]` fp32, ready for `QuantizedBlocks.encode`.

    slots: keys and values `[slots, kv_heads, head_dim]` of the full-precision storage (a `LayerStack` flattened
    over layers, blocks and tokens), each seal paired with the first slot of its layer in them. Tokens before
    `plan.start` come from the table's full-precision blocks, later ones from the new `rows` (row `seal.rows[i]`
    of the append's batch). New tokens are rounded to the storage dtype first, so a token is quantized from the
    same values whichever way it arrived. One gather per tensor, however many layers seal.
    """
    from_blocks: list[Run] = []  # (slot, row of the sealed tokens, tokens)
    from_rows: list[Run] = []  # (row of `rows`, row of the sealed tokens, tokens)
    target = 0
    for seal, offset in seals:
        for index, (table, plan) in enumerate(zip(seal.tables, seal.plans, strict=True)):
            split = min(plan.start, plan.seal_to)  # stored tokens before it, new ones from it
            from_blocks += _slot_runs(table, (plan.sealed, split), size, target, offset)
            if split < plan.seal_to and seal.rows is not None and rows is not None:
                first_row = seal.rows[index] * (plan.end - plan.start) + split - plan.start
                from_rows.append((first_row, target + split - plan.sealed, plan.seal_to - split))
            target += plan.seal_to - plan.sealed
    device = slots[0].device
    stored = expand_runs(from_blocks, device) if from_blocks else None
    new = expand_runs(from_rows, device) if from_rows else None
    in_order = new is None and sum(run[2] for run in from_blocks) == target  # stored tokens only, in target order
    sealed = []
    for source, arrived in zip(slots, (None, None) if rows is None else rows, strict=True):
        if in_order and stored is not None:
            tokens = source.index_select(0, stored[0]).float()
        else:
            tokens = torch.empty(target, *source.shape[1:], device=device)
            if stored is not None:
                tokens.index_copy_(0, stored[1], source.index_select(0, stored[0]).float())
            if new is not None and arrived is not None:
                tokens.index_copy_(0, new[1], arrived.index_select(0, new[0]).to(source.dtype).float())
        sealed.append(tokens.view(target // size, size, *source.shape[1:]))
    return sealed[0], sealed[1]


def _slot_runs(table: BlockTable, positions: tuple[int, int], size: int, target: int, base: int = 0) -> list[Run]:
    """`(base + slot, target + position - first, tokens)` for positions `[first, end)` of a table's
    full-precision blocks of `size` tokens: one run per block."""
    position, end = positions
    runs = []
    while position < end:
        logical, offset = divmod(position, size)
        length = min(end - position, size - offset)
        runs.append((base + table.dense_blocks[logical] * size + offset, target + position - positions[0], length))
        position += length
    return runs


def _merged(runs: list[Run]) -> list[Run]:
    """`runs` with each run that continues the previous one in both indices folded into it."""
    merged: list[Run] = []
    for first, second, tokens in runs:
        if merged and merged[-1][0] + merged[-1][2] == first and merged[-1][1] + merged[-1][2] == second:
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + tokens)
        else:
            merged.append((first, second, tokens))
    return merged


def expand_runs(runs: list[Run], device: torch.device) -> tuple[Tensor, Tensor]:
    """Index pairs of `runs`: `(first + t, second + t)` for `t < tokens` of each run, as two `[sum of tokens]`
    int64 tensors on `device` (built on the host with a few vector ops, copied to the device once, without a
    sync)."""
    spans = torch.tensor(runs, dtype=torch.long)  # [runs, 3]
    lengths = spans[:, 2]
    offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    pairs = torch.repeat_interleave(spans[:, :2], lengths, dim=0).T + offsets
    firsts, seconds = to_device(pairs, device)
    return firsts, seconds
