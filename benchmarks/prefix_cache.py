"""Prefix cache: time to first token cold vs pool hit vs CPU-tier hit, its cost at 0 % hits, and hashing.

Model: the shipped reference model (byte-level Llama, 4 layers, 2 KV heads x 64, ~3M parameters), or with
`--model llama-1b` a Llama-1B-shaped one with random weights (timing only), through `KVCacheEngine` (paged
attention, block size 16). Every row is measured in this run, in this process:

1. TTFT ladder: a request of `--prefix` tokens of held-out code plus a `--suffix`-token question. *cold*: its
   prefix was never seen (prefix caching on, so hashing and lookup are paid); *pool hit*: an earlier request
   left the prefix's blocks in the device pool; *CPU-tier hit*: those blocks were demoted to the CPU tier
   first, so the hit copies them back. Each repetition uses a fresh prefix; the median is reported. Targets
   (DESIGN.md): pool hit >= 5x, CPU-tier hit >= 3x lower than cold.
2. 0 % hits: `--requests` requests with unique prompts, prefix caching on vs off (fresh engines, alternating
   runs, each engine warmed up first on as many other unique prompts); generated tokens per second (CPU seconds
   of this process on a CPU device, wall seconds on CUDA), and the time spent inside the prefix cache's
   bookkeeping (hashing, lookup, registration, release) as a share of the run. Target: <= 1 % throughput cost.
3. Hashing: BLAKE2b-128 chain hashing of a 2048-token prompt, per token. Target: <= 1 us/token.

Run: python benchmarks/prefix_cache.py [--device cpu|cuda] [--model reference|llama-1b] [--threads N]
         [--out benchmarks/results/prefix_cache.txt]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kv_cache import KVCacheConfig
from kv_cache.engine import EngineConfig, KVCacheEngine, SamplingParams
from kv_cache.prefix_cache import chain_hashes
from kv_cache.reference_model import encode, heldout_text, load_reference_model

TEXT = heldout_text()


def build_model(name: str, device: str) -> torch.nn.Module:
    """The shipped reference model, or `llama-1b`: a Llama-1B-shaped model with random bf16 weights (16 layers,
    hidden 2048, GQA 32/8, head_dim 64; timing only, its tokens mean nothing), built on `device`."""
    if name == "reference":
        return load_reference_model(device=device)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
    )  # fmt: skip
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def describe(model: torch.nn.Module) -> str:
    config = model.config  # type: ignore[union-attr]
    parameter = next(model.parameters())
    return (
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {config.num_hidden_layers} layers, GQA "
        f"{config.num_attention_heads}/{config.num_key_value_heads}, head_dim {config.head_dim}, "
        f"{str(parameter.dtype).removeprefix('torch.')}; blocks: {BLOCKS}"
    )


def window(index: int, length: int) -> list[int]:
    """`length` byte tokens of held-out code, a different stretch for each `index`."""
    start = (index * 7919) % (len(TEXT) - length)
    return encode(TEXT[start : start + length]).tolist()


GRAPHS = {"auto": None, "on": True, "off": False}
DECODE_GRAPHS: list[bool | None] = [None]  # EngineConfig.decode_graphs of every engine built here (--graphs)
BLOCKS: dict[str, Any] = {"block_size": 16}  # the block format of every engine built here (--int4 changes it)
CHUNK = [2048]  # EngineConfig.prefill_chunk_size of every engine built here (--chunk)


def make_engine(model: torch.nn.Module, num_blocks: int, max_tokens: int = 4096, **engine: Any) -> KVCacheEngine:
    config = KVCacheConfig(num_blocks=num_blocks, max_tokens=max_tokens, **BLOCKS)
    settings = {"prefill_chunk_size": CHUNK[0], "max_num_seqs": 16, "decode_graphs": DECODE_GRAPHS[0], **engine}
    return KVCacheEngine(model, config, EngineConfig(**settings))  # type: ignore[arg-type]


def time_to_first_token(engine: KVCacheEngine, prompt: list[int]) -> float:
    """Seconds from `add_request` to the first sampled token (sampling reads the logits: the device is synced)."""
    request_id = engine.add_request(prompt, SamplingParams(max_new_tokens=1))
    request = engine.get_request(request_id)
    while not request.is_done:
        engine.step()
    if request.first_token_time is None:
        raise RuntimeError(f"request {request_id} produced no token: {request.error}")
    return request.first_token_time - request.arrival_time


def hf_prefill_time(model: torch.nn.Module, args: argparse.Namespace) -> float:
    """Median seconds of one plain Hugging Face forward (SDPA, `DynamicCache`) over a cold prompt of the same
    length, outside the engine, until its token is on the host (as for TTFT): what the cold row would cost without
    the engine (context only)."""
    model.set_attn_implementation("sdpa")  # type: ignore[operator]
    times = []
    for rep in range(args.repeats + 1):
        ids = torch.tensor([window(3000 + rep, args.prefix + args.suffix)], device=args.device)
        start = time.perf_counter()
        with torch.no_grad():
            model(ids, past_key_values=DynamicCache(config=model.config), logits_to_keep=1).logits.argmax().item()
        if rep:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def ttft_ladder(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, float]:
    """Median TTFT (s) of cold, pool-hit and CPU-tier-hit requests over `args.repeats` fresh prefixes."""
    blocks = (args.prefix + args.suffix) // 16 + 4
    length = args.prefix + args.suffix
    engine = make_engine(model, num_blocks=4 * blocks, max_tokens=max(4096, length + 16), cpu_tier_blocks=4 * blocks)
    cache = engine.prefix_cache
    if cache is None:
        raise RuntimeError("prefix caching is off")
    times: dict[str, list[float]] = {"cold": [], "pool hit": [], "CPU-tier hit": []}
    for rep in range(args.repeats + 1):  # repetition 0 warms up (allocator, kernels) and is dropped
        prefix = window(1000 + rep, args.prefix)
        question = [window(2000 + 3 * rep + k, args.suffix) for k in range(3)]
        cold = time_to_first_token(engine, prefix + question[0])  # leaves the prefix's blocks cached
        pool_hit = time_to_first_token(engine, prefix + question[1])
        cache.evict(blocks)  # every evictable block goes down to the CPU tier
        if args.device == "cuda":
            torch.cuda.synchronize()  # the demotion's copies are not part of the next request's time
        tier_hit = time_to_first_token(engine, prefix + question[2])
        if rep:
            for name, value in zip(times, (cold, pool_hit, tier_hit), strict=True):
                times[name].append(value)
        cache.clear()
    promoted = cache.counters["promoted_blocks"]
    store = engine.store  # quantized: the prefix cache holds the sealed blocks, all but the bf16 window
    exact = store.config.residual_tokens if store.quantized_pool is not None else 0
    if promoted < args.repeats * ((args.prefix - exact) // store.block_size):
        raise RuntimeError(f"only {promoted} blocks were promoted: the CPU-tier hits did not all hit")
    return {name: statistics.median(values) for name, values in times.items()}


def throughput_clock(device: str) -> Callable[[], float]:
    """The clock of the 0 %-hit runs: this process's CPU time on a CPU device (other engineers' jobs on the
    shared 2-core machine then barely move it; the model runs on one thread), wall time on CUDA."""
    return time.process_time if device == "cpu" else time.perf_counter


def timed(totals: dict[str, float], function: Callable[..., Any], clock: Callable[[], float]) -> Callable[..., Any]:
    """`function`, adding its time on `clock` (s) to `totals["s"]`."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return function(*args, **kwargs)
        finally:
            totals["s"] += clock() - start

    return wrapper


