"""Low-rank projection: full rank is exact, truncation keeps the stated energy, the seed Compressor validates."""

from __future__ import annotations

import pytest
import torch

from kv_cache import CacheValidationError
from kv_cache.low_rank import Compressor, fit_basis


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
