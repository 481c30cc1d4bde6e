"""Bytes per token and tokens per GiB of each block format, read off real allocated pools.

For a Llama-1B-shaped cache (16 layers, 8 KV heads, head_dim 128, bf16 model), each format's pool is allocated
with `memory_budget_mb=1024` and its tensors' bytes are summed (codes, scales and zero points all counted), so
the numbers are the memory the cache really holds, not arithmetic. Targets (issue 3): INT4 <= 0.30x and INT2
<= 0.18x of bf16 bytes per token, scales included.

Run: python benchmarks/memory.py [--out benchmarks/results/memory.txt]
"""

from __future__ import annotations

import argparse
import sys

import torch

from kv_cache import KVCacheConfig, KVStore

LAYERS, HEADS, DIM = 16, 8, 128
FORMATS = [
    ("bf16", {}),
    ("INT8", {"use_quantization": True, "quantization_bits": 8}),
    ("INT4", {"use_quantization": True, "quantization_bits": 4}),
    ("INT2", {"use_quantization": True, "quantization_bits": 2}),
]


def measure(options: dict[str, object]) -> dict[str, float]:
    """Allocate a 1 GiB store for one sequence; return bytes/token and tokens that fit, from the real tensors."""
    config = KVCacheConfig(memory_budget_mb=1024, max_tokens=10**7, device="cpu", **options)  # type: ignore[arg-type]
    store = KVStore(config, num_layers=LAYERS)
    store.initialize(HEADS, DIM, torch.bfloat16, torch.device("cpu"), batch_size=1)
    steady = store.quantized_pool or store.pool
    assert steady is not None and store.pool is not None
    real = sum(t.numel() * t.element_size() for layer in steady.layers for t in layer.tensors())
    per_token = real / (steady.num_blocks * steady.block_size)
    tail_tokens = store.pool.num_blocks * store.pool.block_size if store.quantized_pool else 0
    pools = [pool for pool in (store.pool, store.quantized_pool) if pool is not None]
    total = sum(t.numel() * t.element_size() for pool in pools for blocks in pool.layers for t in blocks.tensors())
    return {
        "bytes_per_token": per_token,
        "block_size": steady.block_size,
        "tokens": steady.num_blocks * steady.block_size + (config.residual_tokens if store.quantized_pool else 0),
        "tail_tokens": tail_tokens,
        "pool_mib": total / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = {name: measure(options) for name, options in FORMATS}
    base = rows["bf16"]["bytes_per_token"]
    lines = [
        f"command: python {' '.join(sys.argv)}",
        f"cache shape: {LAYERS} layers x {HEADS} KV heads x head_dim {DIM}, bf16 model; default group sizes "
        "(keys: one block of 64 tokens per channel; values: 64 channels per token); pools allocated for real",
        f"{'format':<6} {'block':>6} {'bytes/token':>12} {'vs bf16':>8} {'tokens in 1 GiB':>16} {'pool MiB':>9}",
    ]
    for name, row in rows.items():
        lines.append(
            f"{name:<6} {row['block_size']:>6} {row['bytes_per_token']:>12.0f} {row['bytes_per_token'] / base:>7.3f}x "
            f"{row['tokens']:>16,} {row['pool_mib']:>9.1f}"
        )
    lines.append(
        "tokens in 1 GiB: sealed blocks that fit after the full-precision tail pool (one sequence's window of "
        "128 tokens, plus blocks being filled/sealed), plus that window"
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
