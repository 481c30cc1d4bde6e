"""The paged attention implementation inside Hugging Face models: same tokens as SDPA + DynamicCache."""

from __future__ import annotations

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

from kv_cache import CacheError, KVCache, KVCacheConfig, attention
from kv_cache.hf_attention import ATTENTION_NAME, register_attention

COMMON = {
    "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": 0,
    "eos_token_id": 1,
}  # fmt: skip
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=6)),
}


def build(name: str) -> PreTrainedModel:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def inputs(batch: int = 2, length: int = 11, padded: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 96, (batch, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padded:
        ids[0, :4], mask[0, :4] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def paged(model: PreTrainedModel, **overrides: object) -> KVCache:
    options = {"block_size": 4, "max_tokens": 96, "device": "cpu", **overrides}
    return KVCache(KVCacheConfig(**options), model.config)  # type: ignore[arg-type]


def reference_and_paged(model: PreTrainedModel, batch: dict, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    model.set_attn_implementation("sdpa")
    reference = model.generate(**batch, past_key_values=DynamicCache(config=model.config), **kwargs)
    model.set_attn_implementation(register_attention())
    cache = paged(model)
    assert cache.reads_paged
    ours = model.generate(**batch, past_key_values=cache, **kwargs)
    cache.store.check_invariants()
    return reference, ours


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_matches_sdpa(name: str) -> None:
    reference, ours = reference_and_paged(build(name), inputs(), max_new_tokens=20, do_sample=False)
    assert torch.equal(reference, ours)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_left_padded_batch_falls_back_and_matches(name: str) -> None:
    reference, ours = reference_and_paged(build(name), inputs(padded=True), max_new_tokens=12, do_sample=False)
    assert torch.equal(reference, ours)


def test_beam_search_matches_sdpa() -> None:
    reference, ours = reference_and_paged(build("llama"), inputs(batch=1), max_new_tokens=10, num_beams=4)
    assert torch.equal(reference, ours)


def test_quantized_cache_paged_logits_match_the_dense_read() -> None:
    model = build("llama")
    config = {"use_quantization": True, "quantization_bits": 4, "quantization_group_size": 16,
              "residual_tokens": 8, "block_size": 8}  # fmt: skip
    batch = inputs(length=30)
    logits = {}
    for implementation in ("sdpa", register_attention()):
        model.set_attn_implementation(implementation)
        cache = paged(model, **config)
        with torch.no_grad():
            model(**batch, past_key_values=cache)
            logits[implementation] = model(input_ids=torch.tensor([[5], [7]]), past_key_values=cache).logits
        assert cache.get_stats()["quantized_blocks_used"] == 2 * 2
    torch.testing.assert_close(logits[ATTENTION_NAME], logits["sdpa"], rtol=1e-4, atol=1e-4)


def test_a_foreign_cache_is_refused_clearly() -> None:
    model = build("llama")
    model.set_attn_implementation(register_attention())
    with pytest.raises(CacheError, match="reads a kv_cache KVCache"), torch.no_grad():
        model(**inputs(), past_key_values=DynamicCache(config=model.config))


def test_a_fresh_prompt_is_attended_by_sdpa_and_a_continued_one_by_the_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing cached before a prompt: its own states are the cache, so SDPA attends them (no paged launch). A
    second chunk reads the cache through the kernels. Both give DynamicCache's logits."""
    model, ids = build("llama"), inputs(batch=2, length=11)["input_ids"]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        expected = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    calls: list[int] = []
    prefill = attention.prefill
    monkeypatch.setattr(
        attention, "prefill", lambda query, kv, **kw: calls.append(query.shape[2]) or prefill(query, kv, **kw)
    )
    model.set_attn_implementation(register_attention())
    cache = paged(model)
    with torch.no_grad():
        whole = model(ids, past_key_values=cache).logits
        assert calls == []
        chunked = paged(model)
        first = model(ids[:, :5], past_key_values=chunked).logits
        second = model(ids[:, 5:], past_key_values=chunked).logits
    assert calls == [6, 6]  # the second chunk, in each of the two layers
    torch.testing.assert_close(whole, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([first, second], 1), expected, rtol=1e-4, atol=1e-4)
