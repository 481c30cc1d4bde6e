"""`decode_graphs`: decode steps over fixed buffers (captured in a CUDA graph on a GPU) give the eager path's
tokens; `KVStore.reserve` plans a step exactly as `append` would."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedModel

from kv_cache import CacheMemoryError, CacheStrategy, CacheValidationError, KVCache, KVCacheConfig, KVStore
from kv_cache import decode_graphs as decode_graphs_api
from kv_cache.decode_graphs import StepGraph, decode_graphs, padded_size
from kv_cache.hf_attention import register_attention

COMMON = {
    "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": 0,
    "eos_token_id": None,
}  # fmt: skip
FORMATS = {
    "fp32": {},
    "bf16 blocks": {"dtype": torch.bfloat16},
    "int4": {"use_quantization": True, "quantization_bits": 4, "residual_tokens": 8},
    "int2 window 4": {"use_quantization": True, "quantization_bits": 2, "residual_tokens": 4},
}


def build(
    sliding: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32, hidden: int = 64
) -> PreTrainedModel:
    """A tiny Llama (Mistral with a sliding window); head_dim = hidden / 4."""
    torch.manual_seed(0)
    common = {**COMMON, "hidden_size": hidden, "intermediate_size": 2 * hidden}
    if sliding:
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=7))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model = model.to(device=device, dtype=dtype).eval()
    model.set_attn_implementation(register_attention())
    return model


def prompt(batch: int, length: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 96, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def cache_for(model: PreTrainedModel, device: str = "cpu", **overrides: object) -> KVCache:
    options = {"block_size": 4, "max_tokens": 80, "device": device, **overrides}
    return KVCache(KVCacheConfig(**options), model.config)  # type: ignore[arg-type]


def eager_and_graphed(model: PreTrainedModel, batch: dict, device: str = "cpu", **overrides: object) -> tuple:
    """Greedy tokens of the eager paged path and of decode_graphs, and the graphed cache (its `eager_stats`:
    the eager cache's stats)."""
    eager_cache = cache_for(model, device, **overrides)
    eager = model.generate(**batch, past_key_values=eager_cache, max_new_tokens=30, do_sample=False)
    cache = cache_for(model, device, **overrides)
    with decode_graphs(model):
        graphed = model.generate(**batch, past_key_values=cache, max_new_tokens=30, do_sample=False)
    cache.store.check_invariants()
    cache.eager_stats = eager_cache.get_stats()  # type: ignore[attr-defined]
    return eager, graphed, cache


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize(("batch", "length"), [(1, 1), (3, 13), (2, 16)])
def test_graphed_decode_matches_eager(fmt: str, batch: int, length: int) -> None:
    model = build()
    eager, graphed, cache = eager_and_graphed(model, prompt(batch, length), **FORMATS[fmt])
    assert torch.equal(eager, graphed)
    assert len(cache.decode_graphs) == 1  # every decode step ran the static step
    stats, eager_stats = cache.get_stats(), cache.eager_stats  # type: ignore[attr-defined]
    for name in ("hit_rate", "cached_tokens_read", "new_tokens_read", "tokens", "blocks_used"):
        assert stats[name] == eager_stats[name], name


@pytest.mark.parametrize("kwargs", [{"num_beams": 3}, {"do_sample": True, "top_k": 5}])
def test_beam_search_and_sampling_match_eager(kwargs: dict) -> None:
    """Beams reorder the rows (forked tables, copy-on-write at the next reserve); sampling draws from the logits."""
    model, batch = build(), prompt(2, 11)
    results = []
    for graphs in (False, True):
        cache = cache_for(model)
        torch.manual_seed(5)
        with decode_graphs(model) if graphs else contextlib.nullcontext():
            results.append(model.generate(**batch, past_key_values=cache, max_new_tokens=15, **kwargs))
        cache.store.check_invariants()
    assert torch.equal(*results)
    assert cache.decode_graphs


def test_sliding_window_model_matches_eager() -> None:
    eager, graphed, cache = eager_and_graphed(build(sliding=True), prompt(2, 9))
    assert torch.equal(eager, graphed) and cache.decode_graphs


def test_forward_is_restored_and_prefill_stays_eager() -> None:
    model = build()
    bound = model.forward
    with decode_graphs(model) as same:
        assert same is model and "forward" in model.__dict__
        cache = cache_for(model)
        model(**prompt(2, 5), past_key_values=cache)  # a prefill: eager, no graph
        assert not cache.decode_graphs
    assert "forward" not in model.__dict__ and model.forward == bound


def test_a_reset_cache_reuses_its_graph() -> None:
    model = build()
    options = {"use_quantization": True, "quantization_bits": 4, "residual_tokens": 8}
    cache = cache_for(model, **options)
    outputs = []
    with decode_graphs(model):
        for length in (13, 6):
            cache.reset()
            outputs.append(model.generate(**prompt(2, length), past_key_values=cache, max_new_tokens=20))
            cache.store.check_invariants()
    assert len(cache.decode_graphs) == 1
    for length, graphed in zip((13, 6), outputs, strict=True):
        eager = model.generate(**prompt(2, length), past_key_values=cache_for(model, **options), max_new_tokens=20)
        assert torch.equal(eager, graphed)


def test_left_padded_batch_runs_eagerly_and_matches() -> None:
    model = build()
    batch = prompt(2, 9)
    batch["input_ids"][0, :3], batch["attention_mask"][0, :3] = 0, 0
    eager, graphed, cache = eager_and_graphed(model, batch)
    assert torch.equal(eager, graphed)
    assert not cache.decode_graphs


def test_caches_the_static_step_cannot_serve_run_eagerly() -> None:
    model = build()
    overrides = {"cache_strategy": CacheStrategy.LRU, "token_budget": 12}
    eager, graphed, cache = eager_and_graphed(model, prompt(2, 9), **overrides)
    assert torch.equal(eager, graphed)
    assert not cache.decode_graphs
    sdpa = build()
    sdpa.set_attn_implementation("sdpa")
    cache = cache_for(sdpa)
    with decode_graphs(sdpa):
        sdpa.generate(**prompt(1, 4), past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert not cache.decode_graphs


def test_non_finite_states_are_refused_when_their_block_seals() -> None:
    """A graph cannot check each step's states on the host: NaN keys are caught by the seal that would quantize
    them, before the block is written."""
    model = build()
    cache = cache_for(model, use_quantization=True, quantization_bits=4, residual_tokens=4)
    batch = prompt(1, 6)
    with torch.no_grad(), decode_graphs(model):
        out = model(**batch, past_key_values=cache)
        model.model.layers[1].self_attn.k_proj.weight.fill_(float("nan"))
        token = out.logits[:, -1:].argmax(-1)
        with pytest.raises(CacheValidationError, match="NaN"):
            for _ in range(12):  # a block of 4 seals within 4 + 4 steps
                model(input_ids=token, past_key_values=cache, use_cache=True)
    assert cache.decode_graphs
    sealed = [cache.store.num_sealed(cache.seq_ids[0], layer) for layer in range(3)]  # type: ignore[index]
    assert sealed[1] <= 4  # nothing poisoned was sealed (the prompt's first block may have been)


def test_pool_exhausted_in_a_step_raises_memory_error() -> None:
    model = build()
    cache = cache_for(model, max_tokens=16)
    with decode_graphs(model), pytest.raises(CacheMemoryError, match="max_tokens"):
        model.generate(**prompt(1, 10), past_key_values=cache, max_new_tokens=20, do_sample=False)
    cache.store.check_invariants()


def test_padded_size_rounds_up_to_a_power_of_two_within_the_limit() -> None:
    assert [padded_size(n, 12) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    assert padded_size(20, 16) == 20  # never fewer than asked


def test_rejects_what_is_not_a_module() -> None:
    with pytest.raises(CacheValidationError, match=r"torch\.nn\.Module"), decode_graphs("model"):  # type: ignore[arg-type]
        pass
    assert decode_graphs_api is decode_graphs


# ------------------------------------------------------------------------------------------ KVStore.reserve
def store_with(**overrides: object) -> tuple[KVStore, list[int]]:
    config = KVCacheConfig(**{"block_size": 4, "max_tokens": 40, "device": "cpu", **overrides})  # type: ignore[arg-type]
    store = KVStore(config, num_layers=2)
    store.initialize(2, 16, torch.float32, torch.device("cpu"), 3, spare_tokens=8)  # room for a chunk sealed after
    seq_ids = [store.add_sequence() for _ in range(3)]
    return store, seq_ids


def twin_stores(overrides: dict, prompt: int, gen: torch.Generator) -> tuple[KVStore, list[int], KVStore, list[int]]:
    """Two stores (the `append` one, the `reserve` one) holding the same `prompt` tokens in 3 sequences."""
    appended, seq_a = store_with(**overrides)
    reserved, seq_b = store_with(**overrides)
    first = torch.randn(3, 2, prompt, 16, generator=gen)
    for store, seq_ids in ((appended, seq_a), (reserved, seq_b)):
        for layer in range(2):
            store.append(seq_ids, layer, first, -first)
    return appended, seq_a, reserved, seq_b


def assert_same_contents(appended: KVStore, seq_a: list[int], reserved: KVStore, seq_b: list[int]) -> None:
    for layer in range(2):
        for a, b in zip(appended.read(seq_a, layer), reserved.read(seq_b, layer), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [reserved.num_sealed(s, 0) for s in seq_b] == [appended.num_sealed(s, 0) for s in seq_a]
    reserved.check_invariants()


@pytest.mark.parametrize("overrides", [{}, {"use_quantization": True, "quantization_bits": 4, "residual_tokens": 4}])
def test_reserve_then_write_equals_append(overrides: dict) -> None:
    """Step by step over block boundaries and seals: reserve + write into the slots = append."""
    gen = torch.Generator().manual_seed(1)
    appended, seq_a, reserved, seq_b = twin_stores(overrides, 7, gen)
    held = None
    for _ in range(11):
        new = torch.randn(3, 2, 1, 16, generator=gen)
        for layer in range(2):
            appended.append(seq_a, layer, new + layer, new * 2)
        step = reserved.reserve(seq_b, held_version=held)
        assert (step.rows.dense_rows is None) == (step.version == held)  # block ids only when they changed
        held = step.version
        assert step.positions == [reserved.num_tokens(s) - 1 for s in seq_b]
        slots = torch.tensor(step.slots)
        for layer in range(2):
            assert reserved.pool is not None
            states = (new + layer).transpose(1, 2).reshape(3, 2, 16)
            reserved.pool.dense(layer).write(slots, states, (new * 2).transpose(1, 2).reshape(3, 2, 16))
        assert_same_contents(appended, seq_a, reserved, seq_b)


QUANTIZED = {"use_quantization": True, "quantization_bits": 4, "residual_tokens": 4}


@pytest.mark.parametrize(
    ("overrides", "real", "seal_after"), [({}, 3, False), (QUANTIZED, 3, False), (QUANTIZED, 5, True)]
)
def test_padded_reserve_then_truncate_equals_append(overrides: dict, real: int, seal_after: bool) -> None:
    """A step of 6 slots holding `real` tokens: sealing follows them (before the step, or after it for a chunk
    longer than the window), the padding is cut off after; the store then holds what `append` would."""
    gen = torch.Generator().manual_seed(2)
    appended, seq_a, reserved, seq_b = twin_stores(overrides, 5, gen)
    for _ in range(4):
        new = torch.randn(3, 2, real, 16, generator=gen)
        for layer in range(2):
            appended.append(seq_a, layer, new, -new)
        step = reserved.reserve(seq_b, 6, real=real, seal_after=seal_after)
        padded = torch.cat([new, torch.full((3, 2, 6 - real, 16), 7.0)], dim=2)  # the padding never survives
        rows = padded.transpose(1, 2).reshape(18, 2, 16)
        assert reserved.pool is not None
        for layer in range(2):
            reserved.pool.dense(layer).write(torch.tensor(step.slots), rows, -rows)
        for seq_id, first_position in zip(seq_b, step.positions, strict=True):
            reserved.truncate(seq_id, first_position + real)
        if seal_after:
            reserved.seal(seq_b)
        assert_same_contents(appended, seq_a, reserved, seq_b)


def test_reserve_refuses_layers_at_different_lengths() -> None:
    store, seq_ids = store_with()
    store.append(seq_ids, 0, torch.randn(3, 2, 5, 16), torch.randn(3, 2, 5, 16))
    with pytest.raises(CacheValidationError, match="same length"):
        store.reserve(seq_ids)


def test_reserve_out_of_room_changes_nothing() -> None:
    store, seq_ids = store_with(max_tokens=8)
    states = torch.randn(3, 2, 8, 16)
    for layer in range(2):
        store.append(seq_ids, layer, states, states)
    with pytest.raises(CacheMemoryError, match="max_tokens"):
        store.reserve(seq_ids)
    assert [store.num_tokens(s) for s in seq_ids] == [8, 8, 8]
    store.check_invariants()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fmt", ["bf16 blocks", "int4"])
def test_cuda_graph_replays_match_eager(fmt: str) -> None:
    model = build(device="cuda", dtype=torch.bfloat16, hidden=256)  # head_dim 64: shapes the kernels tile
    overrides = {**FORMATS[fmt], "block_size": 16, "max_tokens": 160}
    if "residual_tokens" in overrides:
        overrides["residual_tokens"] = 16
    batch = prompt(4, 37, "cuda")
    eager, graphed, cache = eager_and_graphed(model, batch, "cuda", **overrides)
    (runner,) = cache.decode_graphs.values()
    assert runner.graph is not None  # captured and replayed
    assert (eager == graphed).float().mean().item() > 0.9  # bf16: near-ties may flip late tokens
    assert torch.equal(eager[:, :45], graphed[:, :45])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_failed_capture_runs_eagerly_and_later_graphs_still_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture that fails (here: a device sync inside it, at batch 4) warns and leaves that step eager with the
    eager path's tokens; the cache's next graph (batch 2) still captures (the failed one's pool is dropped)."""
    model = build(device="cuda", dtype=torch.bfloat16, hidden=256)
    options = {"block_size": 16, "max_tokens": 160}
    run = StepGraph._run

    def syncing_run(self: StepGraph) -> object:
        if self.static.batch == 4 and torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()  # not allowed while capturing
        return run(self)

    monkeypatch.setattr(StepGraph, "_run", syncing_run)
    expected = model.generate(**prompt(4, 21, "cuda"), past_key_values=cache_for(model, "cuda", **options),
                              max_new_tokens=6, do_sample=False)  # fmt: skip
    cache = cache_for(model, "cuda", **options)
    with decode_graphs(model), pytest.warns(UserWarning, match="capturing the decode step failed"):
        got = model.generate(**prompt(4, 21, "cuda"), past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(got[:, :25], expected[:, :25])  # bf16: near-ties may flip later tokens
    cache.reset()
    with decode_graphs(model):
        model.generate(**prompt(2, 21, "cuda"), past_key_values=cache, max_new_tokens=6, do_sample=False)
    graphs = {runner.static.batch: runner.graph for runner in cache.decode_graphs.values()}
    assert graphs[4] is None and graphs[2] is not None
