"""`make demo`: generate with a tiny Llama model (random weights, built from a config) twice, once with
Hugging Face's `DynamicCache` and once with our paged `KVCache`, and show that the tokens agree and what the
cache holds.

Run: `python -m kv_cache.demo`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kv_cache import KVCache, KVCacheConfig


def tiny_llama() -> LlamaForCausalLM:
    """A 4-layer Llama with grouped-query attention (8 query heads, 2 KV heads), random weights, seed 0."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def main() -> None:
    model = tiny_llama()
    prompts = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(1))
    settings: dict[str, Any] = {
        "max_new_tokens": 64,
        "do_sample": False,
        "attention_mask": torch.ones_like(prompts),
        "pad_token_id": 0,
    }

    start = time.perf_counter()
    reference: Any = model.generate(prompts, past_key_values=DynamicCache(config=model.config), **settings)
    dynamic_s = time.perf_counter() - start

    cache = KVCache(KVCacheConfig(max_tokens=256, block_size=16), model.config)
    start = time.perf_counter()
    ours: Any = model.generate(prompts, past_key_values=cache, **settings)
    paged_s = time.perf_counter() - start

    new_tokens = prompts.shape[0] * settings["max_new_tokens"]
    print(f"model: tiny Llama, {model.config.num_hidden_layers} layers, GQA 8/2, random weights (seed 0)")
    print(f"batch {prompts.shape[0]} x prompt {prompts.shape[1]} tokens, {settings['max_new_tokens']} new tokens each")
    print(f"DynamicCache : {new_tokens / dynamic_s:8.1f} tokens/s")
    print(f"paged KVCache: {new_tokens / paged_s:8.1f} tokens/s")
    print(f"greedy tokens identical to DynamicCache: {torch.equal(reference, ours)}")
    print("first continuation:", ours[0, prompts.shape[1] : prompts.shape[1] + 16].tolist())
    stats = cache.get_stats()
    stats.pop("profiling")
    print("cache stats:", json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