def zero_hit_run(model: torch.nn.Module, args: argparse.Namespace, seed: int, caching: bool) -> tuple[float, float]:
    """(generated tokens/s, seconds inside prefix-cache bookkeeping) for unique prompts, caching on or off."""
    prompts = [window(50_000 + 100 * seed + i, 256 + 16 * (i % 8)) for i in range(args.requests)]
    engine = make_engine(model, num_blocks=args.requests * 24, enable_prefix_caching=caching, prefill_chunk_size=512)
    # Warm the fresh engine up on other unique prompts first (kernels compiled, step graphs captured; with caching
    # on, their blocks then stay cached and are evicted as the timed requests need room: the steady state).
    warm_up = [window(90_000 + 100 * seed + i, 256 + 16 * (i % 8)) for i in range(args.requests)]
    engine.generate(warm_up, SamplingParams(max_new_tokens=args.new_tokens))
    totals, clock = {"s": 0.0}, throughput_clock(args.device)
    if caching:  # the prefix cache's whole share: hashing + lookup (allocate), registration, release order
        memory = engine.memory
        memory.allocate = timed(totals, memory.allocate, clock)  # type: ignore[method-assign]
        memory.register_blocks = timed(totals, memory.register_blocks, clock)  # type: ignore[method-assign]
        memory.free = timed(totals, memory.free, clock)  # type: ignore[method-assign]
    clock = throughput_clock(args.device)
    start = clock()
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=args.new_tokens))
    elapsed = clock() - start
    if caching and engine.get_stats()["prompt_hit_tokens"]:
        raise RuntimeError("the 0 % hit run hit the prefix cache; the prompts are not unique")
    return sum(len(out) for out in outputs) / elapsed, totals["s"] / elapsed


