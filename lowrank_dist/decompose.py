"""The exact low-rank decomposition of Tai et al. (ICLR 2016), section 3.

A conv kernel W ∈ R^{N×C×kh×kw} is approximated by K vertical filters V (kh×1 over C channels)
followed by N horizontal filters H (1×kw over K channels):

    W[n, c, i, j] ≈ Σ_k V[k, c, i] · H[n, k, j]

Unfold W into the (C·kh) × (kw·N) matrix

    M[(c, i), (j, n)] = W[n, c, i, j]

so that ‖W − Ŵ‖_F = ‖M − M̂‖_F and the rank-K constraint on the factorised kernel is exactly the
rank-K constraint on M. By Eckart–Young the truncated SVD M ≈ U_K S_K V_Kᵀ is the global optimum:

    V[k, c, i] = U[(c, i), k] · √s_k          H[n, k, j] = √s_k · Vᵀ[k, (j, n)]

and the error is ‖W − Ŵ‖_F = sqrt(Σ_{k>K} s_k²). Cost per output pixel falls from N·C·kh·kw to
K·(C·kh + N·kw) multiply-accumulates. Grouped convolutions are decomposed group by group.

How the SVD is computed: only the top K singular pairs are needed, so instead of a full SVD we
diagonalise the Gram matrix of M's shorter side (G = M Mᵀ or Mᵀ M, at most 1536×1536 for VGG-16)
in float64. Its eigenvalues are s², its top-K eigenvectors span the optimal subspace, and the other
factor follows as U_Kᵀ M; the singular value used for the balanced √s split is the norm of that
row, which is exact for the computed subspace and needs no division by a tiny s.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch


@dataclass
class Decomposition:
    """Result of `decompose_kernel`.

    vertical:        (groups·K) × (C/groups) × kh × 1, in the input's dtype
    horizontal:      N × K × 1 × kw, in the input's dtype (a conv with `groups` groups)
    singular_values: every singular value of the unfolded matrix, descending, float64;
                     shape (max_rank,) or (groups, max_rank) for grouped kernels
    error:           ‖W − recomposition‖_F, computed in float64
    rank:            K, per group
    groups:          the number of groups the kernel was decomposed in
    """

    vertical: torch.Tensor
    horizontal: torch.Tensor
    singular_values: torch.Tensor
    error: float
    rank: int
    groups: int = 1

    @property
    def relative_error(self) -> float:
        """‖W − Ŵ‖_F / ‖W‖_F (0 for an all-zero kernel)."""
        total = float(self.singular_values.square().sum().sqrt())
        return self.error / total if total > 0 else 0.0


def _check_weight(weight: torch.Tensor, groups: int) -> tuple[int, int, int, int]:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"expected a 4-D conv kernel N×C×kh×kw, got {shape}")
    n, c, kh, kw = weight.shape
    if kh == 1 and kw == 1:
        raise ValueError(
            f"a 1×1 kernel (shape {tuple(weight.shape)}) has no spatial extent to factorise; "
            "only kernels with kh·kw > 1 can be decomposed"
        )
    if groups < 1 or n % groups != 0:
        raise ValueError(f"groups={groups} must be >= 1 and divide the {n} output channels")
    return n, c, kh, kw


def max_rank(weight: torch.Tensor, groups: int = 1) -> int:
    """Largest meaningful rank: min(C·kh, kw·N), with C and N per group."""
    n, c, kh, kw = _check_weight(weight, groups)
    return min(c * kh, kw * (n // groups))


def singular_values(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """All singular values of the unfolded kernel, descending, float64: (max_rank,) or
    (groups, max_rank). Cheaper than `decompose_kernel` (eigenvalues only)."""
    _check_weight(weight, groups)
    spectra = []
    for w in weight.detach().to(torch.float64).chunk(groups):
        m = unfold(w)
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        spectra.append(torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt())
    spectrum = torch.stack(spectra)
    return spectrum[0] if groups == 1 else spectrum


def unfold(weight: torch.Tensor) -> torch.Tensor:
    """W (N×C×kh×kw) → M ((C·kh)×(kw·N)) with M[(c,i),(j,n)] = W[n,c,i,j]."""
    n, c, kh, kw = weight.shape
    return weight.permute(1, 2, 3, 0).reshape(c * kh, kw * n)


def fold(matrix: torch.Tensor, n: int, c: int, kh: int, kw: int) -> torch.Tensor:
    """Inverse of `unfold`."""
    return matrix.reshape(c, kh, kw, n).permute(3, 0, 1, 2)


def _top_singular_triplets(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` left vectors (rows × K), right vectors (K × cols) with singular values folded in
    (so that left @ right = M_K), and all singular values, via the Gram matrix of the shorter side."""
    transpose = m.shape[0] > m.shape[1]
    a = m.T if transpose else m  # a is r × c with r <= c
    eigenvalues, eigenvectors = torch.linalg.eigh(a @ a.T)  # ascending
    singular_values = eigenvalues.flip(0).clamp_min(0).sqrt()
    basis = eigenvectors[:, -rank:].flip(1)  # r × K, orthonormal, top-K first
    projected = basis.T @ a  # K × c, rows have norms s_k
    if transpose:  # M = aᵀ ≈ projectedᵀ · basisᵀ
        return projected.T, basis.T, singular_values
    return basis, projected, singular_values


