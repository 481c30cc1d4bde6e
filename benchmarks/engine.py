"""KVCacheEngine: throughput vs Hugging Face `generate`, requests that fit a memory budget, and a TTFT ladder.

Model: the shipped reference model (`kv_cache.reference_model`: a trained 3M-parameter byte-level Llama, 4 layers,
GQA 8/2, head_dim 64, fp32), because its tokens mean something (greedy outputs can be compared across paths, and
the prompts are real held-out code) and it runs on this CPU-only, 2-core machine in seconds per path. Every row is
measured in this run; times are this process's CPU seconds with one intra-op thread (the machine is shared, and
CPU time barely moves with other people's load), the TTFT ladder is wall time.

1. Throughput: 64 requests of mixed lengths (prompts of 32-512 tokens of held-out code, 16-64 new tokens each,
   seeded), greedy, no early stop. *HF static batches*: `model.generate` (SDPA, DynamicCache) on groups of
   `--group` requests in arrival order, left-padded to the group's longest prompt, each group running until its
   largest `max_new_tokens` (what a user of `generate` does). *Engine*: `KVCacheEngine.generate` of all 64
   (continuous batching, `--max-num-seqs` at once, chunked prefill). Tokens/s counts the new tokens requested.
2. Capacity: requests of `--capacity-prompt` + 64 cached tokens (65 new: the last is never cached) that fit at
   once in `--budget-mb` MiB of KV storage (`KVCacheConfig.memory_budget_mb`), bf16 blocks vs INT4 blocks
   (64-token blocks, 64-token full-precision window). The count comes from the engine's own accounting (pool
   blocks / blocks one request holds at full length), checked by starting that many requests at once (all run
   together, none preempted) and one more (all start, then one is preempted as they grow).
3. TTFT ladder: a `--prefix`-token prefix plus a 32-token question; *cold* (never seen; Redis asked and missed),
   *pool hit* (its blocks in the device pool), *Redis hit* (the local cache emptied; the blocks come from a
   redis-server on loopback that the cold request wrote), *cold, Redis down* (an engine whose server is not
   running) and *cold, no Redis* (an engine without the tier: the baseline). Fresh prefixes for every cold row,
   all paths interleaved in each repetition; median of `--repeats`.

On a GPU (`--device cuda`, optionally `--model llama-1b`: a Llama-1B-shaped model with random bf16 weights,
timing only) times are wall seconds after a synchronisation, and `--sections throughput capacity` leaves out the
ladder, which needs a local redis-server (`benchmarks/prefix_cache.py` has the GPU TTFT ladder without Redis).

Run: python benchmarks/engine.py [--device cpu|cuda] [--model reference|llama-1b]
         [--sections throughput capacity ladder] [--out benchmarks/results/engine_cpu.txt]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from prefix_cache import build_model, describe  # benchmarks/prefix_cache.py

from kv_cache import KVCacheConfig
from kv_cache.engine import EngineConfig, KVCacheEngine, SamplingParams
from kv_cache.reference_model import PAD_ID, encode, heldout_text

TEXT = heldout_text()
Request = tuple[list[int], int]  # prompt ids, max_new_tokens


def window(index: int, length: int) -> list[int]:
    """Exactly `length` byte tokens of held-out code, a different stretch for each `index`."""
    start = (index * 7919) % (len(TEXT) - length)
    return encode(TEXT[start : start + length]).tolist()[:length]


def workload(count: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [(window(seed * 1000 + i, rng.randint(32, 512)), rng.randint(16, 64)) for i in range(count)]


def timed(function: Callable[[], Any], device: str) -> tuple[Any, float]:
    """`function()` and its seconds: this process's CPU time on CPU, wall time after a sync on CUDA."""
    if not device.startswith("cuda"):
        start = time.process_time()
        result = function()
        return result, time.process_time() - start
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def model_device(model: Any) -> str:
    return str(next(model.parameters()).device)