def hashing_cost(repeats: int = 200) -> float:
    """Microseconds per token to chain-hash a 2048-token prompt (best of `repeats`)."""
    tokens = window(7, 2048)
    best = float("inf")
    for _ in range(repeats):
        keys: list[bytes] = []
        start = time.perf_counter()
        chain_hashes(b"\0" * 16, tokens, 16, keys)
        best = min(best, time.perf_counter() - start)
    return best / len(tokens) * 1e6


def report(args: argparse.Namespace, model: torch.nn.Module) -> list[str]:
    plain = hf_prefill_time(model, args)  # before any engine switches the model to paged attention
    ladder = ttft_ladder(model, args)
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for seed in range(args.throughput_repeats):
        for caching in (seed % 2 == 0, seed % 2 == 1):  # alternate which goes first
            runs[caching].append(zero_hit_run(model, args, seed, caching))
    on = statistics.median(r[0] for r in runs[True])
    off = statistics.median(r[0] for r in runs[False])
    share = statistics.median(r[1] for r in runs[True])
    cold = ladder["cold"]
    lines = [
        f"command: python {' '.join(sys.argv)}",
        f"device: {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} intra-op thread(s), {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end",
        f"model: {args.model} ({describe(model)})",
        "",
        f"1. time to first token, prefix {args.prefix} + question {args.suffix} tokens, median of {args.repeats}",
        f"{'path':<14} {'TTFT ms':>9} {'vs cold':>8}  target",
    ]
    targets = {"cold": "", "pool hit": ">= 5x", "CPU-tier hit": ">= 3x"}
    for name, seconds in ladder.items():
        lines.append(f"{name:<14} {seconds * 1e3:9.2f} {cold / seconds:7.1f}x  {targets[name]}")
    lines.append(
        f"context: one plain HF forward of a cold prompt of that length (SDPA + DynamicCache, no engine): "
        f"{plain * 1e3:.2f} ms, i.e. {cold / plain:.1f}x less than the engine's cold row"
    )
    lines += [
        "",
        f"2. prefix cache at 0 % hits: {args.requests} unique prompts of 256-368 tokens, {args.new_tokens} new tokens "
        f"each, median of {args.throughput_repeats} alternating runs",
        f"   generated tokens per {'CPU' if args.device == 'cpu' else 'wall'}-second: caching off {off:.1f}, on "
        f"{on:.1f} -> on/off {on / off:.3f} (spread off {_spread(runs[False])}, on {_spread(runs[True])})",
        f"   time inside the prefix cache (hashing, lookup, registration, release): {share * 100:.2f} % of the "
        "run  (target <= 1 %)",
        "",
        f"3. chain hashing (BLAKE2b-128), 2048-token prompt: {hashing_cost():.3f} us/token  (target <= 1 us)",
    ]
    return lines


def _spread(runs: list[tuple[float, float]]) -> str:
    values = [r[0] for r in runs]
    return f"{min(values):.1f}-{max(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["reference", "llama-1b"], default="reference")
    parser.add_argument("--prefix", type=int, default=1536)
    parser.add_argument("--suffix", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--throughput-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--graphs", choices=list(GRAPHS), default="auto", help="EngineConfig.decode_graphs")
    parser.add_argument("--int4", action="store_true", help="INT4 blocks (64 tokens, 128-token bf16 window)")
    parser.add_argument("--chunk", type=int, default=2048, help="EngineConfig.prefill_chunk_size")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    DECODE_GRAPHS[0] = GRAPHS[args.graphs]
    CHUNK[0] = args.chunk
    if args.int4:
        BLOCKS.clear()
        BLOCKS.update(use_quantization=True, quantization_bits=4)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, args.device)
    lines = report(args, model)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