def decompose_kernel(weight: torch.Tensor, rank: int, groups: int = 1) -> Decomposition:
    """Exact rank-`rank` decomposition of a conv kernel into vertical and horizontal filters.

    `weight` is N×(C/groups)×kh×kw as stored by nn.Conv2d; `rank` is K per group. Computation is in
    float64; the factors come back in the input's dtype and device.
    """
    n, c, kh, kw = _check_weight(weight, groups)
    limit = max_rank(weight, groups)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= limit:
        raise ValueError(
            f"rank {rank!r} is out of range for a kernel of shape {tuple(weight.shape)}"
            f" (groups={groups}): allowed 1..{limit}"
        )
    rank = int(rank)
    w64 = weight.detach().to(torch.float64)
    n_g = n // groups
    verticals, horizontals, spectra = [], [], []
    error_squared = 0.0
    for g in range(groups):
        w = w64[g * n_g:(g + 1) * n_g]
        m = unfold(w)
        left, right, singular_values = _top_singular_triplets(m, rank)
        # Balanced split: scale column k of `left` and row k of `right` to norm √s_k each.
        left_norms = left.norm(dim=0)
        right_norms = right.norm(dim=1)
        s = left_norms * right_norms
        safe = torch.where(s > 0, s, torch.ones_like(s))
        left = left * (safe.sqrt() / torch.where(left_norms > 0, left_norms, torch.ones_like(s)))
        right = right * (safe.sqrt() / torch.where(right_norms > 0, right_norms, torch.ones_like(s)))[:, None]
        error_squared += float((m - left @ right).square().sum())
        verticals.append(left.T.reshape(rank, c, kh, 1))  # V[k,c,i] = U[(c,i),k]·√s_k
        horizontals.append(right.reshape(rank, kw, n_g).permute(2, 0, 1).unsqueeze(2))  # H[n,k,0,j]
        spectra.append(singular_values)
    spectrum = torch.stack(spectra)
    return Decomposition(
        vertical=torch.cat(verticals).to(weight.dtype).to(weight.device),
        horizontal=torch.cat(horizontals).to(weight.dtype).to(weight.device),
        singular_values=spectrum[0] if groups == 1 else spectrum,
        error=math.sqrt(error_squared),
        rank=rank,
        groups=groups,
    )


