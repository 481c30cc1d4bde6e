"""Redis tier: throughput of 1 MiB blocks (single vs pipelined vs batched) and the latency a fault adds per get.

Blocks are Llama-1B-shaped bf16 blocks of 16 tokens as the issue sizes them (16 layers x keys+values x 16 tokens
x 8 KV heads x head_dim 128 x 2 B = 1 MiB), encoded with `kv_cache.tiers.codec`. A `redis-server` is started on
a free loopback port with persistence off. Rows:

* put / get throughput: one command per block (redis-py), one pipeline for all blocks (redis-py), and the tier
  (`put_many` + `flush`: background pipelines of `write_batch_bytes`; `get_many` with 1, 4 or 32 blocks per
  MGET; `get_chain` with `decode_block`, i.e. everything a prefix lookup pays), plus the codec alone;
* fault latency per get: our settings (socket timeout 0.1 s, breaker after 3 failures) with the server killed
  (-9) and hung (SIGSTOP): the first gets, before the breaker opens, then p50/p99/max once it is open; and
  redis-py's defaults on the same faults (hung: we stop waiting after --hung-wait seconds).

Run: python benchmarks/redis_tier.py [--blocks 64] [--rounds 5] [--hung-wait 10]
                                    [--out benchmarks/results/redis_tier.txt]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import redis
import torch

from kv_cache.block_format import BlockFormat
from kv_cache.tiers.codec import decode_block, encode_block
from kv_cache.tiers.redis import RedisTier, RedisTierConfig

FORMAT = BlockFormat(16, 16, 8, 128, torch.bfloat16)  # 1 MiB per block
MIB = 2**20


def start_server(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server on a free loopback port, persistence off; returns (process, port) once it answers PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: run scripts/install_services.sh")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*command, "--dir", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=1)
    for _ in range(500):
        try:
            client.ping()
            return process, port
        except redis.ConnectionError:
            time.sleep(0.01)
    sys.exit(f"redis-server did not start on port {port}")


def blocks(count: int) -> tuple[list[bytes], list[bytes], list[list[int]]]:
    """`count` encoded blocks: (block hashes, values, token ids)."""
    shape = (FORMAT.block_size, FORMAT.kv_heads, FORMAT.head_dim)
    generator = torch.Generator().manual_seed(0)
    hashes, values, tokens = [], [], []
    for index in range(count):
        ids = list(range(index * 16, index * 16 + 16))
        tensors = [torch.randn(shape, generator=generator).to(torch.bfloat16) for _ in range(2 * FORMAT.num_layers)]
        hashes.append(hashlib.blake2b(repr(ids).encode(), digest_size=16).digest())
        values.append(encode_block(FORMAT, tensors, ids))
        tokens.append(ids)
    return hashes, values, tokens


def interleaved(paths: dict[str, Callable[[], object]], rounds: int, prepare: Callable[[], object]) -> dict[str, float]:
    """The fastest of `rounds` runs of each path (seconds); the paths take turns, so a change in the machine's
    load (2 shared cores) hits them alike; an untimed `prepare` runs before each."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, run in paths.items():
            prepare()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(seconds) for name, seconds in times.items()}


def throughput(port: int, count: int, rounds: int) -> list[str]:
    """Rows of ms/block and MiB/s for each put and get path over `count` 1 MiB blocks."""
    hashes, values, tokens = blocks(count)
    tier = RedisTier(RedisTierConfig(url=f"redis://127.0.0.1:{port}/0", namespace="bench", fingerprint="llama1b"))
    keys = [b"baseline:" + h for h in hashes]  # the redis-py baselines' own keys
    items = list(zip(keys, values, strict=True))
    client = redis.Redis(port=port)

    def pipeline(write: bool) -> None:
        pipe = client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value) if write else pipe.get(key)
        pipe.execute()

    def put_through_tier() -> None:
        tier.put_many(list(zip(hashes, values, strict=True)))
        tier.flush(60)

    def tier_gets(batch: int) -> Callable[[], None]:
        def run() -> None:
            for start in range(0, count, batch):
                tier.get_many(hashes[start : start + batch])

        return run

    def chain() -> None:
        got = tier.get_chain(hashes, lambda i, data: decode_block(data, FORMAT, tokens[i]))
        assert len(got) == count, tier.stats()

    puts = {
        "put   SET per block (redis-py)": lambda: [client.set(key, value) for key, value in items],
        "put   one pipeline of all SETs (redis-py)": lambda: pipeline(True),
        f"put   tier put_many + flush ({tier.config.write_batch_bytes // MIB} MiB pipelines)": put_through_tier,
    }
    rows = interleaved(puts, rounds, prepare=client.flushall)
    tier.put_many(list(zip(hashes, values, strict=True)))
    tier.flush(60)
    client.mset(dict(items))
    tier.get_many(hashes[:1])  # the tier learns the value size that sets its chain_batch()
    gets = {
        "get   GET per block (redis-py)": lambda: [client.get(key) for key in keys],
        "get   one pipeline of all GETs (redis-py)": lambda: pipeline(False),
        "get   tier get_many, 1 block per MGET": tier_gets(1),
        "get   tier get_many, 4 blocks per MGET": tier_gets(4),
        "get   tier get_many, 32 blocks per MGET": tier_gets(32),
        f"get   tier get_chain + decode_block ({tier.chain_batch()} per MGET)": chain,
        "codec decode_block only": lambda: [decode_block(v, FORMAT, t) for v, t in zip(values, tokens, strict=True)],
    }
    rows.update(interleaved(gets, rounds, prepare=lambda: None))
    tier.close()
    lines = [f"{'op':<6}{'path':<46}{'ms/block':>10}{'MiB/s':>10}"]
    for name, seconds in rows.items():
        lines.append(f"{name:<52}{seconds / count * 1e3:>10.3f}{count * len(values[0]) / MIB / seconds:>10.0f}")
    return lines


