"""The exact low-rank decomposition of Tai et al. (ICLR 2016), section 3.

A conv kernel W ∈ R^{N×C×kh×kw} is approximated by K vertical filters V (kh×1 over C channels)
followed by N horizontal filters H (1×kw over K channels):

    W[n, c, i, j] ≈ Σ_k V[k, c, i] · H[n, k, j]

Unfold W into the (C·kh) × (kw·N) matrix

    M[(c, i), (j, n)] = W[n, c, i, j]

so that ‖W − Ŵ‖_F = ‖M − M̂‖_F and the rank-K constraint on the factorized kernel is exactly the
rank-K constraint on M. By Eckart–Young the truncated SVD M ≈ U_K S_K V_Kᵀ is the global optimum:

    V[k, c, i] = U[(c, i), k] · √s_k          H[n, k, j] = √s_k · Vᵀ[k, (j, n)]

and the error is ‖W − Ŵ‖_F = sqrt(Σ_{k>K} s_k²). Cost per output pixel falls from N·C·kh·kw to
K·(C·kh + N·kw) multiply-accumulates. Grouped convolutions are decomposed group by group.

How the SVD is computed: only the top K singular pairs are needed, so instead of a full SVD we
take the top-K eigenpairs of the Gram matrix of M's shorter side (G = M Mᵀ or Mᵀ M, at most
1536×1536 for VGG-16) in float64. Its eigenvalues are s², its top-K eigenvectors span the optimal
subspace, and the other factor follows by projection (U_Kᵀ M); the √s split uses the norms of the
two factors' rows, exact for the computed subspace, so no division by a tiny s is needed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


@dataclass
class Decomposition:
    """Result of `decompose_kernel`.

    vertical:        (groups·K) × (C/groups) × kh × 1, in the input's dtype
    horizontal:      N × K × 1 × kw, in the input's dtype (a conv with `groups` groups)
    singular_values: the top-K singular values of the unfolded matrix, descending, float64;
                     shape (K,) or (groups, K) for grouped kernels (`singular_values()` gives all)
    error:           ‖W − recomposition‖_F, computed in float64
    norm:            ‖W‖_F
    rank:            K, per group
    groups:          the number of groups the kernel was decomposed in
    """

    vertical: torch.Tensor
    horizontal: torch.Tensor
    singular_values: torch.Tensor
    error: float
    norm: float
    rank: int
    groups: int = 1

    @property
    def relative_error(self) -> float:
        """‖W − Ŵ‖_F / ‖W‖_F (0 for an all-zero kernel)."""
        return self.error / self.norm if self.norm > 0 else 0.0


def _check_weight(weight: torch.Tensor, groups: int) -> tuple[int, int, int, int]:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"expected a 4-D conv kernel N×C×kh×kw, got {shape}")
    n, c, kh, kw = weight.shape
    if kh == 1 and kw == 1:
        raise ValueError(
            f"a 1×1 kernel (shape {tuple(weight.shape)}) has no spatial extent to factorize; "
            "only kernels with kh·kw > 1 can be decomposed"
        )
    if groups < 1 or n % groups != 0:
        raise ValueError(f"groups={groups} must be >= 1 and divide the {n} output channels")
    return n, c, kh, kw


def _rank_limit(in_per_group: int, out_per_group: int, kh: int, kw: int) -> int:
    """The rank of a group's unfolded (C·kh)×(kw·N) kernel at most: min(C·kh, kw·N)."""
    return min(in_per_group * kh, kw * out_per_group)


