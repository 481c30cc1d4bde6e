"""`PrefixCache`: content hashes (stable across processes, no algebraic collisions), verified hits, reference
counts, eviction by every strategy, and the engine's prefix reuse (identical tokens on vs off)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch
from transformers import PreTrainedModel

from kv_cache import BlockFormat, BlockPool, CacheStrategy, KVCacheConfig
from kv_cache import prefix_cache as prefix_module
from kv_cache.engine import EngineConfig, InvariantCheck, KVCacheEngine, SamplingParams
from kv_cache.prefix_cache import PrefixCache, chain_hashes, model_fingerprint, root_hash
from kv_cache.reference_model import encode, heldout_text

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # conftest.py: tiny models, one thread
FORMAT = BlockFormat(block_size=4, num_layers=2, kv_heads=2, head_dim=8, dtype=torch.float32)
HASH_SCRIPT = """
import torch
from transformers import LlamaConfig
from kv_cache import BlockFormat
from kv_cache.prefix_cache import chain_hashes, model_fingerprint, root_hash

fmt = BlockFormat(block_size=16, num_layers=4, kv_heads=2, head_dim=64, dtype=torch.bfloat16)
root = root_hash("tenant-a", model_fingerprint(LlamaConfig(num_hidden_layers=4), torch.bfloat16), fmt)
keys = []
chain_hashes(root, list(range(1000, 1100)), 16, keys)
print(root.hex(), *(key.hex() for key in keys))
"""


def engine_for(model: PreTrainedModel, num_blocks: int = 128, **overrides: object) -> KVCacheEngine:
    options: dict[str, object] = {"num_blocks": num_blocks, "block_size": 8, "max_tokens": 256, "device": "cpu"}
    engine_options: dict[str, object] = {"invariant_check": InvariantCheck.EVERY_STEP, "prefill_chunk_size": 32}
    for key, value in overrides.items():
        (engine_options if key in EngineConfig.__dataclass_fields__ else options)[key] = value
    return KVCacheEngine(model, KVCacheConfig(**options), EngineConfig(**engine_options))  # type: ignore[arg-type]


def shared_prompts() -> list[list[int]]:
    text = heldout_text()
    system = text[:70]
    return [encode(system + text[1000 * i : 1000 * i + 5 + 9 * i]).tolist() for i in range(5)] + [
        encode(system).tolist(),  # the whole prompt is cached: only its last token is recomputed
        encode("ab" * 20).tolist(),  # identical blocks at different positions
        encode("ab").tolist(),  # shorter than one block
    ]


# --------------------------------------------------------------------------------------------------- hashing
def test_keys_are_equal_across_processes_whatever_pythonhashseed_says() -> None:
    seed = "1" if os.environ.get("PYTHONHASHSEED") == "12345" else "12345"
    child = subprocess.run(
        [sys.executable, "-c", HASH_SCRIPT + "print(hash('probe'))"],
        env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()) as here:
        exec(HASH_SCRIPT, {})
    keys, child_probe = child.stdout.rsplit("\n", 2)[0].strip(), child.stdout.split()[-1]
    assert int(child_probe) != hash("probe")  # the two processes really hash strings differently
    assert keys == here.getvalue().strip() and len(keys.split()) == 1 + 6


def test_megatron_near_collision_and_every_input_changes_the_key() -> None:
    tokens = list(range(100, 116))
    tweaked = list(tokens)
    tweaked[1] += 31
    tweaked[2] -= 1  # the algebraic collision of a polynomial rolling hash (Megatron-LM#4158)
    root = root_hash("ns", "model", FORMAT)
    keys = [chain_hashes_of(root, t) for t in (tokens, tweaked)]
    assert keys[0][-1] != keys[1][-1] and keys[0][0] != keys[1][0]
    assert len({root, root_hash("other", "model", FORMAT), root_hash("ns", "other", FORMAT)}) == 3
    assert root != root_hash("ns", "model", BlockFormat(4, 2, 2, 8, torch.float16))
    same_block_other_parent = chain_hashes_of(root, [7, 7, 7, 7, 7, 7, 7, 7])
    assert same_block_other_parent[0] != same_block_other_parent[1]


def chain_hashes_of(root: bytes, tokens: list[int]) -> list[bytes]:
    keys: list[bytes] = []
    chain_hashes(root, tokens, 4, keys)
    return keys


def test_model_fingerprint_follows_config_and_dtype_not_the_attention_implementation(model: PreTrainedModel) -> None:
    before = model_fingerprint(model.config, torch.float32)
    model.set_attn_implementation("eager")
    assert model_fingerprint(model.config, torch.float32) == before
    assert model_fingerprint(model.config, torch.bfloat16) != before


# ---------------------------------------------------------------------------------------- cache, directly
def test_register_share_evict_and_verified_lookup() -> None:
    pool = BlockPool(FORMAT, 8, torch.device("cpu"))
    cache = PrefixCache(pool, CacheStrategy.LRU, root_hash("ns", "model", FORMAT))
    tokens = list(range(12))
    keys = chain_hashes_of(cache.root, tokens)
    blocks = pool.allocate(3)  # a sequence holds them
    serials: list[int | None] = []
    for i in range(3):
        serials.append(cache.register(keys[i], serials[-1] if i else None, tuple(tokens[4 * i : 4 * i + 4]), blocks[i]))
    assert [pool.ref_count(b) for b in blocks] == [2, 2, 2]
    assert cache.register(keys[1], serials[0], tuple(tokens[4:8]), pool.allocate(1)[0]) == serials[1]  # duplicate
    assert cache.evict(3) == 0  # the sequence still uses them
    pool.release(blocks)
    assert [e.block_id for e in cache.lookup(keys, tokens, max_blocks=2)] == blocks[:2]
    assert [e.block_id for e in cache.lookup(keys, [*tokens[:4], 99, *tokens[5:]], max_blocks=3)] == blocks[:1]
    assert cache.counters["verify_failures"] == 1
    assert cache.evict(2) == 2 and [pool.ref_count(b) for b in blocks] == [1, 0, 0]  # tail first, head stays
    assert cache.check_invariants() == []


def test_a_different_block_under_a_used_key_is_refused() -> None:
    pool = BlockPool(FORMAT, 4, torch.device("cpu"))
    cache = PrefixCache(pool, CacheStrategy.LFU, root_hash("ns", "model", FORMAT))
    first, second = pool.allocate(2)
    assert cache.register(b"k" * 16, None, (1, 2, 3, 4), first) is not None
    assert cache.register(b"k" * 16, None, (5, 6, 7, 8), second) is None  # `first` is in use: keep it
    pool.release([first])
    assert cache.register(b"k" * 16, None, (5, 6, 7, 8), second) is not None  # unused now: replaced
    assert pool.ref_count(first) == 0 and cache.counters["insert_conflicts"] == 1


def test_insert_chain_caches_fetched_blocks_within_room_and_never_collects_them() -> None:
    pool = BlockPool(FORMAT, 4, torch.device("cpu"))
    cache = PrefixCache(pool, CacheStrategy.LRU, root_hash("ns", "model", FORMAT), collect_new=True)
    tokens = list(range(16))
    keys = chain_hashes_of(cache.root, tokens)
    (held,) = pool.allocate(1)
    first = cache.register(keys[0], None, tuple(tokens[:4]), held)
    assert [e.serial for e in cache.take_new_blocks()] == [first] and cache.take_new_blocks() == []
    fetched = [pool.export_blocks([held])[0] for _ in range(3)]
    for index, tensors in enumerate(fetched):
        tensors[0].fill_(index + 1.0)
    blocks = [(keys[i + 1], tuple(tokens[4 * (i + 1) : 4 * (i + 2)]), fetched[i]) for i in range(3)]
    assert cache.room(reserved=1, protect={first}) == 2  # 3 free, 1 promised elsewhere; the parent is protected
    entries = cache.insert_chain(blocks, cache.lookup(keys, tokens, 1)[0], reserved=1, protect={first})
    assert len(entries) == 2 and entries[0].parent == first and entries[1].parent == entries[0].serial
    assert [pool.dense(0).keys[e.block_id].flatten()[0].item() for e in entries if e.block_id is not None] == [1, 2]
    assert pool.num_free == 1 and cache.take_new_blocks() == []  # fetched blocks are never written back
    pool.release([held])
    assert [e.serial for e in cache.lookup(keys, [*tokens, 0], 4)] == [first, *(e.serial for e in entries)]
    assert cache.counters["imported_blocks"] == 2 and cache.check_invariants() == []


# ------------------------------------------------------------------------------------------ through the engine
def test_prefix_caching_on_and_off_give_identical_tokens(model: PreTrainedModel) -> None:
    batch, sampling = shared_prompts(), SamplingParams(max_new_tokens=12)
    expected = engine_for(model, enable_prefix_caching=False).generate(batch, sampling)
    engine = engine_for(model)
    ids = [engine.add_request(p, sampling) for p in batch[:1]]
    engine.step()
    engine.step()
    ids += [engine.add_request(p, sampling) for p in batch[1:]]
    while engine.scheduler.has_work:
        engine.step()
    assert [engine.get_request(i).output_ids for i in ids] == expected
    stats = engine.get_stats()
    assert 0 < stats["prefix_hit_rate"] < 1 and stats["short_prompts"] == 1
    assert stats["prompt_hit_tokens"] == sum(engine.request_stats(i)["prefix_hit_tokens"] for i in ids)
    whole = engine.request_stats(ids[5])
    assert whole["prefix_hit_tokens"] == (whole["prompt_tokens"] - 1) // 8 * 8  # last token recomputed
    assert engine.request_stats(ids[3])["hit_rate"] > 0.5 and engine.request_stats(ids[0])["hit_rate"] == 0
    assert engine.request_stats(ids[3])["time_to_first_token_s"] > 0
    history = engine.get_stats(include_history=True)["history"]
    assert len(history) > 3 and history[-1]["hit_rate"] == stats["prefix_hit_rate"]


def test_blocks_are_cached_only_once_full_and_written(model: PreTrainedModel) -> None:
    engine = engine_for(model, prefill_chunk_size=12)
    engine.add_request(encode(heldout_text()[:30]).tolist(), SamplingParams(max_new_tokens=2))
    engine.step()  # 12 tokens written: one full block of 8, the second half full
    assert engine.prefix_cache is not None and engine.prefix_cache.counters["registered_blocks"] == 1
    engine.step()
    assert engine.prefix_cache.counters["registered_blocks"] == 3


def test_a_constant_hash_never_reuses_wrong_kv(model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    batch, sampling = shared_prompts(), SamplingParams(max_new_tokens=10)
    expected = engine_for(model, enable_prefix_caching=False).generate(batch, sampling)
    monkeypatch.setattr(prefix_module, "block_hash", lambda parent, token_bytes: b"\0" * 16)
    engine = engine_for(model)
    assert engine.generate(batch + batch, sampling) == expected + expected
    counters = engine.get_stats()["prefix_cache"]
    assert counters["verify_failures"] > 0 and counters["registered_blocks"] > 1


@pytest.mark.parametrize("strategy", list(CacheStrategy))
def test_every_strategy_evicts_cached_blocks_when_the_pool_needs_them(
    model: PreTrainedModel, strategy: CacheStrategy
) -> None:
    batch, sampling = shared_prompts(), SamplingParams(max_new_tokens=12)
    expected = engine_for(model, enable_prefix_caching=False).generate(batch, sampling)
    engine = engine_for(model, num_blocks=16, cache_strategy=strategy, max_num_seqs=2)
    assert engine.generate(batch, sampling) == expected
    stats = engine.get_stats()
    assert stats["prefix_cache"]["evicted_blocks"] > 0 and stats["prefix_hit_rate"] > 0
    assert stats["blocks_used"] == stats["prefix_cache"]["cached_blocks"]


def test_a_quantized_store_shares_only_sealed_blocks(model: PreTrainedModel) -> None:
    quantized = {"use_quantization": True, "quantization_bits": 8, "block_size": 16, "residual_tokens": 32,
                 "quantization_group_size": 32, "num_blocks": 64}  # fmt: skip
    text = heldout_text()
    batch = [encode(text[:150] + text[2000 * i : 2000 * i + 20]).tolist() for i in range(1, 4)]
    sampling = SamplingParams(max_new_tokens=8)
    expected = engine_for(model, enable_prefix_caching=False, **quantized).generate(batch, sampling)
    engine = engine_for(model, **quantized)
    assert engine.generate(batch, sampling) == expected
    assert engine.prefix_cache is not None and engine.prefix_cache.pool is engine.store.quantized_pool
    assert engine.get_stats()["prompt_hit_tokens"] == 2 * 128  # 8 sealed blocks of the shared 150 (+BOS-free) text
