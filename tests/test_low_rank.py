"""Low-rank projection: full rank is exact, truncation keeps the stated energy, the seed Compressor validates."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kv_cache import BaseKVCache, CacheValidationError, KVCache, KVCacheConfig, KVCacheEngine
from kv_cache.hf_attention import register_attention
from kv_cache.low_rank import Compressor, LowRankProjection, fit_basis


def states(tokens: int = 200, heads: int = 3, dim: int = 16, rank: int = 4, seed: int = 0) -> torch.Tensor:
    """Data of effective rank `rank` per head, plus a little noise and an offset (keys have a mean)."""
    gen = torch.Generator().manual_seed(seed)
    coefficients = torch.randn(tokens, heads, rank, generator=gen)
    low = torch.einsum("thr,hrd->thd", coefficients, torch.randn(heads, rank, dim, generator=gen))
    return low + 0.01 * torch.randn(tokens, heads, dim, generator=gen) + 3.0


@pytest.mark.parametrize("center", [True, False])
def test_full_rank_reproduces_the_input(center: bool) -> None:
    x = torch.randn(50, 2, 12, generator=torch.Generator().manual_seed(1))
    basis = fit_basis(x, rank=12, center=center)
    torch.testing.assert_close(basis.reconstruct(basis.project(x)), x, rtol=1e-5, atol=1e-5)
    eye = torch.eye(12).expand(2, 12, 12)
    torch.testing.assert_close(basis.basis.transpose(1, 2) @ basis.basis, eye, rtol=1e-5, atol=1e-5)


def test_energy_picks_the_rank_of_the_data() -> None:
    x = states(rank=4)
    basis = fit_basis(x, energy=0.999)
    assert basis.rank == 4
    error = (basis.reconstruct(basis.project(x)) - x).norm() / (x - x.mean(0)).norm()
    assert error < 0.05


def test_fewer_tokens_than_rank_still_gives_an_orthonormal_basis() -> None:
    x = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(2))
    basis = fit_basis(x, rank=6)
    assert basis.basis.shape == (2, 8, 6)
    torch.testing.assert_close(
        basis.basis.transpose(1, 2) @ basis.basis, torch.eye(6).expand(2, 6, 6), atol=1e-5, rtol=0
    )


def test_compressor_keeps_a_ratio_of_dimensions() -> None:
    x = states(dim=16, rank=4)
    basis = Compressor(ratio=0.25).fit(x)
    assert basis.rank == 4 and basis.project(x).shape == (200, 3, 4)
    assert Compressor(ratio=0.25, method="svd").fit(x).mean.abs().max() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"method": "sparse"}, "saves bytes only below"), ({"method": "pca"}, "method='pca'"),
     ({"ratio": 0.0}, "ratio=0.0"), ({"ratio": 1.5}, "ratio=1.5")],
)  # fmt: skip
def test_compressor_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(CacheValidationError, match=message):
        Compressor(**kwargs)  # type: ignore[arg-type]


def test_fit_rejects_bad_arguments() -> None:
    x = torch.randn(10, 2, 8)
    with pytest.raises(CacheValidationError, match="exactly one"):
        fit_basis(x)
    with pytest.raises(CacheValidationError, match="rank=9"):
        fit_basis(x, rank=9)
    with pytest.raises(CacheValidationError, match=r"energy=1\.5"):
        fit_basis(x, energy=1.5)


# --- caches that store coefficients ---------------------------------------------------------------------------------


def cache_states(batch: int, heads: int, tokens: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, tokens, dim, generator=gen), torch.randn(batch, heads, tokens, dim, generator=gen)


def test_a_full_rank_cache_returns_its_input() -> None:
    key, value = cache_states(2, 2, 37, 16, seed=10)
    cache = BaseKVCache(KVCacheConfig(block_size=4), compressor=Compressor(ratio=1.0))
    keys, values, _ = cache.forward(key, value)
    torch.testing.assert_close(keys, key, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, value, rtol=1e-5, atol=1e-5)


def test_a_low_rank_cache_stores_coefficients_and_reads_the_projection() -> None:
    """Half the ratio, half the pool; what comes back is the projection on a basis fitted on the first call."""
    key, value = cache_states(2, 3, 45, 16, seed=11)
    config = KVCacheConfig(block_size=4, max_tokens=128)
    cache, full = BaseKVCache(replace(config, low_rank_ratio=0.5)), BaseKVCache(config)
    keys, values, _ = cache.forward(key, value)
    full.forward(key, value)
    assert cache.store.pool is not None and cache.store.pool.block_format.head_dim == 8
    assert cache.get_stats()["storage_memory_mb"] == pytest.approx(full.get_stats()["storage_memory_mb"] / 2)
    assert cache.get_stats()["low_rank"] | {"basis_mb": 0} == {
        "rank": 8,
        "head_dim": 16,
        "method": "low_rank",
        "basis_mb": 0,
    }
    for states, got in ((key, keys), (value, values)):
        tokens = states.transpose(1, 2).flatten(0, 1)  # [batch * tokens, heads, dim]
        basis = fit_basis(tokens, rank=8)
        expected = basis.reconstruct(basis.project(tokens)).view(2, 45, 3, 16).transpose(1, 2)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    more_key, more_value = cache_states(2, 3, 5, 16, seed=12)  # later tokens use the same basis
    keys, _, info = cache.forward(more_key, more_value)
    assert keys.shape == (2, 3, 50, 16) and info["cached_tokens"] == 45
    with pytest.raises(CacheValidationError, match="head_dim=8; expected head_dim=16"):
        cache.forward(*cache_states(2, 3, 1, 8, seed=13))


@pytest.mark.parametrize(
    ("group", "q_len", "lengths"), [(1, 1, [1, 7]), (4, 1, [5, 13]), (4, 3, [9, 17]), (2, 5, [6, 6])]
)
def test_attention_in_coefficient_space_equals_attention_over_the_reconstruction(
    group: int, q_len: int, lengths: list[int]
) -> None:
    """What the paged attention does with a low-rank cache: project the query, attend over the coefficients with
    the full head_dim's scale, expand the output. Softmax drops q . mean_k, so it equals attention over the
    reconstructed keys/values (fp32 error)."""
    heads, dim, rank = 2, 16, 6
    projection = LowRankProjection(Compressor(ratio=rank / dim), num_layers=1)
    calibration = cache_states(1, heads, 64, dim, seed=14)
    projection.calibrate(0, calibration[0] + 2.0, calibration[1] - 1.0)  # means that matter
    gen = torch.Generator().manual_seed(15)
    scale = dim**-0.5
    for row, length in enumerate(lengths):
        key, value = cache_states(1, heads, length, dim, seed=16 + row)
        coefficients = projection.compress(0, key + 2.0, value - 1.0)
        full_keys, full_values = projection.expand(0, *coefficients, torch.float32)
        query = torch.randn(1, heads * group, q_len, dim, generator=gen)
        mask = torch.ones(q_len, length, dtype=torch.bool).tril(length - q_len)
        expected = F.scaled_dot_product_attention(
            query, full_keys, full_values, attn_mask=mask, scale=scale, enable_gqa=True
        )
        in_space = F.scaled_dot_product_attention(
            projection.project_query(0, query), *coefficients, attn_mask=mask, scale=scale, enable_gqa=True
        )
        torch.testing.assert_close(projection.expand_output(0, in_space), expected, rtol=1e-5, atol=1e-5)


def test_the_compressor_is_a_component_set_before_the_first_token() -> None:
    cache = BaseKVCache(KVCacheConfig(block_size=4))
    cache.compressor = Compressor(ratio=0.25, method="svd")
    assert cache.config.low_rank_ratio == 0.25 and cache.config.low_rank_method == "svd"
    cache.forward(*cache_states(1, 2, 9, 16, seed=17))
    assert cache.get_stats()["low_rank"]["rank"] == 4
    with pytest.raises(CacheValidationError, match="compressor cannot change once tokens are stored"):
        cache.compressor = None
    with pytest.raises(CacheValidationError, match=r"compressor must be a kv_cache\.Compressor"):
        BaseKVCache(compressor="svd")  # type: ignore[arg-type]
    with pytest.raises(CacheValidationError, match="already has its bases"):
        assert cache.low_rank is not None
        cache.low_rank.calibrate(0, *cache_states(1, 2, 9, 16, seed=18))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"low_rank_ratio": 0.0}, r"low_rank_ratio=0.0.*in \(0, 1\]"),
        ({"low_rank_ratio": 0.5, "low_rank_method": "sparse"}, "'sparse' is not offered"),
        ({"low_rank_method": "pca"}, "low_rank_method='pca'.*not supported"),
        ({"low_rank_ratio": 0.5, "cache_mode": "training"}, "low_rank_ratio is a lossy option"),
    ],
)
def test_bad_low_rank_settings_name_the_field(options: dict[str, object], message: str) -> None:
    with pytest.raises(CacheValidationError, match=message):
        KVCacheConfig(**options)  # type: ignore[arg-type]


def test_low_rank_coefficients_can_be_quantized() -> None:
    """A combination: INT8 codes of rank-12 coefficients (head_dim 16), within the two errors together."""
    key, value = cache_states(1, 2, 80, 16, seed=19)
    config = KVCacheConfig(block_size=16, residual_tokens=0, use_quantization=True, quantization_bits=8)
    both = BaseKVCache(replace(config, low_rank_ratio=0.75))
    only_rank = BaseKVCache(KVCacheConfig(block_size=16, low_rank_ratio=0.75))
    keys, values, _ = both.forward(key, value)
    rank_keys, rank_values, _ = only_rank.forward(key, value)
    assert both.store.quantized_pool is not None and both.store.quantized_pool.block_format.head_dim == 12
    for got, reference in ((keys, rank_keys), (values, rank_values)):
        assert float((got - reference).norm() / reference.norm()) < 0.02  # INT8 on top of the projection


# --- the Hugging Face cache with low-rank storage -------------------------------------------------------------------

TINY_LLAMA = {
    "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": 0,
    "eos_token_id": 1,
}  # fmt: skip


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


def prompt_batch(padded: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padded:
        ids[0, :4], mask[0, :4] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def low_rank_cache(model: LlamaForCausalLM, ratio: float) -> KVCache:
    return KVCache(KVCacheConfig(block_size=4, max_tokens=64, device="cpu", low_rank_ratio=ratio), model.config)


@pytest.mark.parametrize("attention", ["sdpa", "paged"])
def test_a_full_rank_kv_cache_generates_what_dynamic_cache_does(attention: str) -> None:
    model, batch = tiny_llama(), prompt_batch(padded=False)
    model.set_attn_implementation("sdpa")
    expected = model.generate(**batch, past_key_values=DynamicCache(config=model.config), max_new_tokens=8)
    model.set_attn_implementation(register_attention() if attention == "paged" else "sdpa")
    got = model.generate(**batch, past_key_values=low_rank_cache(model, 1.0), max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("padded", [False, True])
def test_paged_attention_over_coefficients_equals_attention_over_the_reconstruction(padded: bool) -> None:
    """Rank 8 of head_dim 16: kv_cache's attention (query projected, kernels over 8-wide blocks, output expanded)
    gives the logits of SDPA over the reconstructed states, prompt and decode steps alike."""
    model, batch = tiny_llama(), prompt_batch(padded)
    logits = {}
    for attention in ("sdpa", "paged"):
        model.set_attn_implementation(register_attention() if attention == "paged" else "sdpa")
        cache, ids, mask = low_rank_cache(model, 0.5), batch["input_ids"], batch["attention_mask"]
        steps = []
        with torch.no_grad():
            for _ in range(4):
                out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
                steps.append(out.logits[:, -1])
                ids, mask = out.logits[:, -1:].argmax(-1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits[attention] = torch.stack(steps)
        stats = cache.get_stats()
        assert cache.store.pool is not None and cache.store.pool.block_format.head_dim == 8
        assert stats["low_rank"]["rank"] == 8 and stats["low_rank"]["head_dim"] == 16
    torch.testing.assert_close(logits["paged"], logits["sdpa"], rtol=1e-4, atol=1e-4)


def test_the_engine_refuses_low_rank_storage() -> None:
    with pytest.raises(CacheValidationError, match="low_rank_ratio is not supported by KVCacheEngine"):
        KVCacheEngine(tiny_llama(), KVCacheConfig(device="cpu", low_rank_ratio=0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (ran on the lent H200: fp32 1.6e-6, bf16 7e-3)")
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_triton_kernels_attend_over_rank_32_coefficients(dtype: torch.dtype, tolerance: float) -> None:
    """head_dim 64 at ratio 0.5: 32-wide blocks, which the Triton kernels tile; logits of a 300-token prompt and
    4 decode steps match SDPA over the reconstruction (relative L2 error)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 512, "hidden_size": 256, "head_dim": 64})
    model = LlamaForCausalLM(config).to("cuda", dtype).eval()
    ids = torch.randint(2, 512, (2, 300), device="cuda")
    logits = {}
    for attention in ("sdpa", "paged"):
        model.set_attn_implementation(register_attention() if attention == "paged" else "sdpa")
        cache = KVCache(KVCacheConfig(low_rank_ratio=0.5, max_tokens=512), model.config)
        steps, tokens = [], ids
        with torch.no_grad():
            for _ in range(5):
                last = model(tokens, past_key_values=cache).logits[:, -1].float()
                steps.append(last)
                tokens = last.argmax(-1, keepdim=True)
        logits[attention] = torch.stack(steps)
    error = (logits["paged"] - logits["sdpa"]).norm() / logits["sdpa"].norm()
    assert float(error) < tolerance
