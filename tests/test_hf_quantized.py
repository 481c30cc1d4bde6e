"""A quantized KVCache inside Hugging Face `generate` (tiny random Llama, quantization active from the prompt)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kv_cache import KVCache, KVCacheConfig
from kv_cache.hf_attention import register_attention

MODEL = LlamaConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
)  # fmt: skip


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(copy.deepcopy(MODEL)).eval()  # its own config: tests set the attention on it


def quantized_cache(bits: int, lm: LlamaForCausalLM | None = None, **overrides: object) -> KVCache:
    options = {
        "max_tokens": 160, "block_size": 16, "use_quantization": True, "quantization_bits": bits,
        "quantization_group_size": 16, "residual_tokens": 16, "device": "cpu", **overrides,
    }  # fmt: skip
    return KVCache(KVCacheConfig(**options), MODEL if lm is None else lm.config)  # type: ignore[arg-type]


def prompt(batch: int = 1, length: int = 40) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 96, (batch, length), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_int8_greedy_matches_the_full_precision_cache() -> None:
    lm = model()
    reference = lm.generate(**prompt(), past_key_values=DynamicCache(config=MODEL), max_new_tokens=16, do_sample=False)
    cache = quantized_cache(8)
    ours = lm.generate(**prompt(), past_key_values=cache, max_new_tokens=16, do_sample=False)
    assert torch.equal(reference, ours)
    stats = cache.get_stats()
    assert stats["quantized_blocks_used"] >= 2 and stats["compression_ratio"] > 3.0  # fp32 model vs INT8 + scales


@pytest.mark.parametrize("bits", [4, 2])
def test_low_bit_widths_run_end_to_end(bits: int) -> None:
    cache = quantized_cache(bits)
    out = model().generate(**prompt(batch=2), past_key_values=cache, max_new_tokens=24, do_sample=False)
    assert out.shape == (2, 64)
    cache.store.check_invariants()
    stats = cache.get_stats(include_quantization_error=True)
    assert stats["quantized_blocks_used"] == 2 * 2  # 63 tokens, 16-token window: 2 sealed blocks per row
    errors = stats["quantization_error"]["layers"]
    assert len(errors) == 3 and all(row["bits"] == bits for row in errors)
    bound = {4: 0.2, 2: 0.7}[bits]
    assert all(0 < row["key_error"] < bound and 0 < row["value_error"] < bound for row in errors)


def test_beam_search_and_crop_with_a_quantized_cache() -> None:
    lm = model()
    cache = quantized_cache(4)
    out = lm.generate(**prompt(), past_key_values=cache, max_new_tokens=12, num_beams=4, do_sample=False)
    assert out.shape == (1, 52)
    cache.store.check_invariants()
    assert not cache.is_croppable
    length = cache.get_seq_length()
    cache.crop(-20)  # cuts into a sealed block: it is dequantized back into the tail
    assert cache.get_seq_length() == length - 20
    cache.store.check_invariants()


def test_mixed_precision_layers_through_the_config() -> None:
    cache = quantized_cache(2, layer_bits={0: 8, -1: 8})
    model().generate(**prompt(), past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert cache.store.layer_bits == (8, 2, 8)
    rows = cache.get_stats(include_quantization_error=True)["quantization_error"]["layers"]
    assert [row["bits"] for row in rows] == [8, 2, 8]
    assert rows[0]["key_error"] < rows[1]["key_error"]


@pytest.mark.parametrize("attention", ["sdpa", "paged"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_a_prompt_attends_its_exact_states_and_later_tokens_the_quantized_cache(attention: str, bits: int) -> None:
    """KIVI's prefill: the prompt's logits are DynamicCache's exactly, whatever the bit width (the blocks still hold
    codes). The next token reads the sealed blocks: its logits move by the quantization
    error, and the dense read (sdpa) and the paged kernels agree on them."""
    lm = model()
    batch, step = prompt(batch=2, length=40), torch.tensor([[7], [9]])
    with torch.no_grad():
        dynamic = DynamicCache(config=MODEL)
        expected = lm(**batch, past_key_values=dynamic).logits
        expected_step = lm(input_ids=step, past_key_values=dynamic).logits
        lm.set_attn_implementation("sdpa" if attention == "sdpa" else register_attention())
        cache = quantized_cache(bits, lm)
        logits = lm(**batch, past_key_values=cache).logits
        assert cache.get_stats()["quantized_blocks_used"] == 2  # 40 tokens, a 16-token window: one sealed per row
        logits_step = lm(input_ids=step, past_key_values=cache).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    error = (logits_step - expected_step).abs().max().item()
    assert 0 < error < {8: 0.02, 4: 0.2, 2: 1.0}[bits]


def test_the_quantized_step_after_an_exact_prompt_is_the_same_through_both_attentions() -> None:
    lm = model()
    batch, step = prompt(batch=2, length=40), torch.tensor([[7], [9]])
    logits = {}
    for implementation in ("sdpa", register_attention()):
        lm.set_attn_implementation(implementation)
        cache = quantized_cache(4, lm)
        assert cache.reads_paged == (implementation != "sdpa")
        with torch.no_grad():
            lm(**batch, past_key_values=cache)
            logits[implementation] = lm(input_ids=step, past_key_values=cache).logits
    torch.testing.assert_close(logits["sdpa"], logits[register_attention()], rtol=1e-4, atol=1e-4)
