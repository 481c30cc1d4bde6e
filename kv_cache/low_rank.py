"""Low-rank projection of keys and values: per-KV-head PCA bases, and the seed's `Compressor` face.

For each KV head, a basis `U [head_dim, rank]` (orthonormal columns) and a mean `mu [head_dim]` are fitted on
calibration states (or the prefill itself); a token `x [head_dim]` is stored as its coefficients
`c = (x - mu) @ U` (`rank` numbers instead of `head_dim`) and read back as `c @ U.T + mu`. Attention can use the
basis without rebuilding keys: `q . k = (q @ U) . c + q . mu`. The rank is chosen per head to keep a fraction
`energy` of the variance, or as `ratio * head_dim`.

Shapes: states `[tokens, kv_heads, head_dim]` (any float dtype; the math runs in fp32), bases
`[kv_heads, head_dim, rank]`, means `[kv_heads, head_dim]`, coefficients `[tokens, kv_heads, rank]`.
Where we depart from per-request SVD methods (e.g. Eigen Attention, Palu): one basis per layer and head, fitted
once, so blocks of every sequence share it and a block stores only its coefficients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kv_cache.errors import CacheValidationError

METHODS = ("svd", "low_rank")


@dataclass(frozen=True)
class LowRankBasis:
    """One layer's projection: `basis [kv_heads, head_dim, rank]` fp32 orthonormal columns, `mean [kv_heads,
    head_dim]` fp32 (zeros for plain SVD)."""

    basis: torch.Tensor
    mean: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.basis.shape[-1])

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """`[tokens, kv_heads, head_dim]` -> coefficients `[tokens, kv_heads, rank]` fp32."""
        return torch.einsum("thd,hdr->thr", states.float() - self.mean, self.basis)

    def reconstruct(self, coefficients: torch.Tensor) -> torch.Tensor:
        """`[tokens, kv_heads, rank]` -> states `[tokens, kv_heads, head_dim]` fp32."""
        return torch.einsum("thr,hdr->thd", coefficients.float(), self.basis) + self.mean


def fit_basis(
    states: torch.Tensor, rank: int | None = None, energy: float | None = None, center: bool = True
) -> LowRankBasis:
    """Fit a per-head basis on `states [tokens, kv_heads, head_dim]`.

    Exactly one of `rank` (columns kept, the same for every head) or `energy` (the smallest rank, over heads, that
    keeps at least this fraction of each head's variance) must be given. `center=False` is plain SVD (no mean).
    """
    if states.dim() != 3 or not states.is_floating_point() or states.shape[0] < 1:
        raise CacheValidationError(f"states must be float [tokens, kv_heads, head_dim]; got {tuple(states.shape)}")
    if (rank is None) == (energy is None):
        raise CacheValidationError("give exactly one of rank (columns kept) or energy (variance kept)")
    head_dim = states.shape[-1]
    x = states.float()
    mean = x.mean(0) if center else torch.zeros_like(x[0])
    _, singular, vh = torch.linalg.svd((x - mean).transpose(0, 1), full_matrices=False)  # per head
    if energy is not None:
        if not 0 < energy <= 1:
            raise CacheValidationError(f"energy={energy!r} must be a fraction in (0, 1]")
        rank = _rank_for_energy(singular, energy)
    if rank is None or isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= head_dim:
        raise CacheValidationError(f"rank={rank!r} must be an int between 1 and head_dim={head_dim}")
    basis = vh[:, :rank, :].transpose(1, 2).contiguous()  # [kv_heads, head_dim, rank]
    if basis.shape[-1] < rank:  # fewer tokens than rank: complete the basis so the shape is as asked
        basis = _complete(basis, rank)
    return LowRankBasis(basis, mean)


def _rank_for_energy(singular: torch.Tensor, energy: float) -> int:
    """Smallest rank keeping `energy` of every head's squared singular values."""
    power = singular.square()
    kept = power.cumsum(-1) / power.sum(-1, keepdim=True).clamp_min(1e-30)
    per_head = (kept < energy - 1e-7).sum(-1) + 1
    return int(per_head.max().clamp(max=singular.shape[-1]))


def _complete(basis: torch.Tensor, rank: int) -> torch.Tensor:
    """Extend orthonormal columns `[kv_heads, head_dim, k]` to `rank` columns (Gram-Schmidt on the identity)."""
    heads, head_dim, _ = basis.shape
    extra = torch.eye(head_dim).expand(heads, head_dim, head_dim)
    full, _ = torch.linalg.qr(torch.cat([basis, extra], dim=-1))
    return full[:, :, :rank].contiguous()


@dataclass(frozen=True)
class Compressor:
    """The seed's compressor: keep `ratio` of each head's dimensions by projecting on a fitted basis.

    `method="low_rank"` fits a centred PCA basis, `"svd"` an uncentred truncated SVD; `"sparse"` is refused (see
    `__post_init__`). `fit(states)` returns the `LowRankBasis` to project and reconstruct with.
    """

    ratio: float = 0.5
    method: str = "low_rank"

    def __post_init__(self) -> None:
        if self.method == "sparse":
            raise CacheValidationError(
                "method='sparse' is not offered: keeping the top-magnitude entries of a token needs an index per kept "
                "entry (1-2 bytes beside a 2-byte value), so it saves bytes only below ~60% density and attention then "
                "needs gather kernels; use 'low_rank' or 'svd' (real savings: rank/head_dim of the bytes)"
            )
        if self.method not in METHODS:
            raise CacheValidationError(f"method={self.method!r} is not supported; use one of {list(METHODS)}")
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise CacheValidationError(f"ratio={ratio!r} must be the fraction of dimensions kept, in (0, 1]")

    def rank_for(self, head_dim: int) -> int:
        return max(1, math.ceil(self.ratio * head_dim))

    def fit(self, states: torch.Tensor) -> LowRankBasis:
        """Fit on calibration `states [tokens, kv_heads, head_dim]`."""
        return fit_basis(states, rank=self.rank_for(states.shape[-1]), center=self.method == "low_rank")
