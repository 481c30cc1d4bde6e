"""Tests of `kv_cache.attention.reference` against fp64 dense softmax attention built from the un-paged tensors.

Quantized formats are compared with dense attention over the *dequantized* values, so every tolerance below is
float rounding (fp32 arithmetic plus the rounding of the output to the query dtype), never quantization error.
The case builders here (`make_case`, `dense_attention`) are shared with `test_triton_attention.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from kv_cache import attention
from kv_cache.attention import reference
from kv_cache.attention.paged_kv import AttentionOptions, PagedKV, QuantizedKV
from kv_cache.errors import CacheValidationError
from kv_cache.quantizer import dequantize_keys, dequantize_values, quantize_keys, quantize_values

FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "int2")
FLOAT_FORMATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BITS = {"int8": 8, "int4": 4, "int2": 2}
# Output tolerance (atol = rtol) by the dtype the output is rounded to: half an ulp of it, plus fp32 arithmetic.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class CaseSpec:
    """One test case: a batch of sequences of `lengths` tokens in format `fmt`.

    Quantized formats store whole blocks of `qblock_size` tokens quantized and the rest in the fp tail (`dtype`).
    """

    fmt: str
    lengths: tuple[int, ...]
    kv_heads: int = 2
    group: int = 4
    q_len: int = 1
    head_dim: int = 32
    block_size: int = 16
    qblock_size: int = 32
    value_group: int = 16
    dtype: torch.dtype = torch.float32
    seed: int = 0


@dataclass
class Case:
    """Inputs built from a `CaseSpec`, with their dense fp64 counterparts `[batch, kv_heads, seq_len, head_dim]`."""

    query: torch.Tensor
    kv: PagedKV
    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor


def _page(dense: list[torch.Tensor], block_size: int, generator: torch.Generator, poison: float) -> tuple:
    """Scatter each row's `[tokens, ...]` tensor into shuffled blocks of a pool; unused slots hold `poison`.

    Returns (pool `[num_blocks, block_size, ...]`, block_table int32 `[batch, max_blocks]`).
    """
    counts = [-(-row.shape[0] // block_size) for row in dense]
    num_blocks = sum(counts) + 2  # two spare blocks never referenced
    order = torch.randperm(num_blocks, generator=generator)
    pool = torch.full((num_blocks, block_size, *dense[0].shape[1:]), poison, dtype=dense[0].dtype)
    table = torch.full((len(dense), max([*counts, 1])), num_blocks + 7, dtype=torch.int32)  # junk past the end
    next_block = 0
    for row, (tokens, count) in enumerate(zip(dense, counts, strict=True)):
        ids = order[next_block : next_block + count]
        next_block += count
        table[row, :count] = ids.int()
        padded = torch.full((count * block_size, *tokens.shape[1:]), poison, dtype=tokens.dtype)
        padded[: tokens.shape[0]] = tokens
        pool[ids] = padded.view(count, block_size, *tokens.shape[1:])
    return pool, table


def _quantized_part(keys: list[torch.Tensor], values: list[torch.Tensor], spec: CaseSpec, gen: torch.Generator):
    """Quantize each row's whole blocks with `kv_cache.quantizer` and place them in shuffled pool blocks.

    keys, values: per row `[tokens, kv_heads, head_dim]`, tokens a multiple of qblock_size. Unused blocks hold
    code 255 and NaN scales. Returns (QuantizedKV, dequantized keys per row, dequantized values per row).
    """
    bits, block, head_dim = BITS[spec.fmt], spec.qblock_size, spec.head_dim
    counts = [k.shape[0] // block for k in keys]
    key_q = quantize_keys(torch.cat([k.view(-1, block, *k.shape[1:]) for k in keys]), bits)
    value_q = quantize_values(torch.cat([v.view(-1, block, *v.shape[1:]) for v in values]), bits, spec.value_group)
    num_blocks = sum(counts) + 2  # two spare blocks never referenced
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(keys), max([*counts, 1])), num_blocks + 7, dtype=torch.int32)  # junk past the end
    starts = [sum(counts[:row]) for row in range(len(keys))]
    for row, (start, count) in enumerate(zip(starts, counts, strict=True)):
        table[row, :count] = order[start : start + count].int()
    fields = {}
    for name, quantized in (("key", key_q), ("value", value_q)):
        for stat, tensor in zip(("codes", "scale", "zero"), quantized, strict=True):
            pool = torch.full((num_blocks, *tensor.shape[1:]), 255 if stat == "codes" else float("nan"))
            pool = pool.to(tensor.dtype)
            pool[order[: sum(counts)]] = tensor
            fields[f"{name}_{stat}"] = pool
    lens = torch.tensor([k.shape[0] for k in keys], dtype=torch.int32)
    part = QuantizedKV(**fields, block_table=table, seq_lens=lens)
    deq_k = dequantize_keys(*key_q, head_dim).flatten(0, 1).split([c * block for c in counts])
    deq_v = dequantize_values(*value_q, head_dim).flatten(0, 1).split([c * block for c in counts])
    return part, list(deq_k), list(deq_v)


def make_case(spec: CaseSpec, device: str = "cpu") -> Case:
    """Random query and paged K/V for `spec` (unused pool slots poisoned with NaN), with their dense fp64 twins."""
    gen = torch.Generator().manual_seed(spec.seed)
    dtype = FLOAT_FORMATS.get(spec.fmt, spec.dtype)
    shape = (spec.kv_heads, spec.head_dim)
    keys = [torch.randn((n, *shape), generator=gen).to(dtype) for n in spec.lengths]
    values = [torch.randn((n, *shape), generator=gen).to(dtype) for n in spec.lengths]
    quant_lens = [n // spec.qblock_size * spec.qblock_size if spec.fmt in BITS else 0 for n in spec.lengths]
    part = None
    dense_k, dense_v = keys, values
    if spec.fmt in BITS:
        part, deq_k, deq_v = _quantized_part(
            [k[:q] for k, q in zip(keys, quant_lens, strict=True)],
            [v[:q] for v, q in zip(values, quant_lens, strict=True)],
            spec,
            gen,
        )
        dense_k = [torch.cat([d, k[q:].float()]) for d, k, q in zip(deq_k, keys, quant_lens, strict=True)]
        dense_v = [torch.cat([d, v[q:].float()]) for d, v, q in zip(deq_v, values, quant_lens, strict=True)]
    tails_k = [k[q:] for k, q in zip(keys, quant_lens, strict=True)]
    tails_v = [v[q:] for v, q in zip(values, quant_lens, strict=True)]
    key_cache, table = _page(tails_k, spec.block_size, torch.Generator().manual_seed(spec.seed + 1), float("nan"))
    value_cache, _ = _page(tails_v, spec.block_size, torch.Generator().manual_seed(spec.seed + 1), float("nan"))
    tail_lens = torch.tensor([t.shape[0] for t in tails_k], dtype=torch.int32)
    kv = PagedKV(key_cache, value_cache, table, tail_lens, part)
    query = torch.randn((len(spec.lengths), spec.kv_heads * spec.group, spec.q_len, spec.head_dim), generator=gen)
    case = Case(query.to(dtype), kv, _stack(dense_k), _stack(dense_v), torch.tensor(spec.lengths))
    return to_device(case, device)


def _stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows `[tokens_b, kv_heads, head_dim]` -> zero-padded `[batch, kv_heads, max_tokens, head_dim]` fp64."""
    longest = max(r.shape[0] for r in rows)
    out = torch.zeros((len(rows), longest, *rows[0].shape[1:]), dtype=torch.float64)
    for index, row in enumerate(rows):
        out[index, : row.shape[0]] = row.double()
    return out.transpose(1, 2)