# --------------------------------------------------------------------------------------------- throughput
@torch.no_grad()
def hf_static_batches(model: Any, requests: list[Request], group: int) -> list[list[int]]:
    """Each request's new tokens from `model.generate` on left-padded groups of `group` requests."""
    model.set_attn_implementation("sdpa")
    outputs = []
    for start in range(0, len(requests), group):
        part = requests[start : start + group]
        longest = max(len(prompt) for prompt, _ in part)
        ids = torch.tensor([[PAD_ID] * (longest - len(p)) + p for p, _ in part], device=model_device(model))
        mask = (ids != PAD_ID).long()
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=max(new for _, new in part), do_sample=False,
            pad_token_id=PAD_ID, eos_token_id=None,
        )  # fmt: skip
        outputs += [out[row, longest : longest + new].tolist() for row, (_, new) in enumerate(part)]
    return outputs


def engine_run(
    model: Any, requests: list[Request], max_num_seqs: int, graphs: bool, int4: bool = False, **options: Any
) -> list[list[int]]:
    """The engine over `requests` (a new engine per run: step graphs, if on, are captured inside the run); `int4`:
    INT4 blocks (64 tokens, a 128-token bf16 window) instead of 16-token bf16 blocks; `options`: more
    `KVCacheConfig` fields."""
    blocks = {"use_quantization": True, "quantization_bits": 4} if int4 else {"block_size": 16}
    blocks.update(options)
    config = KVCacheConfig(max_tokens=1024, device=model_device(model), **blocks)  # type: ignore[arg-type]
    settings = EngineConfig(max_num_seqs=max_num_seqs, prefill_chunk_size=512, decode_graphs=graphs)
    engine = KVCacheEngine(model, config, settings)
    ids = [engine.add_request(prompt, SamplingParams(max_new_tokens=new)) for prompt, new in requests]
    while engine.scheduler.has_work:
        engine.step()
    return [engine.get_request(i).output_ids for i in ids]


def throughput(model: Any, args: argparse.Namespace) -> list[str]:
    """Rows of new tokens per CPU-second: HF static batches vs the engine, best of `args.rounds` alternating."""
    requests = workload(64, seed=1)
    wanted = sum(new for _, new in requests)
    paths: dict[str, Callable[[], list[list[int]]]] = {
        f"HF generate, static batches of {g}": (lambda g=g: hf_static_batches(model, requests, g)) for g in args.group
    }
    for graphs, int4 in ((False, False), (True, False), (True, True)):
        name = f"engine, max_num_seqs={args.max_num_seqs}, {'INT4, ' if int4 else ''}{'graphs' if graphs else 'eager'}"
        paths[name] = lambda g=graphs, q=int4: engine_run(model, requests, args.max_num_seqs, g, q)
    best: dict[str, float] = {}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        for name, run in paths.items():
            outputs[name], seconds = timed(run, model_device(model))
            best[name] = min(best.get(name, float("inf")), seconds)
    reference = outputs[next(iter(paths))]
    baseline = best[next(iter(paths))]
    lines = [
        f"1. throughput: 64 requests, prompts {min(len(p) for p, _ in requests)}-{max(len(p) for p, _ in requests)} "
        f"tokens ({sum(len(p) for p, _ in requests)} in all), {wanted} new tokens requested, best of {args.rounds}",
        f"{'path':<48} {'s':>7} {'tokens/s':>9} {'vs HF':>6}  same tokens as HF",
    ]
    for name, seconds in best.items():
        same = sum(a == b for a, b in zip(outputs[name], reference, strict=True))
        ratio = baseline / seconds
        lines.append(f"{name:<48} {seconds:7.2f} {wanted / seconds:9.1f} {ratio:5.2f}x  {same}/64 requests")
    return lines


# ----------------------------------------------------------------------------------------------- capacity
def capacity_engine(model: Any, args: argparse.Namespace, int4: bool, max_num_seqs: int) -> KVCacheEngine:
    quantized = {"use_quantization": True, "quantization_bits": 4, "residual_tokens": 64} if int4 else {}
    config = KVCacheConfig(
        memory_budget_mb=args.budget_mb, dtype=torch.bfloat16, max_tokens=args.capacity_prompt + 65,
        device=model_device(model),
        **quantized,  # type: ignore[arg-type]
    )  # fmt: skip
    settings = EngineConfig(max_num_seqs=max_num_seqs, prefill_chunk_size=max_num_seqs * args.capacity_prompt)
    return KVCacheEngine(model, config, settings)