def percentile(values: list[float], fraction: float) -> float:
    return sorted(values)[min(len(values) - 1, int(fraction * len(values)))]


def our_fault_latency(port: int, process: subprocess.Popen[bytes], fault: str) -> str:
    """Gets of a 16-block chain after `fault` ("killed" or "hung"), with the default `RedisTierConfig`."""
    tier = RedisTier(RedisTierConfig(url=f"redis://127.0.0.1:{port}/0", namespace="bench", fingerprint="fault"))
    hashes = [hashlib.blake2b(bytes([index]), digest_size=16).digest() for index in range(16)]
    tier.put_many([(h, b"v" * 1024) for h in hashes])
    tier.flush(10)
    assert len(tier.get_chain(hashes)) == 16
    if fault == "killed":
        process.kill()
        process.wait()
    else:
        os.kill(process.pid, signal.SIGSTOP)
    first, after = [], []
    for index in range(2000):
        start = time.perf_counter()
        tier.get_chain(hashes)
        (first if index < tier.config.failure_threshold else after).append(time.perf_counter() - start)
    state = tier.stats()["state"]
    tier.close()
    return (
        f"ours, server {fault:<6}: first {len(first)} gets {', '.join(f'{t * 1e3:.1f}' for t in first)} ms; "
        f"breaker {state}: p50 {statistics.median(after) * 1e6:.1f} us, p99 {percentile(after, 0.99) * 1e6:.1f} us, "
        f"max {max(after) * 1e6:.1f} us over {len(after)} gets"
    )


def default_fault_latency(port: int, fault: str, wait_s: float) -> str:
    """One GET with redis-py's default client on a dead (refused) or stopped (hung) server; at most `wait_s`."""
    client = redis.Redis(port=port)
    elapsed: list[float] = []
    errors: list[str] = []

    def get() -> None:
        start = time.perf_counter()
        try:
            client.get("k")
        except redis.RedisError as error:
            errors.append(type(error).__name__)
        elapsed.append(time.perf_counter() - start)

    thread = threading.Thread(target=get, daemon=True)
    start = time.perf_counter()
    thread.start()
    thread.join(timeout=wait_s)
    name = f"redis-py {redis.__version__} defaults, server {fault:<7}"
    if not elapsed:
        return f"{name}: no answer after {time.perf_counter() - start:.1f} s (stopped waiting)"
    return f"{name}: {errors[0] if errors else 'ok'} after {elapsed[0]:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=64, help="blocks per throughput run (1 MiB each)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each path (the fastest is reported)")
    parser.add_argument("--hung-wait", type=float, default=10.0, help="seconds to wait for a default client's hung GET")
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args()
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    lines = [
        f"Command: python benchmarks/redis_tier.py --blocks {args.blocks} --rounds {args.rounds} "
        f"--hung-wait {args.hung_wait:g}" + (f" --out {args.out}" if args.out else ""),
        f"redis-server {version.removeprefix('v=')}, redis-py {redis.__version__}, hiredis parser "
        f"{'on' if redis.utils.HIREDIS_AVAILABLE else 'off'}, {os.cpu_count()} CPUs (load average "
        f"{os.getloadavg()[0]:.1f}: shared, so expect noise), loopback; "
        f"block: {FORMAT.describe()}, {FORMAT.bytes_per_block / MIB:.2f} MiB + 50 B header",
        "",
    ]
    with tempfile.TemporaryDirectory() as directory:
        process, port = start_server(directory)
        try:
            lines += throughput(port, args.blocks, args.rounds)
            lines += ["", "added latency per get while the server is down or hung:"]
            lines.append(our_fault_latency(port, process, "killed"))
            lines.append(default_fault_latency(port, "refused", args.hung_wait))
            process, port = start_server(directory)
            lines.append(our_fault_latency(port, process, "hung"))
            lines.append(default_fault_latency(port, "hung", args.hung_wait))
        finally:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
            process.wait()
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as out:
            out.write(report + "\n")


if __name__ == "__main__":
    main()
