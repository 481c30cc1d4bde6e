"""The `kv-cache` commands: each takes parsed arguments and returns a JSON-able result dict (see `cli`)."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kv_cache import plots
from kv_cache.block_format import BlockFormat
from kv_cache.config import CacheStrategy, KVCacheConfig
from kv_cache.fidelity import QUICK_PLAN, FidelityPlan, FidelityRow, default_configs, evaluate, format_table
from kv_cache.hf_attention import register_attention
from kv_cache.hf_cache import KVCache
from kv_cache.reference_model import decode, encode, heldout_text, load_reference_model

console = Console(width=140)
DEMO_PROMPT_BYTES = 1200
DEMO_NEW_TOKENS = 160


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (argparse reports anything else as a usage error, exit code 2)."""
    return _bounded(text, int, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an int >= 0."""
    return _bounded(text, int, 0)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = _bounded(text, float, 0)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def _bounded(text: str, kind: type, low: float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low:
        what = "an int" if kind is int else "a finite number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} >= {low:g}")
    return value


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    """Flags that build a `KVCacheConfig` (see `config_from_args`)."""
    group = parser.add_argument_group("cache")
    group.add_argument("--bits", type=int, choices=(0, 2, 4, 8), default=0, help="quantize at 2/4/8 bits; 0: off")
    group.add_argument(
        "--residual-tokens", type=non_negative_int, default=64, help="newest tokens kept in full precision"
    )
    group.add_argument("--block-size", type=int, default=None, help="tokens per block (default 16, 64 quantized)")
    group.add_argument("--max-tokens", type=int, default=4096, help="tokens one sequence may hold")
    group.add_argument("--token-budget", type=int, default=None, help="evict down to this many tokens per layer")
    group.add_argument("--compression-ratio", type=float, default=None, help="evict this fraction of tokens")
    group.add_argument("--strategy", choices=[s.value for s in CacheStrategy], default="lru", help="eviction policy")
    group.add_argument("--sink-tokens", type=int, default=4, help="first tokens never evicted")


def config_from_args(args: argparse.Namespace) -> KVCacheConfig:
    return KVCacheConfig(
        max_tokens=args.max_tokens,
        block_size=args.block_size,
        use_quantization=args.bits > 0,
        quantization_bits=args.bits or 4,
        residual_tokens=args.residual_tokens,
        token_budget=args.token_budget,
        compression_ratio=args.compression_ratio,
        cache_strategy=args.strategy,
        sink_tokens=args.sink_tokens if args.token_budget or args.compression_ratio else 0,
    )


@torch.no_grad()
def stream_greedy(model: Any, cache: KVCache, prompt: torch.Tensor, count: int) -> dict[str, Any]:
    """Greedy-decode `count` tokens after `prompt` [tokens]; returns tokens, prefill seconds, decode tokens/s and a
    memory curve."""
    start = time.perf_counter()
    logits = model(input_ids=prompt[None], past_key_values=cache).logits[0, -1]
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens: list[int] = []
    curve: list[tuple[int, float]] = []
    for step in range(count):
        tokens.append(int(logits.argmax()))
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache).logits[0, -1]
        if step % 8 == 0 or step == count - 1:
            stats = cache.get_stats()
            curve.append((stats["tokens_seen"], stats["used_memory_mb"]))
    elapsed = time.perf_counter() - start
    stats = cache.get_stats()
    return {
        "tokens": tokens,
        "prefill_s": prefill_s,
        "tokens_per_s": count / elapsed,
        "bytes_per_token": stats["effective_bytes_per_token"],
        "memory_curve": curve,
    }


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """A code completion with the full cache and with the compressed default, side by side."""
    torch.manual_seed(0)
    model = load_reference_model()
    model.set_attn_implementation(register_attention())
    text = heldout_text()
    start = text.find("\ndef ", len(text) // 3) + 1
    prompt = encode(text[start : start + DEMO_PROMPT_BYTES], add_bos=True)
    configs = {
        "full precision": KVCacheConfig(max_tokens=4096),
        f"INT{args.bits} + {args.residual_tokens}-token window": KVCacheConfig(
            max_tokens=4096, use_quantization=True, quantization_bits=args.bits, residual_tokens=args.residual_tokens
        ),
    }
    runs = {
        name: stream_greedy(model, KVCache(config, model.config), prompt, args.new_tokens)
        for name, config in configs.items()
    }
    names = list(runs)
    reference, compressed = runs[names[0]]["tokens"], runs[names[1]]["tokens"]
    agreement = sum(a == b for a, b in zip(reference, compressed, strict=True)) / len(reference)
    plot = _plot_memory(runs, Path(args.plot)) if args.plot else None
    if not args.json:
        _print_demo(prompt, runs, agreement)
        console.print(f"memory plot: {plot}" if plot else "no plot written")
    return {"agreement": agreement, "plot": str(plot) if plot else None, "runs": {
        name: {k: v for k, v in run.items() if k != "memory_curve"} for name, run in runs.items()}}  # fmt: skip


def _print_demo(prompt: torch.Tensor, runs: dict[str, dict[str, Any]], agreement: float) -> None:
    console.rule("kv_cache demo: the shipped 3M-parameter byte-level Llama completes held-out Python")
    console.print(decode(prompt[-240:]), style="dim", highlight=False, markup=False)
    table = Table("cache", "prefill s", "decode tok/s", "bytes/token", "vs full", "completion (first 3 lines)")
    base = next(iter(runs.values()))["bytes_per_token"]
    for name, run in runs.items():
        first_lines = "\n".join(decode(run["tokens"]).splitlines()[:3])
        ratio = run["bytes_per_token"] / base
        table.add_row(
            name, f"{run['prefill_s']:.2f}", f"{run['tokens_per_s']:.0f}", f"{run['bytes_per_token']:.0f}",
            f"{ratio:.2f}x", first_lines,
        )  # fmt: skip
    console.print(table)
    console.print(
        f"greedy agreement with the full cache: {agreement:.1%} of {len(next(iter(runs.values()))['tokens'])} tokens"
    )


def _plot_memory(runs: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Memory in use against tokens seen, one line per run (None and a note when matplotlib is missing)."""
    if plots.pyplot() is None:
        console.print("matplotlib is not installed (pip install 'kv-cache-engine[plots]'): no plot written")
        return None
    curves = {name: plots.columns(run["memory_curve"]) for name, run in runs.items()}
    axes = ("tokens in the sequence", "KV blocks in use (MiB)")
    plots.save(plots.lines("KV cache memory", axes, curves), path)
    return path


def run_generate(args: argparse.Namespace) -> dict[str, Any]:
    """Stream a greedy completion of `prompt` with the shipped model (or a local byte-level checkpoint)."""
    model = load_reference_model(args.model)
    model.set_attn_implementation(register_attention())
    cache = KVCache(config_from_args(args), model.config)
    prompt = encode(args.prompt, add_bos=True)
    result = stream_greedy(model, cache, prompt, args.max_new_tokens)
    if not args.json:
        console.print(args.prompt + decode(result["tokens"]), highlight=False, markup=False)
        console.print(f"[dim]{result['tokens_per_s']:.0f} tokens/s, {result['bytes_per_token']:.0f} bytes/token[/dim]")
    return {"text": decode(result["tokens"]), **{k: v for k, v in result.items() if k != "memory_curve"}}


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """The fidelity table of cache configurations on the shipped model."""
    configs = default_configs()
    if args.configs:
        wanted = ["full", *[name.strip() for name in args.configs.split(",") if name.strip() != "full"]]
        unknown = [name for name in wanted if name not in configs]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown configs {unknown}; known: {sorted(configs)}")
        configs = {name: configs[name] for name in wanted}
    plan = QUICK_PLAN if args.quick else FidelityPlan()
    model = load_reference_model()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=len(configs))
        rows = evaluate(model, configs, plan, lambda name: progress.update(task, advance=1, description=name))
    table = format_table(rows)
    if not args.json:
        console.print(table, highlight=False)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.plot:
        plot_fidelity(rows, Path(args.plot))
    return {"rows": [row.__dict__ for row in rows], "plan": plan.__dict__}


