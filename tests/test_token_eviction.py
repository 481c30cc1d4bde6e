"""Token eviction: compaction per KV head, window/sinks, heavy hitters, budgets, and generation past the budget."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kv_cache import BaseKVCache, CacheStrategy, CacheValidationError, KVCache, KVCacheConfig, KVStore
from kv_cache.hf_attention import register_attention
from kv_cache.reference_model import decode, greedy_continuation, load_reference_model, make_needle_prompt
from kv_cache.token_eviction import POOL_KERNEL, pooled

HEADS, DIM = 2, 4


def store_with(tokens: int, **overrides: object) -> tuple[KVStore, int, torch.Tensor]:
    options = {"block_size": 4, "max_tokens": 64, "device": "cpu", "token_budget": 8, **overrides}
    store = KVStore(KVCacheConfig(**options), num_layers=2)  # type: ignore[arg-type]
    seq = store.add_sequence()
    keys = torch.randn(1, HEADS, tokens, DIM, generator=torch.Generator().manual_seed(tokens))
    for layer in range(2):
        store.append([seq], layer, keys, keys * 2)
    return store, seq, keys


def test_keep_tokens_compacts_each_head_and_releases_blocks() -> None:
    store, seq, keys = store_with(13)
    keep = torch.tensor([[[0, 3, 4, 12], [1, 2, 10, 11]]])  # different tokens per KV head
    store.keep_tokens([seq], 0, keep)
    got_k, got_v = store.read([seq], 0)
    for head in range(HEADS):
        torch.testing.assert_close(got_k[0, head], keys[0, head, keep[0, head]], rtol=0, atol=0)
        torch.testing.assert_close(got_v[0, head], 2 * keys[0, head, keep[0, head]], rtol=0, atol=0)
    assert store.num_tokens(seq, 0) == 4 and store.num_seen(seq, 0) == 13
    assert store.pool is not None and store.pool.num_used == 4  # layer 1 still holds 13 tokens
    store.keep_tokens([seq], 1, keep)
    assert store.pool.num_used == 1
    store.check_invariants()


def test_keep_tokens_copies_shared_blocks_first() -> None:
    store, seq, keys = store_with(13)
    child = store.fork(seq)
    store.keep_tokens([child], 0, torch.tensor([[[9, 10, 11, 12]] * HEADS]))
    torch.testing.assert_close(store.read([seq], 0)[0], keys, rtol=0, atol=0)  # the parent is untouched
    torch.testing.assert_close(store.read([child], 0)[0], keys[:, :, 9:], rtol=0, atol=0)
    store.check_invariants()


def test_window_with_sinks_keeps_the_first_and_the_newest_tokens() -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=4, token_budget=8, sink_tokens=2, max_tokens=64))
    tokens = torch.randn(1, HEADS, 40, DIM)
    for position in range(40):
        keys, _, info = cache.forward(tokens[:, :, position : position + 1], tokens[:, :, position : position + 1])
    held = keys.shape[2]
    assert 8 <= held <= 8 + 4 and info["seq_length"] == 40 and info["evicted_tokens"] == 40 - held
    expected = torch.cat([tokens[:, :, :2], tokens[:, :, 40 - (held - 2) :]], dim=2)
    torch.testing.assert_close(keys, expected, rtol=0, atol=0)
    assert cache.get_stats()["evictions_by_policy"] == {"lru": 40 - held}


def test_heavy_hitters_keep_whole_phrases_and_the_recent_window() -> None:
    config = KVCacheConfig(block_size=4, token_budget=64, cache_strategy=CacheStrategy.LFU, max_tokens=512)
    cache = BaseKVCache(config)
    prompt = torch.randn(1, HEADS, 200, DIM)
    cache.forward(prompt, prompt)
    weights = torch.full((1, 2 * HEADS, 1, 200), 0.001)
    weights[..., [20, 100]] = 1.0  # heavy hitters; SnapKV pooling keeps their +-7 neighbours with them
    weights[..., 150:] = 0.0  # the newest tokens have received nothing yet, and still stay (the recent window)
    cache.record_attention(weights)
    keys, _, _ = cache.forward(torch.randn(1, HEADS, 1, DIM), torch.randn(1, HEADS, 1, DIM))
    held = [
        next(j for j in range(200) if torch.equal(keys[0, :, i], prompt[0, :, j])) for i in range(keys.shape[2] - 1)
    ]
    recent = min(config.observation_window, 63 // 2)  # half the budget at most (H2O's even split)
    assert set(range(13, 28)) | set(range(93, 108)) | set(range(200 - recent, 200)) <= set(held)
    assert keys.shape[2] == 64  # the budget, the new token included


def test_pooling_spreads_a_score_over_the_kernel() -> None:
    mass = torch.zeros(1, 1, 40)
    mass[0, 0, 20] = 1.0
    got = pooled(mass)[0, 0]
    half = POOL_KERNEL // 2
    assert got.shape == (40,) and torch.equal(got.nonzero().flatten(), torch.arange(20 - half, 21 + half))
    assert pooled(torch.zeros(1, 2, 0)).shape == (1, 2, 0)


def test_window_policy_keeps_no_separate_recent_window() -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=4, token_budget=16, max_tokens=128))  # LRU: the window is the pick
    tokens = torch.randn(1, HEADS, 60, DIM)
    cache.forward(tokens, tokens)
    keys, _, _ = cache.forward(tokens[:, :, :1], tokens[:, :, :1])
    torch.testing.assert_close(keys[:, :, :-1], tokens[:, :, 60 - 15 :], rtol=0, atol=0)


def test_compression_ratio_budget_grows_with_the_sequence() -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=4, compression_ratio=0.75, max_tokens=256))
    for _ in range(10):
        keys, _, info = cache.forward(torch.randn(1, HEADS, 16, DIM), torch.randn(1, HEADS, 16, DIM))
    assert info["seq_length"] == 160
    assert 40 <= keys.shape[2] <= 40 + 4 + 16  # a quarter kept, plus a block of slack and the new tokens


def test_bad_eviction_configs_name_the_field() -> None:
    with pytest.raises(CacheValidationError, match=r"compression_ratio=1\.5"):
        KVCacheConfig(compression_ratio=1.5)
    with pytest.raises(CacheValidationError, match="set only one"):
        KVCacheConfig(token_budget=8, compression_ratio=0.5)
    with pytest.raises(CacheValidationError, match="sink_tokens=8 must be smaller"):
        KVCacheConfig(token_budget=8, sink_tokens=8)
    with pytest.raises(CacheValidationError, match="with use_quantization=True is not supported"):
        KVCacheConfig(token_budget=8, use_quantization=True)


MODEL = LlamaConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
)  # fmt: skip


def model(attention: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(MODEL).eval()
    lm.set_attn_implementation(attention)
    return lm


@pytest.mark.parametrize(
    ("strategy", "attention"),
    [(CacheStrategy.LRU, "sdpa"), (CacheStrategy.LRU, "paged"), (CacheStrategy.LFU, "paged"),
     (CacheStrategy.ADAPTIVE, "paged")],
)  # fmt: skip
def test_generation_runs_past_the_budget(strategy: CacheStrategy, attention: str) -> None:
    lm = model(register_attention() if attention == "paged" else "sdpa")
    config = KVCacheConfig(block_size=4, max_tokens=128, token_budget=16, sink_tokens=2, cache_strategy=strategy)
    cache = KVCache(config, MODEL)
    prompt = torch.randint(2, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache, max_new_tokens=30)
    assert out.shape == (2, 70)
    assert cache.get_seq_length() == 69  # positions keep counting evicted tokens
    assert cache.store.num_tokens(cache.seq_ids[0]) <= 16 + 4  # budget plus at most a block of slack
    cache.store.check_invariants()


def test_a_budget_larger_than_the_sequence_changes_nothing() -> None:
    lm = model(register_attention())
    prompt = torch.randint(2, 96, (1, 20), generator=torch.Generator().manual_seed(2))
    lm.set_attn_implementation("sdpa")
    expected = lm.generate(prompt, past_key_values=DynamicCache(config=MODEL), max_new_tokens=10, do_sample=False)
    lm.set_attn_implementation(register_attention())
    config = KVCacheConfig(block_size=4, token_budget=64, cache_strategy=CacheStrategy.LFU)
    got = lm.generate(prompt, past_key_values=KVCache(config, MODEL), max_new_tokens=10, do_sample=False)
    assert torch.equal(expected, got)


def test_heavy_hitters_without_the_paged_attention_is_refused() -> None:
    lm = model("sdpa")
    cache = KVCache(KVCacheConfig(block_size=4, token_budget=16, cache_strategy=CacheStrategy.LFU), MODEL)
    with pytest.raises(CacheValidationError, match="register_attention"):
        lm.generate(torch.randint(2, 96, (1, 8)), past_key_values=cache, max_new_tokens=2)


def test_beam_search_with_eviction_keeps_the_pool_consistent() -> None:
    lm = model(register_attention())
    config = KVCacheConfig(block_size=4, max_tokens=128, token_budget=12, cache_strategy=CacheStrategy.ADAPTIVE)
    cache = KVCache(config, MODEL)
    prompt = torch.randint(2, 96, (1, 30), generator=torch.Generator().manual_seed(3))
    lm.generate(prompt, past_key_values=cache, max_new_tokens=12, num_beams=3, do_sample=False)
    cache.store.check_invariants()


def test_heavy_hitters_retrieve_a_needle_at_4x_on_the_reference_model() -> None:
    lm = load_reference_model()
    lm.set_attn_implementation(register_attention())
    prompt, answer = make_needle_prompt(512, 0.5, seed=100)  # a tuning probe: a 7-token pooling lost its 5th byte
    config = KVCacheConfig(max_tokens=1024, compression_ratio=0.75, sink_tokens=4, cache_strategy=CacheStrategy.LFU)
    cache = KVCache(config, lm.config)
    got = greedy_continuation(lm, prompt, answer.numel(), past_key_values=cache)
    assert decode(got) == decode(answer)
    assert cache.store.num_tokens(cache.seq_ids[0]) <= 512 // 4 + config.block_size  # really a quarter held
