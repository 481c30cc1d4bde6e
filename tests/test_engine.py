"""`KVCacheEngine`: token-for-token equality with Hugging Face `generate`, preemption, abort, soak, OOM, threads."""

from __future__ import annotations

import importlib
import random
import threading

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
)

from kv_cache import CacheError, CacheMemoryError, CacheValidationError, KVCacheConfig, KVStore
from kv_cache.engine import (
    EngineConfig,
    FinishReason,
    InvariantCheck,
    KVCacheEngine,
    RequestStatus,
    SamplingParams,
    UltraAdaptiveKVCacheEngine,
)
from kv_cache.reference_model import EOS_ID, PAD_ID, encode, heldout_text

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # conftest.py: tiny models, one thread

STRICT = InvariantCheck.EVERY_STEP
# INT4 blocks of 16 tokens past a 32-token window: prompts of ~100 tokens seal several blocks
INT4_CPU = {"use_quantization": True, "quantization_bits": 4, "block_size": 16, "residual_tokens": 32,
            "quantization_group_size": 32, "max_tokens": 256, "device": "cpu", "num_blocks": 64}  # fmt: skip


def prompts(count: int, seed: int, longest: int = 90, prefix: str = "") -> list[list[int]]:
    """`count` prompts of held-out code with random lengths in [1, longest] bytes after a shared `prefix`."""
    rng, text = random.Random(seed), heldout_text()
    out = []
    for _ in range(count):
        start = rng.randrange(len(text) - longest)
        out.append(encode(prefix + text[start : start + rng.randint(1, longest)]).tolist())
    return out


