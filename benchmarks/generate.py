"""Hugging Face `generate` throughput and KV memory: our paged caches vs DynamicCache, the static cache, quanto.

A random-weight Llama-shaped model (hidden 2048, 16 layers, 32 query / 8 KV heads, vocab 32000, bf16), batch 32,
prompt 1024, 128 new tokens (no early stop), all in one run:

    dynamic        DynamicCache + SDPA
    static         the static cache (transformers compiles the decode step when it can)
    quanto INT4    QuantizedCache, optimum-quanto backend (only where optimum-quanto imports)
    ours bf16      KVCache + kv_cache's paged attention (register_attention)
    ours INT4      KVCache(use_quantization, 4 bits, 128-token full-precision window) + paged attention
    ours INT4 R0   the same without the full-precision window (every whole block sealed)
    ours ... graphs          the same inside `decode_graphs(model)`: each decode step replays a CUDA graph (a new
                             cache per call: its first decode step is eager and captures the graph)
    ours ... graphs reused   one cache, `reset()` between calls: the graph captured by the warm-up call replays
    ours INT4 unchecked   ours INT4 with check_finite=False (no device sync per layer; not in the default list)

tokens/s counts new tokens over the whole `generate` call (prefill included), after one warm-up call per method;
"prefill s" times a generate call of one new token, and "decode tok/s" is the other new tokens over the rest.
KV memory is the bytes of the cache's own tensors (for ours: both block pools, allocated whole up front).

Run (GPU): PYTHONPATH=. python benchmarks/generate.py [--out benchmarks/results/generate_h100.txt]
Smoke (CPU): python benchmarks/generate.py --hidden 128 --layers 2 --batch 2 --prompt 64 --new 8 --device cpu
Host profile: --profile "ours bf16,ours INT4" prints, per method, the functions taking the most host time in one
generate call (cProfile; time blocked in a device sync counts towards the function that syncs).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kv_cache import KVCache, KVCacheConfig, decode_graphs
from kv_cache.hf_attention import register_attention


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=32000,
        max_position_embeddings=4096, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


Run = tuple[int, torch.Tensor]  # (KV bytes, generated ids)


def greedy(model: LlamaForCausalLM, inputs: dict[str, Any], new: int, **kwargs: Any) -> Any:
    return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)


def run_dynamic(model: LlamaForCausalLM, inputs: dict[str, Any], new: int) -> Run:
    model.set_attn_implementation("sdpa")
    cache = DynamicCache(config=model.config)
    ids = greedy(model, inputs, new, past_key_values=cache)
    return tensor_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)]), ids


def run_static(model: LlamaForCausalLM, inputs: dict[str, Any], new: int) -> Run:
    model.set_attn_implementation("sdpa")
    out = greedy(model, inputs, new, cache_implementation="static", return_dict_in_generate=True)
    cache = out.past_key_values
    return tensor_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)]), out.sequences


def run_quanto(model: LlamaForCausalLM, inputs: dict[str, Any], new: int) -> Run:
    from transformers import QuantizedCache

    model.set_attn_implementation("sdpa")
    cache = QuantizedCache(backend="quanto", config=model.config, nbits=4)
    return 0, greedy(model, inputs, new, past_key_values=cache)  # quanto's packed tensors: memory not measured


def make_ours(
    config: KVCacheConfig, graphs: bool = False, reuse: bool = False
) -> Callable[[LlamaForCausalLM, dict[str, Any], int], Run]:
    """Our cache: a new one per call, or (`reuse`) one cache reset between calls, whose decode graph is then
    captured by the warm-up call and replayed by the timed one; `graphs` runs generate inside `decode_graphs`."""
    kept: list[KVCache] = []

    def run(model: LlamaForCausalLM, inputs: dict[str, Any], new: int) -> Run:
        model.set_attn_implementation(register_attention())
        if reuse and kept:
            cache = kept[0]
            cache.reset()
        else:
            cache = KVCache(config, model.config)
            kept[:] = [cache] if reuse else []
        with decode_graphs(model) if graphs else contextlib.nullcontext():
            ids = greedy(model, inputs, new, past_key_values=cache)
        return int(cache.get_stats()["storage_memory_mb"] * 2**20), ids

    return run


def timed(method: Callable[..., Run], model: LlamaForCausalLM, inputs: dict[str, Any], new: int) -> tuple[float, Run]:
    method(model, inputs, new)  # warm-up: compilation, kernel autotuning, allocator
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = method(model, inputs, new)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def prefill_seconds(
    name: str, method: Callable[..., Run], model: LlamaForCausalLM, inputs: dict[str, Any]
) -> float | None:
    """Seconds of a generate call that makes one token (the prefill and one sampling), or None for the static
    cache (a shorter generate would size and compile it anew)."""
    return None if name == "static" else timed(method, model, inputs, 1)[0]


def host_profile(method: Callable[..., Run], model: LlamaForCausalLM, inputs: dict[str, Any], new: int) -> str:
    """The 30 functions with the most host time (own time, cProfile) in one generate call, after a warm-up."""
    method(model, inputs, new)
    profiler = cProfile.Profile()
    profiler.enable()
    method(model, inputs, new)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(30)
    return stream.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("hidden", 2048), ("layers", 16), ("heads", 32), ("kv-heads", 8), ("batch", 32),
                          ("prompt", 1024), ("new", 128)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default="dynamic,static,quanto,ours bf16,ours INT4,ours INT4 R0")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", default="", help="methods to profile on the host (comma-separated)")
    args = parser.parse_args()
    model = build_model(args)
    ids = torch.randint(1, 32000, (args.batch, args.prompt), device=args.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    max_tokens = args.prompt + args.new
    methods: dict[str, Callable[..., Run]] = {
        "dynamic": run_dynamic,
        "static": run_static,
        "quanto": run_quanto,
        "ours bf16": make_ours(KVCacheConfig(max_tokens=max_tokens, block_size=16)),
        "ours INT4": make_ours(KVCacheConfig(max_tokens=max_tokens, use_quantization=True, quantization_bits=4)),
        "ours bf16 graphs": make_ours(KVCacheConfig(max_tokens=max_tokens, block_size=16), graphs=True),
        "ours INT4 graphs": make_ours(
            KVCacheConfig(max_tokens=max_tokens, use_quantization=True, quantization_bits=4), graphs=True
        ),
        "ours bf16 graphs reused": make_ours(
            KVCacheConfig(max_tokens=max_tokens, block_size=16), graphs=True, reuse=True
        ),
        "ours INT4 graphs reused": make_ours(
            KVCacheConfig(max_tokens=max_tokens, use_quantization=True, quantization_bits=4), graphs=True, reuse=True
        ),
        "ours INT4 R0": make_ours(
            KVCacheConfig(max_tokens=max_tokens, use_quantization=True, quantization_bits=4, residual_tokens=0)
        ),
        # check_finite syncs with the device once per layer and step (it must raise before anything is written)
        "ours INT4 unchecked": make_ours(
            KVCacheConfig(max_tokens=max_tokens, use_quantization=True, quantization_bits=4, check_finite=False)
        ),
    }
    lines = [f"command: python {' '.join(sys.argv)}", f"torch {torch.__version__}, device {args.device}"]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name()}")
    lines.append(
        f"{'method':<24} {'s':>8} {'tokens/s':>10} {'prefill s':>10} {'decode tok/s':>13} {'KV MiB':>10} "
        f"{'same tokens as dynamic':>24}"
    )
    results: dict[str, float] = {}
    reference: torch.Tensor | None = None
    for name in args.methods.split(","):
        try:
            seconds, (kv_bytes, ids) = timed(methods[name], model, inputs, args.new)
        except Exception as error:  # a baseline that cannot run here is reported, not fatal
            lines.append(f"{name:<24} not run: {type(error).__name__}: {str(error)[:100]}")
            print(lines[-1], flush=True)
            continue
        reference = ids if reference is None else reference
        same = (ids[:, args.prompt :] == reference[:, args.prompt :]).float().mean().item()
        results[name] = args.batch * args.new / seconds
        prefill = prefill_seconds(name, methods[name], model, inputs)
        split = "-" if prefill is None else f"{prefill:.2f}"
        decode = "-" if prefill is None else f"{args.batch * (args.new - 1) / (seconds - prefill):.1f}"
        lines.append(
            f"{name:<24} {seconds:>8.2f} {results[name]:>10.1f} {split:>10} {decode:>13} {kv_bytes / 2**20:>10.1f} "
            f"{same:>23.1%}"
        )
        print(lines[-1], flush=True)
    for name, rate in results.items():
        ratios = ", ".join(f"{rate / results[base]:.2f}x {base}" for base in ("static", "quanto") if base in results)
        lines.append(f"{name:<24} {ratios}")
    text = "\n".join(lines)
    print(text)
    for name in filter(None, args.profile.split(",")):
        print(f"host profile of {name}:\n{host_profile(methods[name], model, inputs, args.new)}", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