def max_rank(weight: torch.Tensor, groups: int = 1) -> int:
    """Largest meaningful rank: min(C·kh, kw·N), with C and N per group; min(out, in) for a linear
    layer's out×in weight."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return min(weight.shape)
    n, c, kh, kw = _check_weight(weight, groups)  # a ValueError naming what it got, for anything else
    return _rank_limit(c, n // groups, kh, kw)


def check_rank(rank, in_channels: int, out_channels: int, kernel_size: tuple[int, int], groups: int = 1) -> None:
    """ValueError unless `rank` (the total over the groups) is a multiple of `groups` with
    1 <= rank/groups <= min(C·kh, kw·N) (C, N per group): the largest rank each group's unfolded
    (C·kh)×(kw·N) kernel has."""
    kh, kw = kernel_size
    limit = _rank_limit(in_channels // groups, out_channels // groups, kh, kw)
    if (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank % groups
            or not 1 <= rank // groups <= limit):
        allowed = f"1..{limit}" if groups == 1 else f"a multiple of the groups, {groups}..{groups * limit}"
        raise ValueError(
            f"rank {rank!r} is out of range for a {kh}×{kw} conv {in_channels}→{out_channels}"
            f" (groups={groups}): allowed {allowed}"
        )


def singular_values(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """All singular values of the unfolded kernel (or of a linear layer's out×in weight), descending,
    float64: (max_rank,) or (groups, max_rank). Cheaper than `decompose_kernel` (eigenvalues only)."""
    if weight.dim() != 2:
        _check_weight(weight, groups)
    spectra = []
    for w in weight.chunk(groups):
        m = w.detach().to(torch.float64) if w.dim() == 2 else unfold(w, torch.float64)
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        spectra.append(torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt())
    spectrum = torch.stack(spectra)
    return spectrum[0] if groups == 1 else spectrum


def unfold(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W (N×C×kh×kw) → M ((C·kh)×(kw·N)) with M[(c,i),(j,n)] = W[n,c,i,j], a new contiguous
    tensor (in `dtype` if given: one copy, no intermediate)."""
    n, c, kh, kw = weight.shape
    m = torch.empty((c, kh, kw, n), dtype=dtype or weight.dtype, device=weight.device)
    return m.copy_(weight.detach().permute(1, 2, 3, 0)).view(c * kh, kw * n)


def _top_eigenpairs(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest eigenvalues (descending) and their eigenvectors (r × k) of a symmetric matrix.

    On the CPU, LAPACK's MRRR solver (dsyevr, through SciPy) computes only the k wanted pairs with
    O(r) workspace; torch.linalg.eigh (dsyevd) would compute all r with an O(r²) workspace, which
    is slower and triples the memory peak. Other devices (or a machine without SciPy, such as a
    bare GPU box running bench/gpu.py) use torch.linalg.eigh."""
    r = gram.shape[0]
    try:
        import scipy.linalg
    except ImportError:
        scipy = None
    if gram.device.type == "cpu" and scipy is not None:
        values, vectors = scipy.linalg.eigh(
            gram.numpy(), subset_by_index=[r - k, r - 1], driver="evr", overwrite_a=True, check_finite=False
        )
        values, vectors = torch.from_numpy(values), torch.from_numpy(vectors)
    else:
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values[-k:], vectors[:, -k:]
    return values.flip(0), vectors.flip(1)


def _top_subspace(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Orthonormal basis (r × K, top first) of the top-K singular subspace of the shorter side of
    M = unfold(weight), the top-K singular values, and whether the shorter side is the columns.

    The eigenvalues of the Gram matrix G = A Aᵀ (A = M or Mᵀ, r × c with r <= c) are s², its
    eigenvectors are A's left singular vectors. M is released before the eigensolver runs (it is
    cheap to unfold again) to keep the memory peak to about one r × r matrix."""
    m = unfold(weight, torch.float64)
    transpose = m.shape[0] > m.shape[1]
    gram = m.T @ m if transpose else m @ m.T
    del m
    eigenvalues, basis = _top_eigenpairs(gram, rank)
    return basis, eigenvalues.clamp_min(0).sqrt(), transpose


def _balanced(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced split: column k of `left` and row k of `right` scaled to norm √s_k each."""
    left_norms = left.norm(dim=0)
    right_norms = right.norm(dim=1)
    s = left_norms * right_norms
    safe = torch.where(s > 0, s, torch.ones_like(s))
    left = left * (safe.sqrt() / torch.where(left_norms > 0, left_norms, torch.ones_like(s)))
    right = right * (safe.sqrt() / torch.where(right_norms > 0, right_norms, torch.ones_like(s)))[:, None]
    return left, right


def decompose_kernel(weight: torch.Tensor, rank: int, groups: int = 1) -> Decomposition:
    """Exact rank-`rank` decomposition of a conv kernel into vertical and horizontal filters.

    `weight` is N×(C/groups)×kh×kw as stored by nn.Conv2d; `rank` is K per group. Computation is in
    float64; the factors come back in the input's dtype and device.
    """
    n, c, kh, kw = _check_weight(weight, groups)
    check_rank(rank, c, n // groups, (kh, kw))  # each group's kernel is a conv C→N/groups of this rank
    rank = int(rank)
    n_g = n // groups
    verticals, horizontals, spectra = [], [], []
    error_squared = 0.0
    for g in range(groups):
        part = weight[g * n_g:(g + 1) * n_g]
        basis, singular_values, transpose = _top_subspace(part, rank)
        m = unfold(part, torch.float64)
        if transpose:  # M ≈ (Mᵀ's projection)ᵀ: left = M·basis, right = basisᵀ
            left, right = m @ basis, basis.T
        else:  # M ≈ basis·(basisᵀ M)
            left, right = basis, basis.T @ m
        left, right = _balanced(left, right)
        error_squared += float(torch.linalg.vector_norm(m.addmm_(left, right, alpha=-1))) ** 2  # ‖M − M_K‖², M is spent
        verticals.append(left.T.reshape(rank, c, kh, 1))  # V[k,c,i] = U[(c,i),k]·√s_k
        horizontals.append(right.reshape(rank, kw, n_g).permute(2, 0, 1).unsqueeze(2))  # H[n,k,0,j]
        spectra.append(singular_values)
    spectrum = torch.stack(spectra)
    return Decomposition(
        vertical=torch.cat(verticals).to(weight.dtype).to(weight.device),
        horizontal=torch.cat(horizontals).to(weight.dtype).to(weight.device),
        singular_values=spectrum[0] if groups == 1 else spectrum,
        error=math.sqrt(error_squared),
        norm=float(torch.linalg.vector_norm(weight.detach(), dtype=torch.float64)),
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


def decompose_linear(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, Decomposition]:
    """W (out×in) ≈ U·V, U out×K and V K×in, by the truncated SVD (Eckart–Young: the best rank-K
    approximation in Frobenius norm, error sqrt(Σ_{k>K} s_k²)), √s_k on each side; computed as the
    convs' are (top-K eigenpairs of the shorter side's Gram matrix, float64). Returns (U, V, the
    Decomposition: singular values, error; its vertical/horizontal are V and U as 1×1 kernels)."""
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank {rank} must be in 1..{min(out_features, in_features)} for a {out_features}×{in_features}"
                         " linear layer")
    m = weight.detach().to(torch.float64)
    transpose = m.shape[0] > m.shape[1]
    eigenvalues, basis = _top_eigenpairs(m.T @ m if transpose else m @ m.T, rank)
    left, right = (m @ basis, basis.T) if transpose else (basis, basis.T @ m)
    left, right = _balanced(left, right)
    error = float(torch.linalg.matrix_norm(m - left @ right))
    u, v = left.to(weight), right.to(weight)
    decomposition = Decomposition(vertical=v.reshape(rank, in_features, 1, 1), horizontal=u.reshape(out_features, rank, 1, 1),
                                  singular_values=eigenvalues.clamp_min(0).sqrt(), error=error,
                                  norm=float(torch.linalg.matrix_norm(m)), rank=rank)
    return u, v, decomposition