def fits(engine: KVCacheEngine, count: int, tokens: int) -> bool:
    """Whether `count` sequences of `tokens` tokens fit the engine's pools at once (its own block accounting)."""
    needs = engine.memory.total_needs(tokens)
    pools = [(engine.store.pool, needs.dense), (engine.store.quantized_pool, needs.sealed)]
    return all(pool is None or count * need <= pool.num_blocks for pool, need in pools)


def most_that_fit(model: Any, args: argparse.Namespace, int4: bool) -> int:
    """The largest `max_num_seqs` whose engine holds that many full-length requests at once (the INT4 tail pool
    grows with `max_num_seqs`, so each count gets its own engine)."""
    tokens, count = args.capacity_prompt + 64, 1
    while fits(capacity_engine(model, args, int4, count + 1), count + 1, tokens):
        count += 1
    return count


def run_at_once(model: Any, args: argparse.Namespace, int4: bool, count: int) -> tuple[int, int, int]:
    """(peak running, preemptions, failed) for `count` requests started together with `max_num_seqs=count`."""
    engine = capacity_engine(model, args, int4, count)
    for i in range(count):
        engine.add_request(window(5000 + i, args.capacity_prompt), SamplingParams(max_new_tokens=65))
    peak = 0
    while engine.scheduler.has_work:
        engine.step()
        peak = max(peak, len(engine.scheduler.running))
    stats = engine.get_stats()
    return peak, stats.get("preemptions", 0), stats.get("failed_requests", 0)


def capacity(model: Any, args: argparse.Namespace) -> list[str]:
    tokens = args.capacity_prompt + 64
    lines = [
        f"2. capacity: requests of {args.capacity_prompt} + 64 tokens held at once in {args.budget_mb} MiB of KV "
        "storage (memory_budget_mb)",
        f"{'blocks':<6} {'bytes/token':>11} {'fit':>4} {'vs bf16':>8}  check: N at once -> peak/preempted; N+1",
    ]
    fit_bf16 = 0
    for int4 in (False, True):
        count = most_that_fit(model, args, int4)
        fit_bf16 = fit_bf16 or count
        per_token = capacity_engine(model, args, int4, count).get_stats()["bytes_per_token"]
        peak, preempted, failed = run_at_once(model, args, int4, count)
        over = run_at_once(model, args, int4, count + 1)
        lines.append(
            f"{'INT4' if int4 else 'bf16':<6} {per_token:11.0f} {count:4d} {count / fit_bf16:7.2f}x  "
            f"{count} -> {peak}/{preempted} (failed {failed}); {count + 1} -> {over[0]}/{over[1]} (failed {over[2]})"
        )
    lines.append(f"   (fit: the engine's accounting for {tokens}-token requests; peak = most running at once)")
    return lines


# ------------------------------------------------------------------------------------------------ TTFT
def ttft(engine: KVCacheEngine, prompt: list[int]) -> float:
    """Wall seconds from `add_request` to the first sampled token."""
    request = engine.get_request(engine.add_request(prompt, SamplingParams(max_new_tokens=1)))
    while not request.is_done:
        engine.step()
    if request.first_token_time is None:
        raise RuntimeError(f"no token: {request.error}")
    return request.first_token_time - request.arrival_time


def ladder_engine(model: Any, args: argparse.Namespace, url: str | None) -> KVCacheEngine:
    blocks = (args.prefix + 32) // 16 + 4
    config = KVCacheConfig(num_blocks=4 * blocks, block_size=16, max_tokens=4096, device=model_device(model))
    return KVCacheEngine(model, config, EngineConfig(prefill_chunk_size=2048, redis_url=url))


