"""Attention-output error of quantized KV: kv_cache's KIVI-style INT8/INT4/INT2 beside HF `QuantizedCache` (quanto).

Metric: one decode step's attention output, `||softmax(q K^T / sqrt(d)) V - exact|| / ||exact||` (Frobenius norm
over all query heads and query vectors), where `exact` uses the unquantized bf16 K/V in fp32 math.

Data (synthetic, seeded): bf16 keys `N(0, 1)` plus a per-channel offset, with `--outliers` (default 4) channels per
KV head scaled x10-x50 (the channel outliers KIVI reports, and the reason keys are grouped per channel); values
`N(0, 1)`; queries `N(0, 0.25)`, GQA `--gqa` query heads per KV head, `--queries` query vectors per head.

Methods, each with a full-precision window of the newest tokens (`--windows`; the current token is always exact):
- kv_cache: keys per (head, channel) over `--block-size`-token blocks, values per token over `--group-size` channels,
  fp16 scale + zero (kv_cache/quantizer.py), dequantized from the stored bytes.
- HF `QuantizedCache(backend="quanto")` from transformers, nbits 4 and 2 (quanto has no INT8), q_group_size 64:
  with its default axes (`axis_key=axis_value=0`: groups of 64 consecutive elements of a token, for K and V) and
  with `axis_key=-1` (keys grouped per channel). Prefill of T - window tokens, then one update of `window` tokens
  (at least 1): the keys/values it returns are what attention reads at that step.

Run in a venv that has optimum-quanto (see benchmarks/results/quant_quality.txt for the command); without it the HF
rows say why they are missing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from kv_cache.quantizer import Quantizer

Dequantizer = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def synthetic_kv(args: argparse.Namespace, tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    """keys, values `[kv_heads, tokens, head_dim]` bf16; queries `[kv_heads, gqa * queries, head_dim]` fp32."""
    kv_heads, head_dim, gen = args.kv_heads, args.head_dim, torch.Generator().manual_seed(seed)
    keys = torch.randn(kv_heads, tokens, head_dim, generator=gen) + torch.randn(kv_heads, 1, head_dim, generator=gen)
    for head in range(kv_heads):
        channels = torch.randperm(head_dim, generator=gen)[: args.outliers]
        keys[head, :, channels] *= torch.empty(args.outliers).uniform_(10, 50, generator=gen)
    values = torch.randn(kv_heads, tokens, head_dim, generator=gen)
    query = 0.5 * torch.randn(kv_heads, args.gqa * args.queries, head_dim, generator=gen)
    return keys.bfloat16(), values.bfloat16(), query


def attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """fp32 GQA attention. query `[kv_heads, rows, d]`, keys/values `[kv_heads, tokens, d]` -> `[kv_heads, rows, d]`."""
    scores = query @ keys.float().transpose(-1, -2) / keys.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ values.float()


def ours(bits: int, block_size: int, group_size: int) -> Dequantizer:
    """kv_cache's path: seal `block_size`-token blocks, quantize, dequantize from the stored codes and fp16 stats."""
    quantizer = Quantizer(bits=bits, group_size=group_size)

    def run(keys: torch.Tensor, values: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = keys.shape[-1]
        # [kv_heads, tokens, d] -> the pool layout [num_blocks, block_size, kv_heads, d]
        blocks = [t.transpose(0, 1).unflatten(0, (-1, block_size)) for t in (keys, values)]
        deq_k = quantizer.dequantize_keys(*quantizer.quantize_keys(blocks[0]), head_dim)
        deq_v = quantizer.dequantize_values(*quantizer.quantize_values(blocks[1]), head_dim)
        deq = [t.flatten(0, 1).transpose(0, 1) for t in (deq_k, deq_v)]
        return keep_window(deq[0], keys, window), keep_window(deq[1], values, window)

    return run


def keep_window(quantized: torch.Tensor, exact: torch.Tensor, window: int) -> torch.Tensor:
    """The newest `max(window, 1)` tokens (dim -2) exact, the rest as dequantized; fp32."""
    out = quantized.float().clone()
    out[..., -max(window, 1) :, :] = exact[..., -max(window, 1) :, :].float()
    return out


def hf_quanto(bits: int, group_size: int, axis_key: int) -> Dequantizer:
    """HF QuantizedCache with the quanto backend; returns what its `update` hands to attention at the decode step."""
    from transformers import LlamaConfig, QuantizedCache

    def run(keys: torch.Tensor, values: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv_heads, tokens, head_dim = keys.shape
        config = LlamaConfig(
            num_hidden_layers=1, num_attention_heads=kv_heads, num_key_value_heads=kv_heads, head_dim=head_dim
        )
        residual = max(window, 1)  # HF's residual window: the update that fills it returns it exact
        cache = QuantizedCache("quanto", config, nbits=bits, axis_key=axis_key, q_group_size=group_size)
        split = tokens - residual
        cache.update(keys[None, :, :split], values[None, :, :split], 0)
        k, v = cache.update(keys[None, :, split:], values[None, :, split:], 0)
        return k[0].float(), v[0].float()

    return run


def relative_error(method: Dequantizer, data: tuple[torch.Tensor, ...], window: int) -> float:
    keys, values, query = data
    exact = attention(query, keys, values)
    deq_k, deq_v = method(keys, values, window)
    return float((attention(query, deq_k, deq_v) - exact).norm() / exact.norm())


def methods(args: argparse.Namespace) -> tuple[dict[str, dict[int, Dequantizer]], str]:
    """{row label: {bits: method}} and a note on HF's availability."""
    table: dict[str, dict[int, Dequantizer]] = {
        "kv_cache (K per channel / block, V per token)": {
            b: ours(b, args.block_size, args.group_size) for b in (8, 4, 2)
        }
    }
    try:
        version = importlib.metadata.version("optimum-quanto")
        import optimum.quanto  # noqa: F401
    except Exception as error:  # any failure to import means "not measured", said in the output
        return table, f"HF QuantizedCache(quanto): NOT MEASURED, optimum-quanto cannot be imported ({error!r})"
    for axis_key, label in (
        (0, "HF quanto, default axes (K, V per token)"),
        (-1, "HF quanto, axis_key=-1 (K per ch.)"),
    ):
        table[label] = {b: hf_quanto(b, args.group_size, axis_key) for b in (4, 2)}
    return table, f"optimum-quanto {version}"


def cell(method: Dequantizer | None, seeds: list, window: int, failures: list[str]) -> str:
    """`mean (max)` relative error over the seeds; `n/a` where the method has no such width, `failed[i]` on error."""
    if method is None:
        return f"{'n/a':>18}"
    try:
        errors = [relative_error(method, data, window) for data in seeds]
    except Exception as error:  # HF/quanto shape limits: reported in the table, not hidden
        failures.append(f"{type(error).__name__}: {error}")
        return f"{f'failed[{len(failures)}]':>18}"
    return f"{statistics.mean(errors):>10.5f} ({max(errors):.4f})"


def measure(args: argparse.Namespace, table: dict[str, dict[int, Dequantizer]], tokens: int) -> list[str]:
    """Table lines for one sequence length: mean (max) relative error over seeds, per method, window and width."""
    seeds = [synthetic_kv(args, tokens, seed) for seed in range(args.seeds)]
    peak = statistics.mean(
        float(torch.softmax(q @ k.float().mT / args.head_dim**0.5, -1).amax(-1).mean()) for k, _, q in seeds
    )
    header = f"{'method':46} {'window':>6}" + "".join(f"{f'INT{b}':>18}" for b in (8, 4, 2))
    lines, failures = [f"tokens={tokens} (mean top attention weight {peak:.3f})", header], list[str]()
    for label, by_bits in table.items():
        for window in args.windows:
            cells = "".join(cell(by_bits.get(bits), seeds, window, failures) for bits in (8, 4, 2))
            lines.append(f"{label:46} {window:>6}{cells}")
    return lines + [f"  [{i}] {message}" for i, message in enumerate(failures, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 128])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--outliers", type=int, default=4, help="outlier key channels per KV head, scaled x10-x50")
    parser.add_argument("--gqa", type=int, default=4)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    table, hf_note = methods(args)
    versions = f"torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}, {hf_note}"
    command = shlex.join([sys.executable, *sys.argv])
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={os.environ['PYTHONPATH']} {command}"
    lines = [
        f"$ {command}",
        versions,
        f"{vars(args)}",
        "relative error of the attention output: mean over seeds (max)",
        "",
    ]
    for tokens in args.tokens:
        lines += [*measure(args, table, tokens), ""]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
