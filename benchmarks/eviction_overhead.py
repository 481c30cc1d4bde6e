"""Token eviction's cost per decoded token: each policy at 4x against the same decode without eviction.

Model: the shipped reference model (CPU), or with `--model llama-1b` a Llama-1B-shaped one with random bf16
weights (timing only, CUDA). Every cache is our `KVCache` read by our paged attention (`register_attention`), so
the rows differ only by eviction. Per configuration: prefill `--batch` prompts of `--prompt` tokens, then decode
`--new` tokens greedily; the decode is timed (CPU seconds of this process on CPU, where other jobs share the
cores; wall seconds after a synchronisation on CUDA), median of `--repeats` alternating runs.

Columns:
- ms/token: decode time per generated token (all rows of the batch together);
- vs full: against the full cache. Below 1.0 is possible: an evicted cache attends over fewer tokens;
- in eviction: the share of the decode spent inside the evictor (scoring, selection, compaction:
  `TokenEvictor.observe` + `evict`), timed directly around those calls (synchronised on CUDA);
- mass: LFU/Adaptive also ask the attention kernel for each token's attention mass, which this share does not
  include (it is inside attention): the ms/token difference to the window row shows it.

Run: python benchmarks/eviction_overhead.py [--device cpu|cuda] [--model reference|llama-1b]
         [--out benchmarks/results/eviction_overhead.txt]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from prefix_cache import build_model  # benchmarks/prefix_cache.py
from transformers import PreTrainedModel

from kv_cache import CacheStrategy, KVCache, KVCacheConfig
from kv_cache.hf_attention import register_attention
from kv_cache.reference_model import encode, heldout_text

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {},
    "window+sinks 4x": {"cache_strategy": CacheStrategy.LRU, "compression_ratio": 0.75, "sink_tokens": 4},
    "H2O+SnapKV 4x": {"cache_strategy": CacheStrategy.LFU, "compression_ratio": 0.75, "sink_tokens": 4},
    "adaptive 4x": {"cache_strategy": CacheStrategy.ADAPTIVE, "compression_ratio": 0.75, "sink_tokens": 4},
}


class EvictionClock:
    """Time spent inside a cache's evictor (`observe` + `evict`), wrapped around the instance's methods."""

    def __init__(self, cache: KVCache, sync: Callable[[], None]) -> None:
        self.seconds = 0.0
        self.active = False
        evictor = cache.evictor
        if evictor is None:
            return
        for name in ("observe", "evict"):
            setattr(evictor, name, self._timed(getattr(evictor, name), sync))

    def _timed(self, method: Callable[..., None], sync: Callable[[], None]) -> Callable[..., None]:
        def timed(*args: Any, **kwargs: Any) -> None:
            if not self.active:
                return method(*args, **kwargs)
            sync()
            start = time.perf_counter()
            method(*args, **kwargs)
            sync()
            self.seconds += time.perf_counter() - start

        return timed


@torch.no_grad()
def decode_once(
    model: PreTrainedModel, options: dict[str, Any], prompts: torch.Tensor, new: int
) -> tuple[float, float]:
    """Prefill `prompts` `[batch, tokens]`, then decode `new` tokens; returns (decode seconds, seconds inside the
    evictor during the decode)."""
    device = prompts.device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock_now = time.perf_counter if cuda else time.process_time
    config = KVCacheConfig(max_tokens=prompts.shape[1] + new + 64, device=str(device), **options)
    cache = KVCache(config, model.config)
    clock = EvictionClock(cache, sync)
    out = model(input_ids=prompts, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    clock.active = True
    start = clock_now()
    for _ in range(new):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    return clock_now() - start, clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["reference", "llama-1b"], default="reference")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.model, args.device)
    model.set_attn_implementation(register_attention())
    ids = encode(heldout_text())
    prompts = torch.stack([ids[i * 3000 : i * 3000 + args.prompt] for i in range(args.batch)]).to(device)
    decode_once(model, {}, prompts, 4)  # warm-up (kernels, allocator)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, options in CONFIGS.items():
            runs[name].append(decode_once(model, options, prompts, args.new))
    per_token = {name: statistics.median(s for s, _ in r) / args.new * 1000 for name, r in runs.items()}
    shares = {name: statistics.median(e / s for s, e in r) for name, r in runs.items()}
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    lines = [
        f"command: python {' '.join(sys.argv)}",
        f"device: {device}{gpu}, torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), "
        f"{platform.machine()}; model {args.model}; batch {args.batch}, prompt {args.prompt}, {args.new} new "
        f"tokens, median of {args.repeats} alternating runs ({'wall' if device.type == 'cuda' else 'CPU'} time)",
        "",
        f"{'config':<18} {'ms/token':>9} {'vs full':>8} {'in eviction':>12}",
    ]
    for name in CONFIGS:
        lines.append(
            f"{name:<18} {per_token[name]:>9.2f} {per_token[name] / per_token['full']:>7.2f}x {shares[name]:>11.1%}"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