def ladder(model: Any, args: argparse.Namespace) -> list[str]:
    """Median TTFT of each path over fresh prefixes, the paths interleaved (see the module docstring)."""
    from redis_tier import start_server  # benchmarks/redis_tier.py; needs the `redis` extra, so only here

    names = ("cold", "pool hit", "Redis hit", "cold, Redis down", "cold, no Redis")
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as directory:
        server, port = start_server(directory)
        engine = ladder_engine(model, args, f"redis://127.0.0.1:{port}/0")
        down = ladder_engine(model, args, f"redis://127.0.0.1:{free_port()}/0")
        plain = ladder_engine(model, args, None)
        if engine.remote is None or engine.prefix_cache is None:
            raise RuntimeError("the engine has no Redis link")
        for rep in range(args.repeats + 1):  # repetition 0 warms up and is dropped
            prefix, questions = window(1000 + rep, args.prefix), [window(2000 + 3 * rep + k, 32) for k in range(3)]
            row = [ttft(engine, prefix + questions[0]), ttft(engine, prefix + questions[1])]
            engine.remote.flush(30)
            engine.prefix_cache.clear()  # the local copies go: the next hit must come from Redis
            row.append(ttft(engine, prefix + questions[2]))
            engine.prefix_cache.clear()
            row += [ttft(other, window(4000 + 10 * rep + k, args.prefix + 32)) for k, other in enumerate((down, plain))]
            for name, value in zip(names, row, strict=True):
                times[name] += [value] if rep else []
        stats = {"up": engine.remote.stats(), "down": down.remote.stats() if down.remote else {}}
        for closing in (engine, down):
            closing.close()
        server.kill()
        server.wait()
    return ladder_lines(args, {name: statistics.median(v) for name, v in times.items()}, stats)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ladder_lines(args: argparse.Namespace, medians: dict[str, float], stats: dict[str, dict[str, Any]]) -> list[str]:
    cold, up, down = medians["cold, no Redis"], stats["up"], stats["down"]
    lines = [
        f"3. time to first token, prefix {args.prefix} + question 32 tokens, median of {args.repeats} (wall ms)",
        f"{'path':<20} {'TTFT ms':>9} {'vs cold, no Redis':>18}",
    ]
    lines += [f"{name:<20} {value * 1e3:9.2f} {cold / value:17.2f}x" for name, value in medians.items()]
    lines.append(
        f"   Redis up: {up['fetched_blocks']} blocks fetched in {up['fetches']} fetches, skipped as slower "
        f"{up['skipped_slower']}x; estimates: recompute {up['recompute_s_per_token'] * 1e3:.3f} ms/token, fetch "
        f"{up['fetch_s_per_block'] * 1e3:.3f} ms/block + {up['fetch_round_trip_s'] * 1e3:.3f} ms per lookup; "
        f"writing {up['written_blocks']} blocks down took {up['write_down_s'] * 1e3:.1f} ms of steps (export + "
        "encode; the network part runs on the tier's thread)"
    )
    lines.append(
        f"   Redis down: {down['faults']} faults counted ({down['faults_refused']} refused), then "
        f"{down['skipped_unavailable']} lookups skipped by the open breaker"
    )
    return lines


SECTIONS: dict[str, Callable[[Any, argparse.Namespace], list[str]]] = {
    "throughput": throughput,
    "capacity": capacity,
    "ladder": ladder,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget-mb", type=float, default=16.0)
    parser.add_argument("--capacity-prompt", type=int, default=960)
    parser.add_argument("--prefix", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["reference", "llama-1b"], default="reference")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(args.model, args.device)
    gpu = f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""
    lines = [
        f"command: python {' '.join(sys.argv)}",
        f"device: {args.device}{gpu}, torch {torch.__version__}, 1 intra-op thread, {os.cpu_count()} cores",
        f"model: {args.model} ({describe(model)})",
    ]
    for section in args.sections:
        lines += ["", *SECTIONS[section](model, args)]
    lines.append(f"load average {os.getloadavg()[0]:.1f} at the end")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