def recompose(vertical: torch.Tensor, horizontal: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Ŵ[n,c,i,j] = Σ_k V[k,c,i]·H[n,k,j], group by group → N×(C/groups)×kh×kw."""
    gk, c, kh, _ = vertical.shape
    n, k, _, kw = horizontal.shape
    v = vertical.reshape(groups, k, c, kh)
    h = horizontal.reshape(groups, n // groups, k, kw)
    return torch.einsum("gkci,gnkj->gncij", v, h).reshape(n, c, kh, kw)


# ----------------------------------------------------------------------------------------------
# Rank policies: given a layer (name, kernel shape, optional trained weight), return K or None
# (keep the layer dense).


def dense_macs_per_pixel(shape: Sequence[int], groups: int = 1) -> int:
    """N·(C/groups)·kh·kw for a kernel stored as N×(C/groups)×kh×kw."""
    n, c, kh, kw = shape
    return n * c * kh * kw


def factorized_macs_per_pixel(shape: Sequence[int], rank: int, groups: int = 1) -> int:
    """K·(C·kh + N·kw), summed over groups (C and N per group)."""
    n, c, kh, kw = shape
    return groups * rank * (c * kh + (n // groups) * kw)


class RankPolicy(Protocol):
    def rank_for(
        self, name: str, weight: torch.Tensor, groups: int = 1, ordinal: int | None = None
    ) -> int | None: ...


@dataclass
class ExplicitRanks:
    """Ranks given per layer: a mapping layer name → K, or a list of K in the order the model's
    factorisable convs are visited (None in either keeps that layer dense). Layers not named stay
    dense. `ordinal` is filled in by the caller for list-style ranks."""

    ranks: Mapping[str, int | None] | Sequence[int | None]

    def rank_for(self, name: str, weight: torch.Tensor, groups: int = 1, ordinal: int | None = None) -> int | None:
        if isinstance(self.ranks, Mapping):
            return self.ranks.get(name)
        if ordinal is None or ordinal >= len(self.ranks):
            return None
        return self.ranks[ordinal]


@dataclass
class TargetSpeedup:
    """Per layer, the largest K whose theoretical speedup N·C·kh·kw / (K·(C·kh + N·kw)) is at least
    `speedup` (at least 1, at most the max rank)."""

    speedup: float

    def __post_init__(self):
        if not self.speedup > 1.0:
            raise ValueError(f"target speedup must be > 1, got {self.speedup}")

    def rank_for(self, name: str, weight: torch.Tensor, groups: int = 1, ordinal: int | None = None) -> int:
        per_rank = factorized_macs_per_pixel(weight.shape, 1, groups)
        k = math.floor(dense_macs_per_pixel(weight.shape, groups) / (self.speedup * per_rank))
        return max(1, min(k, max_rank(weight, groups)))


@dataclass
class EnergyFraction:
    """Per layer, the smallest K keeping `fraction` of the singular-value energy Σ s_k² (of each
    group); None (dense) where that K would cost at least as much as the dense kernel. Meaningful
    for trained weights (the decompose-and-fine-tune path)."""

    fraction: float

    def __post_init__(self):
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"energy fraction must be in (0, 1], got {self.fraction}")

    def rank_for(self, name: str, weight: torch.Tensor, groups: int = 1, ordinal: int | None = None) -> int | None:
        limit = max_rank(weight, groups)
        energy = singular_values(weight, groups).reshape(groups, -1).square()
        kept = energy.cumsum(dim=1) / energy.sum(dim=1, keepdim=True).clamp_min(torch.finfo(energy.dtype).tiny)
        # per group, the first index whose cumulative share reaches the fraction (tolerance for rounding)
        k = int(((kept < self.fraction - 1e-12).sum(dim=1) + 1).max())
        k = min(k, limit)
        if factorized_macs_per_pixel(weight.shape, k, groups) >= dense_macs_per_pixel(weight.shape, groups):
            return None
        return k


def policy_from_config(spec: Mapping | RankPolicy) -> RankPolicy:
    """Build a policy from a plain dict: {"ranks": {name: K} | [K, ...]}, {"speedup": s} or
    {"energy": f}. Exactly one of these keys."""
    if hasattr(spec, "rank_for"):
        return spec  # already a policy
    if not isinstance(spec, Mapping):
        raise ValueError(f"a rank policy must be a mapping, got {type(spec).__name__}")
    keys = [key for key in ("ranks", "speedup", "energy") if spec.get(key) is not None]
    if len(keys) != 1:
        raise ValueError(f"a rank policy needs exactly one of 'ranks', 'speedup', 'energy'; got {sorted(spec)}")
    key = keys[0]
    if key == "ranks":
        return ExplicitRanks(spec["ranks"])
    if key == "speedup":
        return TargetSpeedup(float(spec["speedup"]))
    return EnergyFraction(float(spec["energy"]))
