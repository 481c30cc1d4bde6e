"""Append tokens one at a time: our paged store vs Hugging Face's DynamicCache vs a bare preallocated copy.

Batch 1, 8 KV heads, head_dim 128, fp32, CPU. Rows per length T (1k, 4k, 8k):
  - bare copy        : `buf[:, :, t].copy_(k)` into a preallocated [1, H, T, D] buffer (the floor)
  - ours append      : `KVStore.append` (find/allocate the slot, copy in)
  - ours append+read : append, then `KVStore.read` of everything attention needs at this step (one sequence in
                       a fresh pool gets consecutive blocks, so the read is a zero-copy view of the pool)
  - ours, scattered  : the same with the pool's free list shuffled first (as after churn): the read gathers
  - DynamicCache     : `DynamicLayer.update` (torch.cat: append and read are one operation)
Per-token cost is reported for the first and the last 10% of appends, to show whether it grows with T.

Run: python benchmarks/append.py [--lengths 1024 4096 8192] [--out benchmarks/results/append.txt]
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer

from kv_cache import KVCacheConfig, KVStore

HEADS, DIM = 8, 128


def timed(steps: int, step: Callable[[int], object]) -> tuple[float, float, float]:
    """Run `step(t)` for t in range(steps); return total seconds and mean us/token of the first and last 10%."""
    marks = []
    start = time.perf_counter()
    for t in range(steps):
        step(t)
        marks.append(time.perf_counter())
    tenth = max(1, steps // 10)
    first = (marks[tenth - 1] - start) / tenth * 1e6
    last = (marks[-1] - marks[-tenth - 1]) / tenth * 1e6
    return marks[-1] - start, first, last


def run_length(length: int, keys: torch.Tensor, values: torch.Tensor) -> dict[str, tuple[float, float, float]]:
    """keys/values: [length, 1, HEADS, 1, DIM] fp32, one new token per step."""
    results = {}
    buf_k, buf_v = torch.zeros(1, HEADS, length, DIM), torch.zeros(1, HEADS, length, DIM)

    def bare(t: int) -> None:
        buf_k[:, :, t : t + 1].copy_(keys[t])
        buf_v[:, :, t : t + 1].copy_(values[t])

    results["bare copy"] = timed(length, bare)

    rows = (("ours append", False, False), ("ours append+read", True, False), ("ours, scattered", True, True))
    for name, read, scattered in rows:
        store = KVStore(KVCacheConfig(max_tokens=length, device="cpu"), num_layers=1)
        store.initialize(HEADS, DIM, torch.float32, torch.device("cpu"), batch_size=1)
        if scattered and store.pool is not None:
            taken = store.pool.allocate(store.pool.num_free)
            random.Random(0).shuffle(taken)
            store.pool.release(taken)
        seq = [store.add_sequence()]

        def ours(t: int, store: KVStore = store, seq: list[int] = seq, read: bool = read) -> None:
            store.append(seq, 0, keys[t], values[t])
            if read:
                store.read(seq, 0)

        results[name] = timed(length, ours)

    layer = DynamicLayer()
    results["DynamicCache"] = timed(length, lambda t: layer.update(keys[t], values[t]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [
        f"command: python {' '.join(sys.argv)}",
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; batch 1, {HEADS} KV heads, head_dim {DIM}, fp32, CPU",
        f"{'T':>6} {'method':<18} {'total ms':>10} {'us/tok first10%':>16} {'us/tok last10%':>15} "
        f"{'vs bare':>8} {'DynamicCache/this':>18}",
    ]
    for length in args.lengths:
        keys = torch.randn(length, 1, HEADS, 1, DIM)
        values = torch.randn(length, 1, HEADS, 1, DIM)
        results = run_length(length, keys, values)
        bare_total = results["bare copy"][0]
        dynamic_total = results["DynamicCache"][0]
        for name, (total, first, last) in results.items():
            lines.append(
                f"{length:>6} {name:<18} {total * 1e3:>10.1f} {first:>16.2f} {last:>15.2f} "
                f"{total / bare_total:>7.2f}x {dynamic_total / total:>17.1f}x"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