def hf_greedy(model: PreTrainedModel, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation by `model.generate` with SDPA and a `DynamicCache` (the reference)."""
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=DynamicCache(config=model.config),
        max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def make_engine(model: PreTrainedModel, num_blocks: int = 256, **engine: object) -> KVCacheEngine:
    config = KVCacheConfig(num_blocks=num_blocks, block_size=8, max_tokens=256, device="cpu")
    settings: dict[str, object] = {"invariant_check": STRICT, "prefill_chunk_size": 32, **engine}
    return KVCacheEngine(model, config, EngineConfig(**settings))  # type: ignore[arg-type]


@pytest.mark.parametrize("graphs", [False, True])
def test_matches_hf_generate_with_requests_arriving_mid_run(model: PreTrainedModel, graphs: bool) -> None:
    """With `decode_graphs` the running set (1 to 5 requests) pads to graph batches of 1, 2, 4 and 5."""
    batch = prompts(7, seed=1)
    expected = [hf_greedy(model, p, 24) for p in batch]
    engine = make_engine(model, max_num_seqs=5 if graphs else 3, decode_graphs=graphs)
    sampling = SamplingParams(max_new_tokens=24)
    ids = [engine.add_request(p, sampling) for p in batch[:4]]
    for _ in range(5):
        engine.step()
    ids += [engine.add_request(p, sampling) for p in batch[4:]]
    while engine.scheduler.has_work:
        engine.step()
    assert [engine.get_request(i).output_ids for i in ids] == expected
    assert engine.get_stats()["requests_running"] == 0
    graph_keys = engine._cache.decode_graphs
    assert {b for b, tokens in graph_keys if tokens == 1} == ({1, 2, 4, 5} if graphs else set())
    assert {tokens for _, tokens in graph_keys if tokens > 1} == ({16, 32} if graphs else set())  # prefill chunks


def test_a_random_gqa_llama_matches_hf_generate() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    tiny = LlamaForCausalLM(config).eval()
    batch = [torch.randint(2, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 19, 40)]
    expected = [hf_greedy(tiny, p, 16) for p in batch]
    assert make_engine(tiny).generate(batch, SamplingParams(max_new_tokens=16)) == expected


@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize(("seed", "graphs"), [(0, False), (1, False), (2, False), (2, True)])
def test_preemption_gives_identical_tokens(model: PreTrainedModel, mode: str, seed: int, graphs: bool) -> None:
    batch = prompts(6, seed=seed, prefix="def shared_prefix(x):\n    ")
    sampling = SamplingParams(max_new_tokens=32)
    expected = make_engine(model).generate(batch, sampling)
    tier = {"cpu_tier_blocks": 64} if mode == "swap" else {}
    engine = make_engine(model, num_blocks=18, preemption_mode=mode, decode_graphs=graphs, **tier)
    assert engine.generate(batch, sampling) == expected
    stats = engine.get_stats()
    assert stats[f"preempted_{mode}"] > 0 and stats["swap_fallbacks"] == 0
    assert stats["blocks_used"] == stats["prefix_cache"]["cached_blocks"]


def test_swap_restores_a_quantized_store_bit_for_bit(model: PreTrainedModel) -> None:
    quantized = {"use_quantization": True, "quantization_bits": 4, "block_size": 16, "residual_tokens": 32,
                 "quantization_group_size": 32, "max_tokens": 256, "device": "cpu"}  # fmt: skip
    batch, sampling = prompts(6, seed=3, longest=120, prefix="import os\n" * 8), SamplingParams(max_new_tokens=24)

    def run(num_blocks: int, **engine: object) -> tuple[list[list[int]], KVCacheEngine]:
        settings: dict[str, object] = {"invariant_check": STRICT, "prefill_chunk_size": 48, "max_num_seqs": 4}
        config = KVCacheConfig(num_blocks=num_blocks, **quantized)  # type: ignore[arg-type]
        runner = KVCacheEngine(model, config, EngineConfig(**{**settings, **engine}))  # type: ignore[arg-type]
        return runner.generate(batch, sampling), runner

    expected, _ = run(200)
    outputs, engine = run(16, preemption_mode="swap", cpu_tier_blocks=64)
    assert outputs == expected
    # Step graphs: chunks of 48 > the 32-token window attend to themselves in full precision and seal after the
    # step (KIVI's prefill), so the reference is the graphed engine without memory pressure.
    graphed_expected, _ = run(200, decode_graphs=True)
    graphed, graph_engine = run(16, preemption_mode="swap", cpu_tier_blocks=64, decode_graphs=True)
    assert graphed == graphed_expected
    assert {tokens for _, tokens in graph_engine._cache.decode_graphs} >= {1, 16, 32, 64}  # 64: chunks of 48
    assert engine.get_stats()["preempted_swap"] > 0 and engine.store.quantized_pool is not None


def test_a_long_fresh_quantized_prompt_is_sealed_once_after_the_step(
    model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An eager prefill chunk that starts a prompt and is longer than the window is written whole in full precision
    and sealed after the forward, one seal for every layer; later chunks seal layer by layer. The tokens are those
    of sealing layer by layer throughout (the fresh chunk attends its exact states either way)."""
    prompt, sampling = prompts(1, seed=5, longest=100, prefix="import os\n" * 12)[0], SamplingParams(max_new_tokens=8)

    def run(defer: bool) -> tuple[list[int], list[str]]:
        settings = EngineConfig(invariant_check=STRICT, prefill_chunk_size=48, decode_graphs=False)
        engine = KVCacheEngine(model, KVCacheConfig(**INT4_CPU), settings)  # type: ignore[arg-type]
        sealer = engine.store.sealer
        assert sealer is not None
        calls: list[str] = []
        for name in ("seal", "append"):
            method = getattr(engine.store, name)
            monkeypatch.setattr(engine.store, name, lambda *a, _m=method, _n=name, **k: calls.append(_n) or _m(*a, **k))
        encode = sealer.encode
        monkeypatch.setattr(sealer, "encode", lambda *args: calls.append("encode") or encode(*args))
        if not defer:
            monkeypatch.setattr(engine.store, "fits_unsealed", lambda *args: False)
        return engine.generate([prompt], sampling)[0], calls

    tokens, calls = run(defer=True)
    layers = model.config.num_hidden_layers
    assert len(prompt) > 96 and calls[: layers + 2] == ["append"] * layers + ["seal", "encode"]
    assert calls[layers + 2 : 3 * layers + 2] == ["append", "encode"] * layers  # chunk 2: each layer seals
    assert tokens == run(defer=False)[0]


def test_a_failed_seal_after_the_step_cuts_the_chunk_off_and_a_retry_matches(
    model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seal after the step that fails (here a full sealed pool) leaves every layer holding the chunk while the
    request counts none of it: the engine cuts the sequence back to its computed tokens before re-raising, so the
    next step starts the prompt again and generates what an undisturbed engine does."""
    prompt, sampling = prompts(1, seed=6, longest=100, prefix="import os\n" * 12)[0], SamplingParams(max_new_tokens=6)
    settings = EngineConfig(invariant_check=STRICT, prefill_chunk_size=64, decode_graphs=False)
    expected = KVCacheEngine(model, KVCacheConfig(**INT4_CPU), settings).generate([prompt], sampling)[0]  # type: ignore[arg-type]
    engine = KVCacheEngine(model, KVCacheConfig(**INT4_CPU), settings)  # type: ignore[arg-type]
    seal = engine.store.seal

    def full_pool(seq_ids: list[int]) -> None:
        raise CacheMemoryError("the sealed pool is full")

    monkeypatch.setattr(engine.store, "seal", full_pool)
    request_id = engine.add_request(prompt, sampling)
    with pytest.raises(CacheMemoryError, match="sealed pool is full"):
        engine.step()
    request = engine.get_request(request_id)
    assert request.num_computed == 0 and request.seq_id is not None
    assert engine.store.num_tokens(request.seq_id) == 0
    engine.check_invariants()
    monkeypatch.setattr(engine.store, "seal", seal)
    assert list(engine.stream(request_id)) == expected


def test_a_sliding_window_model_seals_its_fresh_chunks_layer_by_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sliding-window layers attend what their blocks hold even for a fresh prompt, so sealing after the step would
    change what they read: the engine leaves such models to seal each layer as it appends."""
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=40)  # fmt: skip
    torch.manual_seed(0)
    mistral = MistralForCausalLM(config).eval()
    settings = EngineConfig(invariant_check=STRICT, prefill_chunk_size=96, decode_graphs=False)
    engine = KVCacheEngine(mistral, KVCacheConfig(**INT4_CPU), settings)  # type: ignore[arg-type]
    seals: list[list[int]] = []
    seal = engine.store.seal
    monkeypatch.setattr(engine.store, "seal", lambda seq_ids: seals.append(seq_ids) or seal(seq_ids))
    prompt = [random.Random(3).randrange(4, 64) for _ in range(90)]
    assert len(engine.generate([prompt], SamplingParams(max_new_tokens=4))[0]) == 4
    assert seals == []


def test_a_padded_graph_step_evicts_cached_blocks_instead_of_running_eagerly(
    model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler makes room for a chunk's real tokens; its step graph also writes the padding up to the graph's
    width. With the pool full of prefix-cached blocks the engine evicts for the padding too, so the chunk replays
    its graph instead of failing over to an eager step (host-bound on a GPU)."""
    step_graphs = importlib.import_module("kv_cache.decode_graphs")
    failed: list[tuple[int, ...]] = []
    call = step_graphs.StepGraph.__call__

    def recording(self: object, input_ids: torch.Tensor) -> object:
        try:
            return call(self, input_ids)
        except CacheMemoryError:
            failed.append(tuple(input_ids.shape))
            raise

    monkeypatch.setattr(step_graphs.StepGraph, "__call__", recording)
    config = KVCacheConfig(num_blocks=40, block_size=8, max_tokens=256, device="cpu")
    settings = EngineConfig(prefill_chunk_size=32, decode_graphs=True, invariant_check=STRICT)
    engine = KVCacheEngine(model, config, settings)
    rng = random.Random(0)
    for _ in range(6):  # fills the pool with cached blocks
        engine.generate([[rng.randrange(4, 200) for _ in range(64)]], SamplingParams(max_new_tokens=8))
    assert engine.store.pool is not None and engine.store.pool.num_free <= 1
    prompt = [rng.randrange(4, 200) for _ in range(20)]  # 3 blocks; its graph writes 32 tokens: 4
    assert engine.generate([prompt], SamplingParams(max_new_tokens=4))[0] == hf_greedy(model, prompt, 4)
    assert failed == []


def test_abort_frees_waiting_running_and_swapped_requests(model: PreTrainedModel) -> None:
    engine = make_engine(model, num_blocks=14, preemption_mode="swap", cpu_tier_blocks=64, max_num_seqs=4)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=60)) for p in prompts(6, seed=4)]
    while not any(r.swapped is not None for r in engine.scheduler.waiting):
        engine.step()
    assert engine.scheduler.running and engine.tier is not None and engine.tier.stats()["blocks_used"] > 0
    for request_id in ids:
        engine.abort(request_id)
    assert all(engine.get_request(i).finish_reason in (FinishReason.ABORT, FinishReason.LENGTH) for i in ids)
    engine.check_invariants()
    assert engine.store.pool is not None and engine.prefix_cache is not None
    assert engine.store.sequence_ids == []
    assert engine.tier.stats()["blocks_used"] == len(engine.prefix_cache.host_block_ids())  # demoted cache only
    assert engine.store.pool.num_used == len(engine.prefix_cache.device_block_ids())
    assert engine.abort(ids[0]) is False


def test_soak_random_finish_and_abort_returns_to_the_cached_count(model: PreTrainedModel) -> None:
    rng = random.Random(7)
    engine = make_engine(model, num_blocks=40, max_num_seqs=6, prefill_chunk_size=24)
    text = heldout_text()
    live: list[int] = []
    for _ in range(300):
        start = rng.randrange(0, 2000, 40)  # shared starts: many prefix hits
        prompt = encode(text[start : start + rng.randint(1, 40)]).tolist()
        stops = (rng.randrange(256),) if rng.random() < 0.5 else ()
        live.append(engine.add_request(prompt, SamplingParams(max_new_tokens=rng.randint(1, 6), stop_token_ids=stops)))
        if rng.random() < 0.15:
            engine.abort(rng.choice(live))
        if rng.random() < 0.5:
            engine.step()  # invariants are checked after every step
    while engine.scheduler.has_work:
        engine.step()
    stats = engine.get_stats()
    assert stats["finished_requests"] + stats["aborted_requests"] == 300
    assert (
        stats["blocks_used"]
        == stats["prefix_cache"]["cached_blocks"]
        == stats["prefix_cache"]["cached_evictable_blocks"]
    )
    assert stats["prefix_hit_rate"] > 0.1 and stats["prefix_cache"]["evicted_blocks"] > 0


def test_a_request_that_can_never_fit_fails_alone(model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(model, num_blocks=12)
    short = prompts(3, seed=5, longest=20)
    huge_prompt = encode(heldout_text()[:120]).tolist()
    huge = engine.add_request(huge_prompt, SamplingParams(max_new_tokens=8))  # refused at once: 17 > 12 blocks
    assert engine.get_request(huge).status is RequestStatus.FAILED
    monkeypatch.setattr(engine.memory, "never_fits", lambda num_tokens: False)  # now it must fail while running
    late = engine.add_request(huge_prompt, SamplingParams(max_new_tokens=8))
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=8)) for p in short]
    while engine.scheduler.has_work:
        engine.step()
    for request_id in (huge, late):
        with pytest.raises(CacheMemoryError, match="raise num_blocks or memory_budget_mb"):
            list(engine.stream(request_id))
    assert all(len(engine.get_request(i).output_ids) == 8 for i in ids)
    assert engine.get_stats()["failed_requests"] == 1  # the runtime failure; the first never ran
    with pytest.raises(CacheMemoryError, match="raise max_tokens"):
        engine.generate([short[0]], SamplingParams(max_new_tokens=300))


def test_stream_and_seeded_sampling_do_not_depend_on_the_batch(model: PreTrainedModel) -> None:
    sampling = SamplingParams(max_new_tokens=20, temperature=0.8, top_k=40, top_p=0.9, seed=11)
    prompt = prompts(1, seed=6)[0]
    alone = make_engine(model)
    streamed = list(alone.stream(alone.add_request(prompt, sampling)))
    crowded = make_engine(model)
    others = [crowded.add_request(p, SamplingParams(max_new_tokens=20, temperature=1.0)) for p in prompts(3, seed=8)]
    mine = crowded.add_request(prompt, sampling)
    assert list(crowded.stream(mine)) == streamed and len(streamed) == 20
    assert all(crowded.get_request(i).is_done or crowded.abort(i) for i in others)


def test_stop_tokens_end_a_request(model: PreTrainedModel) -> None:
    prompt = prompts(1, seed=9)[0]
    free_run = make_engine(model).generate([prompt], SamplingParams(max_new_tokens=12))[0]
    stopped = make_engine(model).generate([prompt], SamplingParams(max_new_tokens=12, stop_token_ids=(free_run[3],)))
    assert stopped[0] == free_run[: free_run.index(free_run[3]) + 1]


def test_injected_oom_is_rolled_back_retried_and_counted(
    model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = prompts(4, seed=10)
    sampling = SamplingParams(max_new_tokens=10)
    expected = make_engine(model).generate(batch, sampling)
    engine = make_engine(model)
    append, calls = engine.store.append, {"n": 0}

    def flaky_append(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] in (7, 30, 31):  # mid-forward: some layers appended, the rest not
            raise torch.OutOfMemoryError("injected CUDA out of memory")
        append(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.store, "append", flaky_append)
    assert engine.generate(batch, sampling) == expected
    stats = engine.get_stats()
    assert stats["oom_errors"] == 3 and stats["oom_recoveries"] == 2 and stats["oom_failures"] == 0


def test_persistent_oom_raises_a_clear_cache_memory_error(
    model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(model, oom_retries=2)
    engine.add_request(prompts(1, seed=11)[0])

    def no_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("injected CUDA out of memory")

    monkeypatch.setattr(engine.store, "append", no_memory)
    with pytest.raises(CacheMemoryError, match=r"2 retries .* lower prefill_chunk_size or max_num_seqs"):
        engine.step()
    stats = engine.get_stats()
    assert stats["oom_errors"] == 3 and stats["oom_failures"] == 1
    engine.check_invariants()  # rolled back: nothing half-written stays


@pytest.mark.timeout(60)  # a deadlock fails here instead of hanging CI
def test_requests_added_from_threads_while_another_thread_steps(model: PreTrainedModel) -> None:
    batch = prompts(16, seed=12, longest=30, prefix="class Shared:\n")
    sampling = SamplingParams(max_new_tokens=4)
    expected = dict(zip(map(tuple, batch), make_engine(model).generate(batch, sampling), strict=True))
    engine = make_engine(model, max_num_seqs=8)
    added: list[tuple[int, list[int]]] = []  # list.append is atomic
    stop = threading.Event()

    def submit(part: list[list[int]]) -> None:
        for prompt in part:
            added.append((engine.add_request(prompt, sampling), prompt))

    def step() -> None:
        while not stop.is_set() or engine.scheduler.has_work:
            engine.step()  # invariants are checked after every step

    stepper = threading.Thread(target=step)
    stepper.start()
    submitters = [threading.Thread(target=submit, args=(batch[i::4],)) for i in range(4)]
    for thread in submitters:
        thread.start()
    while any(thread.is_alive() for thread in submitters):
        assert isinstance(engine.get_stats()["requests_waiting"], int)  # never blocks on a running step
    stop.set()
    stepper.join()
    assert sorted(request_id for request_id, _ in added) == list(range(16))
    assert all(engine.get_request(i).output_ids == expected[tuple(p)] for i, p in added)
    engine.check_invariants()


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int4"])
def test_the_append_plan_is_exactly_what_append_needs(quantized: bool) -> None:
    """`KVStore.blocks_needed_for_append` (what `MemoryManager.append_needs` asks): with exactly that many blocks
    free an append of every layer succeeds, with one fewer it is refused before anything changes."""
    settings = {"use_quantization": True, "quantization_bits": 4, "residual_tokens": 16,
                "quantization_group_size": 32} if quantized else {}  # fmt: skip
    store = KVStore(KVCacheConfig(num_blocks=48, block_size=8, max_tokens=512, device="cpu", **settings), 2)  # type: ignore[arg-type]
    store.initialize(kv_heads=2, head_dim=32, dtype=torch.float32, device=torch.device("cpu"), batch_size=3)
    pools = [pool for pool in (store.pool, store.quantized_pool) if pool is not None]
    rng = random.Random(3)
    seq = store.add_sequence()
    for _ in range(25):
        count = rng.randint(1, 20)
        needs = store.blocks_needed_for_append(seq, count)
        for short in (1, 0):
            if short and not any(needs):
                continue
            wanted = zip(pools, needs, strict=False)  # (dense, sealed): no sealed pool without quantization
            hogs = [pool.allocate(pool.num_free - need + (short if need else 0)) for pool, need in wanted]
            states, before = torch.randn(2, 1, 2, count, 32), store.num_tokens(seq)
            try:
                for layer in range(2):
                    store.append([seq], layer, states[0], states[1])
                assert not short, f"{count} tokens fitted in {needs} blocks minus one"
            except CacheMemoryError:
                assert short and store.num_tokens(seq) == before  # refused by layer 0, nothing changed
            for pool, hog in zip(pools, hogs, strict=True):
                pool.release(hog)
    store.check_invariants()


def test_the_idle_check_names_a_leaked_block(model: PreTrainedModel) -> None:
    engine = make_engine(model)
    engine.generate(prompts(2, seed=13), SamplingParams(max_new_tokens=3))
    assert engine.store.pool is not None
    engine.store.pool.allocate(1)  # a block nobody holds
    with pytest.raises(CacheError, match=r"free \d+ \+ referenced 0 \+ cached-evictable \d+ = \d+ != capacity 256"):
        engine.check_invariants()


def test_config_errors_name_the_field(model: PreTrainedModel) -> None:
    with pytest.raises(CacheValidationError, match="preemption_mode='swap' needs a CPU tier"):
        EngineConfig(preemption_mode="swap")
    with pytest.raises(CacheValidationError, match="prefill_chunk_size=0"):
        EngineConfig(prefill_chunk_size=0)
    with pytest.raises(CacheValidationError, match="cpu_tier_blocks=4 and cpu_tier_mb=1"):
        EngineConfig(cpu_tier_blocks=4, cpu_tier_mb=1)
    with pytest.raises(CacheValidationError, match="top_p=0"):
        SamplingParams(top_p=0)
    with pytest.raises(CacheValidationError, match="prompt_ids"):
        make_engine(model).add_request([])
    with pytest.raises(CacheValidationError, match="token eviction"):
        KVCacheEngine(model, KVCacheConfig(token_budget=64, device="cpu"))
    assert UltraAdaptiveKVCacheEngine is KVCacheEngine and EOS_ID == 257
