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
from kv_cache.tensors import validate_tensor_shapes

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
    extra = torch.eye(head_dim, device=basis.device).expand(heads, head_dim, head_dim)
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


class LowRankProjection:
    """The key and value bases of a cache that stores coefficients: one `LowRankBasis` pair per layer.

    A cache with `KVCacheConfig(low_rank_ratio=...)` stores `compress(...)`'s coefficients (`rank` numbers per token
    and KV head instead of `head_dim`: the pool really is `rank / head_dim` of the size) and hands attention either
    `expand(...)`'s reconstruction (stock attention) or works in coefficient space (kv_cache's attention):

        q . k = (q @ Uk) . ck + q . mu_k      the second term is the same for every token of a query: softmax drops it
        sum_t p_t v_t = (sum_t p_t cv_t) @ Uv.T + mu_v         (the weights sum to 1)

    so `project_query` and `expand_output` wrap the paged kernels, which then read `rank`-wide blocks. Each layer's
    bases are fitted on its first states (the prompt: per KV head, over every batch row and token) unless
    `calibrate` set them before. States are `[batch, kv_heads, tokens, head_dim]`; queries `[batch, q_heads,
    tokens, head_dim]` with q_heads a multiple of kv_heads (grouped-query attention shares the KV head's basis).
    """

    def __init__(self, compressor: Compressor, num_layers: int) -> None:
        self.compressor = compressor
        self.bases: list[tuple[LowRankBasis, LowRankBasis] | None] = [None] * num_layers

    def calibrate(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fit `layer`'s bases on calibration states `[batch, kv_heads, tokens, head_dim]` (before its first token)."""
        if self.bases[layer] is not None:
            raise CacheValidationError(f"layer {layer} already has its bases; calibrate before the first token")
        self.bases[layer] = (self.compressor.fit(_token_major(keys)), self.compressor.fit(_token_major(values)))

    def head_dim(self, layer: int) -> int | None:
        """The states' head_dim of a fitted layer (None before its first states)."""
        pair = self.bases[layer]
        return None if pair is None else int(pair[0].basis.shape[1])

    def compress(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """States `[batch, kv_heads, tokens, head_dim]` -> coefficients `[batch, kv_heads, tokens, rank]` in the states'
        dtype (the layer's bases are fitted on these states if it has none yet). States a cache would not accept, or
        of another head_dim than the bases', raise `CacheValidationError`."""
        validate_tensor_shapes(keys, values, head_dim=self.head_dim(layer))
        if self.bases[layer] is None:
            self.calibrate(layer, keys, values)
        key_basis, value_basis = self._pair(layer)
        return _coefficients(keys, key_basis), _coefficients(values, value_basis)

    def expand(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients `[batch, kv_heads, tokens, rank]` -> states `[batch, kv_heads, tokens, head_dim]` in `dtype`."""
        key_basis, value_basis = self._pair(layer)
        return _states(keys, key_basis, dtype), _states(values, value_basis, dtype)

    def project_query(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """`[batch, q_heads, tokens, head_dim]` -> `[batch, q_heads, tokens, rank]` (query dtype): `q @ Uk`."""
        basis = self._pair(layer)[0].basis
        grouped = _grouped(query, basis.shape[0])
        return torch.einsum("bhgtd,hdr->bhgtr", grouped.float(), basis).flatten(1, 2).to(query.dtype)

    def expand_output(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        """Attention output in value coefficients `[batch, q_heads, tokens, rank]` -> `[batch, q_heads, tokens,
        head_dim]` (output dtype): `o @ Uv.T + mu_v`."""
        basis = self._pair(layer)[1]
        grouped = _grouped(output, basis.basis.shape[0])
        full = torch.einsum("bhgtr,hdr->bhgtd", grouped.float(), basis.basis) + basis.mean[None, :, None, None]
        return full.flatten(1, 2).to(output.dtype)

    def stats(self) -> dict[str, object]:
        """`rank` and `head_dim` (None before the first states), `method`, and `basis_mb`: the fitted bases and
        means (fp32, every layer; the store's `storage_memory_mb` counts the coefficients)."""
        fitted = [pair for pair in self.bases if pair is not None]
        size = sum((basis.basis.numel() + basis.mean.numel()) * 4 for pair in fitted for basis in pair)
        return {
            "rank": fitted[0][0].rank if fitted else None,
            "head_dim": int(fitted[0][0].basis.shape[1]) if fitted else None,
            "method": self.compressor.method,
            "basis_mb": size / 2**20,
        }

    def _pair(self, layer: int) -> tuple[LowRankBasis, LowRankBasis]:
        pair = self.bases[layer]
        if pair is None:
            raise CacheValidationError(f"layer {layer} has no low-rank bases yet (no states stored, none calibrated)")
        return pair


def _coefficients(states: torch.Tensor, basis: LowRankBasis) -> torch.Tensor:
    """`[batch, kv_heads, tokens, head_dim]` -> `[batch, kv_heads, tokens, rank]` in the states' dtype."""
    centred = states.float() - basis.mean[:, None]
    return torch.einsum("bhtd,hdr->bhtr", centred, basis.basis).to(states.dtype)


def _states(coefficients: torch.Tensor, basis: LowRankBasis, dtype: torch.dtype) -> torch.Tensor:
    """`[batch, kv_heads, tokens, rank]` -> `[batch, kv_heads, tokens, head_dim]` in `dtype`."""
    return (torch.einsum("bhtr,hdr->bhtd", coefficients.float(), basis.basis) + basis.mean[:, None]).to(dtype)


def _token_major(states: torch.Tensor) -> torch.Tensor:
    """`[batch, kv_heads, tokens, head_dim]` -> `[batch * tokens, kv_heads, head_dim]` (what `fit_basis` takes)."""
    if states.dim() != 4 or not states.is_floating_point():
        raise CacheValidationError(
            f"states must be float [batch, kv_heads, tokens, head_dim]; got {tuple(states.shape)}"
        )
    return states.transpose(1, 2).flatten(0, 1)


def _grouped(heads: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`[batch, q_heads, tokens, dim]` -> `[batch, kv_heads, group, tokens, dim]`."""
    batch, q_heads, tokens, dim = heads.shape
    if q_heads % kv_heads:
        raise CacheValidationError(f"{q_heads} query heads are not a multiple of the {kv_heads} KV heads")
    return heads.reshape(batch, kv_heads, q_heads // kv_heads, tokens, dim)