def to_device(case: Case, device: str) -> Case:
    """The same case with every tensor on `device`."""
    kv = case.kv
    part = kv.quantized
    if part is not None:
        part = QuantizedKV(*(getattr(part, f).to(device) for f in part.__dataclass_fields__))
    moved = PagedKV(*(t.to(device) for t in (kv.key_cache, kv.value_cache, kv.block_table, kv.seq_lens)), part)
    return Case(case.query.to(device), moved, case.keys, case.values, case.lengths)


def dense_attention(case: Case, options: AttentionOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 softmax attention from the dense tensors, KV heads repeated (fine in a test).

    Returns the output `[batch, q_heads, q_len, head_dim]` and the mass `[batch, q_heads, seq_len]`, both fp64.
    """
    query = case.query.cpu().double()
    q_len, head_dim = query.shape[2], query.shape[3]
    group = query.shape[1] // case.keys.shape[1]
    keys = case.keys.repeat_interleave(group, dim=1)
    values = case.values.repeat_interleave(group, dim=1)
    scale = options.scale if options.scale is not None else head_dim**-0.5
    scores = query @ keys.transpose(-1, -2) * scale
    index = torch.arange(keys.shape[2])
    allowed = torch.zeros(scores.shape, dtype=torch.bool)
    for row, length in enumerate(case.lengths.tolist()):
        for i in range(q_len):
            pos = length - q_len + i
            seen = index <= pos
            if options.sliding_window is not None:
                seen &= (index > pos - options.sliding_window) | (index < options.sink_tokens)
            allowed[row, :, i] = seen
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ values, probs.mean(dim=2)


def call(
    module, case: Case, mode: str, options: AttentionOptions, with_mass: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`module.decode` (mode "decode", q_len 1) or `module.prefill`; returns the output 4-D, and the mass or None."""
    kwargs = {
        "scale": options.scale,
        "sliding_window": options.sliding_window,
        "sink_tokens": options.sink_tokens,
        "return_attention_mass": with_mass,
    }
    query = case.query[:, :, 0] if mode == "decode" else case.query
    result = (module.decode if mode == "decode" else module.prefill)(query, case.kv, **kwargs)
    output, mass = result if with_mass else (result, None)
    return output.reshape(case.query.shape), mass


def check_against_dense(
    module, case: Case, mode: str, options: AttentionOptions, tol: float | None = None, with_mass: bool = True
) -> None:
    """Compare `module`'s output (and mass) on `case` with fp64 dense attention (default tolerance by dtype)."""
    expected, expected_mass = dense_attention(case, options)
    output, mass = call(module, case, mode, options, with_mass)
    tol = tol if tol is not None else TOLERANCE[case.query.dtype]
    assert output.dtype == case.query.dtype
    torch.testing.assert_close(output.cpu().double(), expected, atol=tol, rtol=tol)
    if mass is None:
        return
    assert mass.dtype == torch.float32 and mass.shape == expected_mass.shape
    torch.testing.assert_close(mass.cpu().double(), expected_mass, atol=tol, rtol=tol)
    sums = mass.sum(dim=-1).cpu()
    has_tokens = (case.lengths > 0)[:, None].expand_as(sums)
    torch.testing.assert_close(sums[has_tokens], torch.ones_like(sums[has_tokens]), atol=1e-5, rtol=0)


def spec_for(fmt: str, mode: str, group: int, length: int, **changes) -> CaseSpec:
    """A two-row batch: `length` tokens and a longer row, with the block size of the format's leading part.

    Lengths are in units of the block that holds the oldest tokens (qblock_size for quantized formats), so
    1, block-1, block+1 and several blocks exercise partial, exact and multi-block paths of both parts.
    """
    base = CaseSpec(fmt=fmt, lengths=(1,), group=group, **changes)
    block = base.qblock_size if fmt in BITS else base.block_size
    lengths = {"1": 1, "block-1": block - 1, "block+1": block + 1, "several": 3 * block + 5}
    first = lengths[str(length)] if isinstance(length, str) else length
    second = 2 * block + 3
    q_len = 1 if mode == "decode" else min(first, second, 5)
    return replace(base, lengths=(first, second), q_len=q_len)


LENGTHS = ("1", "block-1", "block+1", "several")


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_matches_dense(fmt: str, mode: str, group: int, length: str) -> None:
    case = make_case(spec_for(fmt, mode, group, length))
    check_against_dense(reference, case, mode, AttentionOptions())


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize(("window", "sinks"), [(1, 0), (7, 0), (20, 3), (5, 40), (1000, 2)])
def test_sliding_window_and_sinks(fmt: str, mode: str, window: int, sinks: int) -> None:
    case = make_case(spec_for(fmt, mode, 4, "several", seed=3))
    check_against_dense(reference, case, mode, AttentionOptions(scale=0.3, sliding_window=window, sink_tokens=sinks))


def test_quantized_with_half_precision_tail() -> None:
    spec = replace(spec_for("int4", "prefill", 4, "several"), dtype=torch.bfloat16)
    check_against_dense(reference, make_case(spec), "prefill", AttentionOptions())


def test_empty_sequence_attends_to_nothing() -> None:
    case = make_case(CaseSpec(fmt="fp32", lengths=(0, 5)))
    output, mass = call(reference, case, "decode", AttentionOptions())
    assert torch.all(output[0] == 0) and torch.all(mass[0] == 0)
    torch.testing.assert_close(mass[1].sum(-1), torch.ones(mass.shape[1]))


@pytest.mark.parametrize("fmt", ["fp16", "int2"])
def test_inputs_are_not_mutated(fmt: str) -> None:
    case = make_case(spec_for(fmt, "prefill", 4, "several"))
    tensors = _all_tensors(case)
    before = [t.clone() for t in tensors]
    call(reference, case, "prefill", AttentionOptions(sliding_window=9, sink_tokens=2))
    for old, new in zip(before, tensors, strict=True):
        assert torch.equal(old.nan_to_num(0.5), new.nan_to_num(0.5))


def _all_tensors(case: Case) -> list[torch.Tensor]:
    kv = case.kv
    tensors = [case.query, kv.key_cache, kv.value_cache, kv.block_table, kv.seq_lens]
    if kv.quantized is not None:
        tensors += [getattr(kv.quantized, f) for f in kv.quantized.__dataclass_fields__]
    return tensors


def _kv(case: Case, **changes) -> PagedKV:
    return replace(case.kv, **changes)


def _part(case: Case, **changes) -> PagedKV:
    part = case.kv.quantized
    assert part is not None
    return replace(case.kv, quantized=replace(part, **changes))


def shape_errors() -> dict[str, object]:
    """Inputs every backend rejects before reading data: label -> f(module, int4 prefill case) that raises."""
    return {
        "query 3-D for prefill": lambda m, c: m.prefill(c.query[:, :, 0], c.kv),
        "query 4-D for decode": lambda m, c: m.decode(c.query, c.kv),
        "query int": lambda m, c: m.prefill(c.query.int(), c.kv),
        "heads not a multiple": lambda m, c: m.prefill(c.query[:, :3], c.kv),
        "head_dim mismatch": lambda m, c: m.prefill(c.query[..., :16], c.kv),
        "batch mismatch": lambda m, c: m.prefill(c.query[:1], c.kv),
        "kv not PagedKV": lambda m, c: m.prefill(c.query, (c.kv.key_cache, c.kv.value_cache)),
        "value_cache dtype": lambda m, c: m.prefill(c.query, _kv(c, value_cache=c.kv.value_cache.half())),
        "block_table float": lambda m, c: m.prefill(c.query, _kv(c, block_table=c.kv.block_table.float())),
        "seq_lens 2-D": lambda m, c: m.prefill(c.query, _kv(c, seq_lens=c.kv.seq_lens[None])),
        "key_scale fp32": lambda m, c: m.prefill(c.query, _part(c, key_scale=c.kv.quantized.key_scale.float())),
        "value groups": lambda m, c: m.prefill(c.query, _part(c, value_scale=c.kv.quantized.value_scale[..., :1])),
        "packed_dim": lambda m, c: m.prefill(c.query, _part(c, key_codes=c.kv.quantized.key_codes[..., :3])),
        "scale 0": lambda m, c: m.prefill(c.query, c.kv, scale=0.0),
        "window 0": lambda m, c: m.prefill(c.query, c.kv, sliding_window=0),
        "sinks negative": lambda m, c: m.prefill(c.query, c.kv, sink_tokens=-1),
    }


def length_errors() -> dict[str, object]:
    """Data the reference checks (it reads lengths on the host): label -> f(module, int4 prefill case)."""
    return {
        "tail longer than table": lambda m, c: m.prefill(c.query, _kv(c, seq_lens=c.kv.seq_lens + 1000)),
        "quantized not whole blocks": lambda m, c: m.prefill(c.query, _part(c, seq_lens=c.kv.quantized.seq_lens + 1)),
        "q_len over seq_len": lambda m, c: m.prefill(c.query.repeat(1, 1, 40, 1), c.kv),
        "block id out of pool": lambda m, c: m.prefill(c.query, _kv(c, block_table=c.kv.block_table + 10_000)),
    }


@pytest.mark.parametrize("label", [*shape_errors(), *length_errors()])
def test_bad_inputs_raise(label: str) -> None:
    case = make_case(spec_for("int4", "prefill", 4, "several"))
    bad = {**shape_errors(), **length_errors()}[label]
    with pytest.raises(CacheValidationError):
        bad(reference, case)


def test_dispatcher_runs_the_reference_off_cuda() -> None:
    case = make_case(spec_for("int4", "prefill", 4, "several"))
    assert attention.select_backend(case.query, case.kv) is reference
    assert attention.select_backend(case.query, case.kv, "reference") is reference
    output, mass = attention.prefill(case.query, case.kv, return_attention_mass=True)
    expected, expected_mass = reference.prefill(case.query, case.kv, return_attention_mass=True)
    assert torch.equal(output, expected) and torch.equal(mass, expected_mass)
    single = attention.decode(case.query[:, :, 0], case.kv, backend=attention.Backend.REFERENCE)
    assert torch.equal(single, reference.decode(case.query[:, :, 0], case.kv))


def test_dispatcher_rejects_unknown_backend() -> None:
    case = make_case(spec_for("fp16", "decode", 1, "1"))
    with pytest.raises(CacheValidationError, match="backend"):
        attention.decode(case.query[:, :, 0], case.kv, backend="cuda")