def plot_fidelity(rows: list[FidelityRow], path: Path) -> None:
    """Quality (agreement, needle accuracy) against bytes per token, one point per configuration (PNG + JSON)."""
    plots.save(plots.fidelity(rows), path)


def run_inspect(args: argparse.Namespace) -> dict[str, Any]:
    """Bytes per token of each block format for a model shape, and tokens that fit in a budget."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = {}
    for name, bits in (("full", None), ("INT8", 8), ("INT4", 4), ("INT2", 2)):
        block = 16 if bits is None else 64
        layer_bits = None if bits is None else (bits,) * args.layers
        fmt = BlockFormat(block, args.layers, args.kv_heads, args.head_dim, dtype, layer_bits, args.group_size)
        rows[name] = {
            "bytes_per_token": fmt.bytes_per_token,
            "tokens": int(args.budget_mb * 2**20 // fmt.bytes_per_token),
        }
    if not args.json:
        table = Table("format", "bytes/token", "vs full", f"tokens in {args.budget_mb:g} MiB")
        for name, row in rows.items():
            ratio = row["bytes_per_token"] / rows["full"]["bytes_per_token"]
            table.add_row(name, f"{row['bytes_per_token']:,.0f}", f"{ratio:.3f}x", f"{row['tokens']:,}")
        console.print(table)
    return rows


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=int, choices=(2, 4, 8), default=4)
    parser.add_argument("--residual-tokens", type=non_negative_int, default=64)
    parser.add_argument("--new-tokens", type=positive_int, default=DEMO_NEW_TOKENS)
    parser.add_argument("--plot", default="kv_cache_demo.png", help="PNG of memory in use; '' for none")


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text to complete")
    parser.add_argument("--model", default=None, help="a save_pretrained byte-level model folder (default: shipped)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    add_cache_options(parser)


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one short window and few probes (a smoke run)")
    parser.add_argument("--configs", default="", help="comma-separated names (default: all); 'full' always runs")
    parser.add_argument("--out", default="", help="write the table to this file")
    parser.add_argument("--plot", default="", help="write a quality-vs-memory PNG here")


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=positive_int, default=16)
    parser.add_argument("--kv-heads", type=positive_int, default=8)
    parser.add_argument("--head-dim", type=positive_int, default=128)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--group-size", type=positive_int, default=64)
    parser.add_argument("--budget-mb", type=positive_float, default=1024.0)


Handler = Callable[[argparse.Namespace], dict[str, Any]]
COMMANDS: dict[str, tuple[Handler, Callable[[argparse.ArgumentParser], None], str]] = {
    "demo": (run_demo, _demo_arguments, "full vs compressed cache on the shipped model, side by side"),
    "generate": (run_generate, _generate_arguments, "stream a completion with the cache options given"),
    "eval": (run_eval, _eval_arguments, "fidelity table: perplexity, agreement, needles, bytes per token"),
    "inspect": (run_inspect, _inspect_arguments, "bytes per token and tokens per budget for a model shape"),
}
