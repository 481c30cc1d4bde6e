"""CacheMode.TRAINING: gradients flow through the paged cache; lossy options are refused at config time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from kv_cache import BaseKVCache, CacheMode, CacheValidationError, KVCache, KVCacheConfig

MODEL = LlamaConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip


def gradients(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def test_two_chunks_through_the_cache_give_the_gradients_of_one_forward() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(MODEL)
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    expected = gradients(model)
    model.zero_grad()
    cache = KVCache(KVCacheConfig(block_size=4, max_tokens=64, cache_mode=CacheMode.TRAINING), MODEL)
    first = model(input_ids=ids[:, :11], past_key_values=cache).logits
    second = model(input_ids=ids[:, 11:], past_key_values=cache).logits
    logits = torch.cat([first, second], dim=1)
    F.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1)).backward()
    got = gradients(model)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    cache.reset()
    assert cache.store.pool is not None and cache.store.pool.dense(0).keys.grad_fn is None


def test_seed_cache_returns_states_that_carry_gradients() -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=4, cache_mode=CacheMode.TRAINING))
    key = torch.randn(1, 2, 5, 8, requires_grad=True)
    value = torch.randn(1, 2, 5, 8, requires_grad=True)
    keys, values, _ = cache.forward(key, value)
    (keys.sum() + 2 * values.sum()).backward()
    assert key.grad is not None and torch.equal(key.grad, torch.ones_like(key))
    assert value.grad is not None and torch.equal(value.grad, torch.full_like(value, 2.0))


@pytest.mark.parametrize(
    ("options", "named"),
    [({"use_quantization": True}, "use_quantization"), ({"token_budget": 8}, "token eviction"),
     ({"compression_ratio": 0.5}, "token eviction")],
)  # fmt: skip
def test_lossy_options_are_refused_in_training(options: dict[str, object], named: str) -> None:
    with pytest.raises(CacheValidationError, match=f"{named}.*TRAINING"):
        KVCacheConfig(cache_mode=CacheMode.TRAINING, **options)  # type: ignore[arg-type]
