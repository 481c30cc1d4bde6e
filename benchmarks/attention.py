"""Decode attention over paged K/V: our Triton kernel per block format vs torch SDPA on a contiguous bf16 cache.

Claim (DESIGN.md, PERFORMANCE.md section 3), H100, GQA 32/8, head_dim 128: bf16 paged >= 0.95x SDPA; INT4 >= 3x
SDPA at B=8, T=16k (<= 66 us); INT2 faster still. Everything is measured in one run: a device-to-device copy
(the bandwidth yardstick, bytes read + written), SDPA with `enable_gqa=True`, and our `decode` per format, with
`triton.testing.do_bench` medians (L2 flushed between repetitions). Achieved bandwidth counts the bytes a kernel
must read: K/V codes, scales, zeros and the fp tail (block tables and queries are negligible).

Before timing, each format is checked on this GPU against `attention.reference` (decode, prefill, window + sinks,
mass) on mixed odd lengths and at B=8, T=16k.

    PYTHONPATH=. python benchmarks/attention.py            # full table
    PYTHONPATH=. python benchmarks/attention.py --sweep    # also launch-parameter variants at B=8, T=16k
    PYTHONPATH=. python benchmarks/attention.py --sweep-only 32 16384 [--formats int4 int2]  # variants only
    PYTHONPATH=. python benchmarks/attention.py --prefill-only 1 2048 512 [--formats bf16 int4]  # chunked prefill
    PYTHONPATH=. python benchmarks/attention.py --profile  # one launch per format, for ncu

`--prefill-only B P C`: a chunk of C query tokens appended after P cached tokens (the chunk's own keys are the last
C tokens of the cache), our `prefill` with the default and other launch parameters vs SDPA (flash, bottom-right
causal mask) over a contiguous bf16 cache of P + C tokens, in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch
import torch.nn.functional as F
import triton
import triton.testing

from kv_cache import attention
from kv_cache.attention import triton_attention
from kv_cache.attention.paged_kv import AttentionOptions, PagedKV, QuantizedKV

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BLOCK_SIZE = 16  # full-precision pages
QBLOCK, VALUE_GROUP = 64, 64  # quantized pages (keys grouped over them), value channel groups
TAIL = 64  # full-precision tail tokens of a quantized sequence
FORMATS = ("bf16", "int8", "int4", "int2")
BITS = {"int8": 8, "int4": 4, "int2": 2}


def make_kv(fmt: str, lengths: list[int], device: str, seed: int = 0, qblock: int = QBLOCK) -> PagedKV:
    """Random paged K/V in `fmt` holding `lengths` tokens per sequence; pages shuffled across the pool.

    Quantized formats keep `qblock`-token blocks (keys grouped over a block) and a tail of up to TAIL tokens.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    batch = len(lengths)
    if fmt not in BITS:
        return _fp_part(lengths, device, gen)
    quant_lens = [max(0, n - TAIL) // qblock * qblock for n in lengths]
    kv = _fp_part([n - q for n, q in zip(lengths, quant_lens, strict=True)], device, gen)
    per_row = max(1, max(quant_lens) // qblock)
    num_blocks = batch * per_row
    packed = HEAD_DIM * BITS[fmt] // 8
    codes = (num_blocks, qblock, KV_HEADS, packed)
    groups = HEAD_DIM // VALUE_GROUP

    def stats(*shape: int, low: float, high: float) -> torch.Tensor:
        return (torch.rand(shape, device=device, generator=gen) * (high - low) + low).half()

    levels = 2 ** BITS[fmt] - 1
    part = QuantizedKV(
        key_codes=torch.randint(0, 256, codes, dtype=torch.uint8, device=device, generator=gen),
        key_scale=stats(num_blocks, KV_HEADS, HEAD_DIM, low=1.0 / levels, high=3.0 / levels),
        key_zero=stats(num_blocks, KV_HEADS, HEAD_DIM, low=-2.0, high=-1.0),
        value_codes=torch.randint(0, 256, codes, dtype=torch.uint8, device=device, generator=gen),
        value_scale=stats(num_blocks, qblock, KV_HEADS, groups, low=1.0 / levels, high=3.0 / levels),
        value_zero=stats(num_blocks, qblock, KV_HEADS, groups, low=-2.0, high=-1.0),
        block_table=torch.randperm(num_blocks, device=device, generator=gen).view(batch, per_row).int(),
        seq_lens=torch.tensor(quant_lens, dtype=torch.int32, device=device),
    )
    return dataclasses.replace(kv, quantized=part)


def _fp_part(lengths: list[int], device: str, gen: torch.Generator) -> PagedKV:
    per_row = max(1, math.ceil(max(lengths) / BLOCK_SIZE))
    num_blocks = len(lengths) * per_row
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return PagedKV(
        key_cache=torch.randn(shape, device=device, generator=gen, dtype=torch.bfloat16),
        value_cache=torch.randn(shape, device=device, generator=gen, dtype=torch.bfloat16),
        block_table=torch.randperm(num_blocks, device=device, generator=gen).view(len(lengths), per_row).int(),
        seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
    )


def bytes_read(fmt: str, lengths: list[int]) -> int:
    """Bytes a decode step must read for these sequences (K and V)."""
    if fmt not in BITS:
        return sum(2 * n * KV_HEADS * HEAD_DIM * 2 for n in lengths)
    total = 0
    for n in lengths:
        quant = max(0, n - TAIL) // QBLOCK * QBLOCK
        codes = quant * KV_HEADS * HEAD_DIM * BITS[fmt] // 8
        key_stats = quant // QBLOCK * KV_HEADS * HEAD_DIM * 4
        value_stats = quant * KV_HEADS * (HEAD_DIM // VALUE_GROUP) * 4
        total += 2 * codes + key_stats + value_stats + 2 * (n - quant) * KV_HEADS * HEAD_DIM * 2
    return total


def _describe(error: BaseException) -> str:
    """The error and its causes, innermost last (compiler errors nest the real message)."""
    parts: list[str] = []
    cause: BaseException | None = error
    while cause is not None and len(parts) < 4:
        parts.append(f"{type(cause).__name__}: {str(cause)[-600:]}")
        cause = cause.__cause__ or cause.__context__
    return " <- ".join(parts)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def check_correctness(device: str) -> bool:
    """Triton vs reference on this GPU for every format; prints the relative errors. True if all pass."""
    ok = True
    cases = [("mixed", [1, 63, 65, 1000, 4097]), ("B8 T16k", [16384] * 8)]
    print("correctness vs attention.reference (relative L2 error; pass < 1e-2)")
    for fmt in FORMATS:
        for label, lengths in cases:
            try:
                errors = _errors(fmt, lengths, device, extra=label == "mixed")
            except Exception as error:  # report and go on: timing the other formats is still worth it
                errors = {"failed": float("inf")}
                print(f"  {fmt:5s} {label:8s} {_describe(error)}")
            ok &= all(e < 1e-2 for e in errors.values())
            print(f"  {fmt:5s} {label:8s} " + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    return ok


def _errors(fmt: str, lengths: list[int], device: str, extra: bool) -> dict[str, float]:
    kv = make_kv(fmt, lengths, device, seed=1)
    query = torch.randn(len(lengths), Q_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    errors = {"decode": relative_error(attention.decode(query, kv, backend="triton"), _reference(query, kv))}
    if extra:
        errors.update(_extra_checks(query, kv))
    return errors


def _reference(query: torch.Tensor, kv: PagedKV) -> torch.Tensor:
    return attention.decode(query, kv, backend="reference")


def _extra_checks(query: torch.Tensor, kv: PagedKV) -> dict[str, float]:
    """Window + sinks with mass on `kv`, and a 37-token prefill on longer sequences of the same format."""
    window = {"sliding_window": 300, "sink_tokens": 4}
    out, mass = attention.decode(query, kv, return_attention_mass=True, backend="triton", **window)
    ref, ref_mass = attention.decode(query, kv, return_attention_mass=True, backend="reference", **window)
    fmt = "bf16" if kv.quantized is None else {8: "int8", 4: "int4", 2: "int2"}[kv.quantized.bits]
    long_kv = make_kv(fmt, [100, 1000, 4097], str(query.device), seed=2)
    prefill_q = torch.randn(3, Q_HEADS, 37, HEAD_DIM, device=query.device, dtype=query.dtype)
    return {
        "window": relative_error(out, ref),
        "mass": relative_error(mass, ref_mass),
        "prefill": relative_error(
            attention.prefill(prefill_q, long_kv, backend="triton"),
            attention.prefill(prefill_q, long_kv, backend="reference"),
        ),
    }


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus written (1 GiB each way)."""
    src = torch.empty(2**28, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3
    return 2 * src.numel() * 4 / seconds


def _bench(fn) -> tuple[float, float]:
    """Median us of `fn`: eager (`do_bench`, L2 flushed; includes host launch overhead where it exceeds the
    flush) and replayed from a CUDA graph (`do_bench_cudagraph`: kernel time without host overhead; L2 not
    flushed, so caches of <= 50 MB can stay resident, for SDPA and ours alike)."""
    eager = triton.testing.do_bench(fn, return_mode="median")
    graph = triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return 1e3 * eager, 1e3 * graph


def time_sdpa(batch: int, seq_len: int, device: str) -> tuple[float, float]:
    """SDPA decode on a contiguous bf16 cache [batch, kv_heads, seq_len, head_dim]: (eager, graph) us."""
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, KV_HEADS, seq_len, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return _bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def time_ours(fmt: str, batch: int, seq_len: int, device: str, config=None, qblock: int = QBLOCK):
    """Our `decode` (or `launch` with the launch parameters `config`): (eager, graph) us."""
    kv = make_kv(fmt, [seq_len] * batch, device, qblock=qblock)
    query = torch.randn(batch, Q_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    if config is None:
        return _bench(lambda: attention.decode(query, kv))
    query4, options = query.unsqueeze(2), AttentionOptions()
    return _bench(lambda: triton_attention.launch(query4, kv, options, config))


def run_table(device: str, copy_bw: float) -> list[str]:
    """Rows per (B, T, kernel). us: graph replay (kernel time); GB/s, % copy and vs SDPA from it; eager us last."""
    rows = [f"copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s"]
    rows.append(f"{'B':>3} {'T':>6} {'kernel':6} {'us':>8} {'GB/s':>7} {'% copy':>6} {'vs SDPA':>8} {'eager us':>9}")
    for batch in (1, 8, 32):
        for seq_len in (4096, 16384, 32768):
            sdpa = time_sdpa(batch, seq_len, device)
            torch.cuda.empty_cache()
            rows.append(_row(batch, seq_len, "sdpa", sdpa, bytes_read("bf16", [seq_len] * batch), copy_bw, sdpa[1]))
            for fmt in FORMATS:
                try:
                    ours = time_ours(fmt, batch, seq_len, device)
                except Exception as error:  # one failing format must not end the run
                    ours = (float("nan"), float("nan"))
                    print(f"{fmt} B={batch} T={seq_len}: {_describe(error)}")
                torch.cuda.empty_cache()
                rows.append(_row(batch, seq_len, fmt, ours, bytes_read(fmt, [seq_len] * batch), copy_bw, sdpa[1]))
            print("\n".join(rows[-5:]), flush=True)
    return rows


def _row(batch: int, seq_len: int, name: str, us: tuple, nbytes: int, copy_bw: float, sdpa: float) -> str:
    eager, graph = us
    rate = nbytes / (graph * 1e-6)
    return (
        f"{batch:>3} {seq_len:>6} {name:6} {graph:8.1f} {rate / 1e9:7.0f} {100 * rate / copy_bw:6.1f} "
        f"{sdpa / graph:7.2f}x {eager:9.1f}"
    )


def sweep(device: str, batch: int = 8, seq_len: int = 16384, formats: tuple[str, ...] = FORMATS) -> list[str]:
    """Launch-parameter variants at one shape (errors, e.g. a compiler crash, are reported and skipped)."""
    sdpa = time_sdpa(batch, seq_len, device)[1]
    rows = [f"variants at B={batch}, T={seq_len} (graph-replay us; SDPA {sdpa:.1f}): the default first, then changes"]
    for fmt in formats:
        kv = make_kv(fmt, [seq_len] * batch, device)
        query = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16)
        base = triton_attention.choose_config(query, kv)
        for change, qblock in _variants(fmt, base):
            config = dataclasses.replace(base, **change)

            def measure(config=config, qblock=qblock) -> str:
                eager, graph = time_ours(fmt, batch, seq_len, device, config, qblock)  # noqa: B023
                return f"{graph:8.1f} (eager {eager:6.1f})  qblock {qblock}"

            rows.append(_variant_row(fmt, config, measure))
        torch.cuda.empty_cache()
    return rows


def prefill_sweep(device: str, batch: int, prefix: int, chunk: int, formats: tuple[str, ...]) -> list[str]:
    """Chunked prefill: graph-replay us of SDPA and of our `prefill` per format and launch-parameter variant."""
    from torch.nn.attention.bias import causal_lower_right

    total = prefix + chunk
    query = torch.randn(batch, Q_HEADS, chunk, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, KV_HEADS, total, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = causal_lower_right(chunk, total)
    sdpa = _bench(lambda: F.scaled_dot_product_attention(query, k, v, attn_mask=mask, enable_gqa=True))[1]
    rows = [f"prefill B={batch}, {chunk} query tokens after {prefix} cached (graph-replay us): SDPA {sdpa:.1f}"]
    options = AttentionOptions()
    for fmt in formats:
        kv = make_kv(fmt, [total] * batch, device)
        base = triton_attention.choose_config(query, kv)
        changes: list[dict] = [{}]
        for block_m in (16, 64, 128):
            for warps in (4, 8):
                for splits in (1, 2):
                    change = {"block_m": block_m, "num_warps": warps}
                    change["quant_splits" if fmt in BITS else "tail_splits"] = splits
                    changes.append(change)
        for change in changes:
            config = dataclasses.replace(base, **change)

            def measure(config=config) -> str:
                us = _bench(lambda: triton_attention.launch(query, kv, options, config))[1]  # noqa: B023
                return f"{us:8.1f}  {sdpa / us:5.2f}x SDPA"

            rows.append(_variant_row(fmt, config, measure))
        torch.cuda.empty_cache()
    return rows


def _variant_row(fmt: str, config: triton_attention.KernelConfig, measure) -> str:
    """`measure()`'s timing text for one launch-parameter variant, printed as it comes; an error (e.g. a compiler
    crash) is reported instead, so that one bad variant does not end the run."""
    try:
        row = f"  {fmt:5s} {measure()}  {config}"
    except Exception as error:
        row = f"  {fmt:5s}   failed  {config}: {_describe(error)}"
    print(row, flush=True)
    return row


def _variants(fmt: str, base: triton_attention.KernelConfig) -> list[tuple[dict, int]]:
    """(config changes, quantized block size) to try."""
    if fmt not in BITS:
        changes: list[dict] = [{}, {"num_stages": 3}, {"num_stages": 4}, {"tile_n": 128}, {"tile_n": 32}]
        changes += [{"tail_splits": splits} for splits in (1, 2, 4, 6, 8) if splits != base.tail_splits]
        changes += [{"num_warps": 8}, {"num_warps": 8, "tile_n": 128}, {"num_warps": 2}]
        return [(change, QBLOCK) for change in changes]
    changes = [{}, {"num_stages": 3}, {"quant_splits": base.quant_splits * 2}]
    changes += [{"quant_splits": max(1, base.quant_splits * 2 // 3)}, {"tile_n": 32}, {"tile_n": 64}]
    changes += [{"tile_n": 32, "num_stages": 3}, {"tile_n": 32, "quant_splits": max(1, base.quant_splits // 2)}]
    variants = [(change, QBLOCK) for change in changes]
    return [*variants, ({}, 128)] if fmt == "int4" else variants


def profile(device: str) -> None:
    """Two single decode launches per format at B=8, T=16k, all formats warmed up first (for ncu)."""
    inputs = []
    for fmt in FORMATS:
        kv = make_kv(fmt, [16384] * 8, device)
        query = torch.randn(8, Q_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        attention.decode(query, kv)  # compile: the first launch of each format
        inputs.append((query, kv))
    for query, kv in inputs:
        attention.decode(query, kv)
    torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-only", nargs=2, type=int, metavar=("B", "T"), help="only the sweep, at B, T")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=["bf16"], help="formats --sweep-only tries")
    parser.add_argument("--prefill-only", nargs=3, type=int, metavar=("B", "P", "C"), help="chunked prefill sweep")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    device = "cuda"
    if args.profile:
        profile(device)
        return 0
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if args.prefill_only:
        print("\n".join(prefill_sweep(device, *args.prefill_only, formats=tuple(args.formats))))
        return 0
    if args.sweep_only:
        print("\n".join(sweep(device, *args.sweep_only, formats=tuple(args.formats))))
        return 0
    ok = check_correctness(device)
    copy_bw = copy_bandwidth(device)
    rows = run_table(device, copy_bw)
    if args.sweep:
        rows += sweep(device)
    print("\n".join(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
