"""KVCache inside Hugging Face `generate`: token-for-token identical to DynamicCache on tiny random models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kv_cache import CacheValidationError, KVCache, KVCacheConfig

COMMON = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def llama() -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(**COMMON))


def qwen2() -> PreTrainedModel:
    return Qwen2ForCausalLM(Qwen2Config(**COMMON))


def mistral(sliding_window: int | None = 4096) -> PreTrainedModel:
    return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=sliding_window))


MODELS: dict[str, Callable[[], PreTrainedModel]] = {"llama": llama, "qwen2": qwen2, "mistral": mistral}


def build(name: str) -> PreTrainedModel:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def paged_cache(model: PreTrainedModel, **overrides: object) -> KVCache:
    options = {"max_tokens": 128, "block_size": 4, "device": "cpu", **overrides}
    return KVCache(KVCacheConfig(**options), model.config)  # type: ignore[arg-type]


def generate_both(model: PreTrainedModel, inputs: dict, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
    """Generate with DynamicCache and with our KVCache under the same seed; return both outputs and our cache."""
    torch.manual_seed(1234)
    reference = model.generate(**inputs, past_key_values=DynamicCache(config=model.config), **kwargs)
    cache = paged_cache(model)
    torch.manual_seed(1234)
    ours = model.generate(**inputs, past_key_values=cache, **kwargs)
    return reference, ours, cache


def prompt(batch: int = 1, length: int = 11, seed: int = 0) -> dict:
    ids = torch.randint(2, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def left_padded_batch() -> dict:
    """Four prompts of lengths 5, 9, 13 and 3, left-padded to 13."""
    gen = torch.Generator().manual_seed(7)
    lengths = [5, 9, 13, 3]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(2, COMMON["vocab_size"], (length,), generator=gen)
        mask[row, -length:] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_matches_dynamic_cache(name: str) -> None:
    model = build(name)
    reference, ours, cache = generate_both(model, prompt(), max_new_tokens=24, do_sample=False)
    assert torch.equal(reference, ours)
    cache.store.check_invariants()
    stats = cache.get_stats()
    assert stats["tokens"] == 11 + 24 - 1 and stats["hit_rate"] > 0.5


@pytest.mark.parametrize("name", sorted(MODELS))
def test_left_padded_batch_matches_dynamic_cache(name: str) -> None:
    model = build(name)
    reference, ours, _ = generate_both(model, left_padded_batch(), max_new_tokens=16, do_sample=False)
    assert torch.equal(reference, ours)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sampling_with_fixed_seed_matches_dynamic_cache(name: str) -> None:
    model = build(name)
    reference, ours, _ = generate_both(model, prompt(batch=2), max_new_tokens=16, do_sample=True, top_k=20)
    assert torch.equal(reference, ours)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_beam_search_matches_dynamic_cache(name: str) -> None:
    model = build(name)
    reference, ours, cache = generate_both(model, prompt(), max_new_tokens=12, num_beams=4, do_sample=False)
    assert torch.equal(reference, ours)
    cache.store.check_invariants()


def test_small_sliding_window_matches_dynamic_cache() -> None:
    torch.manual_seed(0)
    model = mistral(sliding_window=6).eval()
    reference, ours, _ = generate_both(model, prompt(length=9), max_new_tokens=16, do_sample=False)
    assert torch.equal(reference, ours)


def test_crop_drops_newest_tokens_and_decoding_continues() -> None:
    model = build("llama")
    inputs = prompt(length=10)
    cache = paged_cache(model)
    with torch.no_grad():
        model(**inputs, past_key_values=cache)
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache)
        assert cache.get_seq_length() == 13
        cache.crop(-3)
        assert cache.get_seq_length() == 10
        ours = model(input_ids=torch.tensor([[8]]), past_key_values=cache).logits
        dynamic = DynamicCache(config=model.config)
        model(**inputs, past_key_values=dynamic)
        expected = model(input_ids=torch.tensor([[8]]), past_key_values=dynamic).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    cache.store.check_invariants()


def test_batch_select_and_repeat_interleave() -> None:
    model = build("llama")
    cache = paged_cache(model)
    with torch.no_grad():
        model(**prompt(batch=3), past_key_values=cache)
    keys_before = [cache.store.read([s], 0)[0].clone() for s in cache.seq_ids or []]
    cache.batch_select_indices(torch.tensor([2, 0]))
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4
    got = [cache.store.read([s], 0)[0].clone() for s in cache.seq_ids or []]
    for row, source in enumerate([2, 2, 0, 0]):
        assert torch.equal(got[row], keys_before[source])
    cache.store.check_invariants()
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.store.pool is not None and cache.store.pool.num_used == 0


def test_cache_is_reusable_after_reset() -> None:
    model = build("qwen2")
    cache = paged_cache(model)
    first = model.generate(**prompt(), past_key_values=cache, max_new_tokens=8, do_sample=False)
    cache.reset()
    second = model.generate(**prompt(), past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, second)


def test_contract_surface() -> None:
    model = build("llama")
    cache = paged_cache(model)
    assert len(cache) == COMMON["num_hidden_layers"]
    assert cache.get_seq_length() == 0 and cache.batch_size == -1 and not cache.is_compileable
    assert cache.is_croppable and cache.get_mask_sizes(5, 0) == (5, 0)
    with torch.no_grad():
        model(**prompt(batch=2, length=6), past_key_values=cache)
    assert cache.get_seq_length() == 6 and cache.batch_size == 2
    assert cache.get_mask_sizes(1, 1) == (7, 0)


def test_model_config_is_required_and_layer_types_are_checked() -> None:
    with pytest.raises(CacheValidationError, match="model_config is required"):
        KVCache(KVCacheConfig())
    config = LlamaConfig(**COMMON)
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(CacheValidationError, match=r"\['linear_attention'\] are not supported"):
        KVCache(KVCacheConfig(), config)
