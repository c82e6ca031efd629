"""The exact decomposition against float64 numpy references and against iterative fits."""

import math

import numpy as np
import pytest
import torch

from lowrank_dist.lowrank.ranks import EnergyFraction, ExplicitRanks, TargetSpeedup, policy_from_config
from lowrank_dist.lowrank.svd import decompose_kernel, max_rank, recompose, singular_values

SHAPES = [  # N, C, kh, kw — square, wide, tall, kh != kw, single input channel
    (8, 5, 3, 3),
    (16, 3, 11, 11),
    (6, 12, 5, 5),
    (10, 4, 3, 1),
    (7, 9, 1, 3),
    (5, 6, 2, 4),
]


def numpy_unfold(w):
    """Independent unfolding: M[(c,i),(j,n)] = W[n,c,i,j] by explicit loops."""
    n, c, kh, kw = w.shape
    m = np.empty((c * kh, kw * n))
    for nn_ in range(n):
        for cc in range(c):
            for i in range(kh):
                for j in range(kw):
                    m[cc * kh + i, j * n + nn_] = w[nn_, cc, i, j]
    return m


def random_kernel(shape, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_error_is_the_discarded_singular_energy(shape):
    w = random_kernel(shape)
    s = np.linalg.svd(numpy_unfold(w.numpy()), compute_uv=False)
    assert max_rank(w) == len(s)
    for rank in sorted({1, len(s) // 2 or 1, len(s) - 1 or 1}):
        d = decompose_kernel(w, rank)
        expected = math.sqrt(float(np.sum(s[rank:] ** 2)))
        assert abs(d.error - expected) < 1e-10
        # .error is the real Frobenius distance to the recomposed kernel
        assert abs(float((w - recompose(d.vertical, d.horizontal)).norm()) - expected) < 1e-10
        np.testing.assert_allclose(d.singular_values.numpy(), s[:rank], atol=1e-10)
        np.testing.assert_allclose(singular_values(w).numpy(), s, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_recomposition_is_the_truncated_svd(shape):
    """Ŵ equals numpy's rank-K truncation U_K S_K V_Kᵀ of the unfolded matrix, element by element,
    and the factors have the balanced √s split (‖V_k‖ = ‖H_k‖ = √s_k)."""
    w = random_kernel(shape, seed=1)
    m = numpy_unfold(w.numpy())
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    rank = max(1, len(s) // 2)
    d = decompose_kernel(w, rank)
    truncated = (u[:, :rank] * s[:rank]) @ vt[:rank]
    np.testing.assert_allclose(numpy_unfold(recompose(d.vertical, d.horizontal).numpy()), truncated, atol=1e-10)
    n, c, kh, kw = shape
    assert d.vertical.shape == (rank, c, kh, 1) and d.horizontal.shape == (n, rank, 1, kw)
    np.testing.assert_allclose(d.vertical.flatten(1).norm(dim=1).square().numpy(), s[:rank], rtol=1e-9)
    np.testing.assert_allclose(d.horizontal.transpose(0, 1).flatten(1).norm(dim=1).square().numpy(), s[:rank], rtol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_reconstructs_exactly(shape):
    w = random_kernel(shape, seed=2)
    d = decompose_kernel(w, max_rank(w))
    assert d.error < 1e-10 * float(w.norm())
    torch.testing.assert_close(recompose(d.vertical, d.horizontal), w, rtol=0, atol=1e-11)


def test_float32_input_gives_float32_factors_computed_in_float64():
    w64 = random_kernel((12, 8, 3, 3), seed=3)
    d32 = decompose_kernel(w64.float(), 6)
    d64 = decompose_kernel(w64.float().double(), 6)
    assert d32.vertical.dtype == d32.horizontal.dtype == torch.float32
    torch.testing.assert_close(d32.vertical, d64.vertical.float(), rtol=0, atol=1e-6)
    assert d32.error == pytest.approx(d64.error, rel=1e-12)


def test_grouped_kernel_is_decomposed_group_by_group():
    groups, rank = 2, 3
    w = random_kernel((8, 4, 3, 3), seed=4)  # conv with 8 in, 8 out, groups=2 → 4 in per group
    d = decompose_kernel(w, rank, groups)
    assert d.vertical.shape == (groups * rank, 4, 3, 1) and d.horizontal.shape == (8, rank, 1, 3)
    assert d.singular_values.shape == (groups, rank)
    errors = []
    for g in range(groups):
        part = decompose_kernel(w[4 * g:4 * (g + 1)], rank)
        torch.testing.assert_close(d.singular_values[g], part.singular_values)
        errors.append(part.error)
    assert d.error == pytest.approx(math.hypot(*errors), rel=1e-12)
    assert float((recompose(d.vertical, d.horizontal, groups) - w).norm()) == pytest.approx(d.error, rel=1e-9)


def alternating_least_squares(w, rank, seed, iterations=60):
    """Fit W[n,c,i,j] ≈ Σ_k V[k,c,i]·H[n,k,j] by alternating least squares in kernel space (no
    unfolding): with V fixed each H[n,:,j] is a linear least-squares fit, and vice versa."""
    n, c, kh, kw = w.shape
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(rank, c, kh, generator=generator, dtype=torch.float64)
    for _ in range(iterations):
        a = v.reshape(rank, c * kh).T  # (c·kh) × K
        targets = w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)  # column (n, j): W[n,:,:,j]
        h = torch.linalg.lstsq(a, targets).solution.reshape(rank, n, kw)  # H[k,n,j]
        b = h.permute(1, 2, 0).reshape(n * kw, rank)  # row (n, j): H[n,:,j]
        v = torch.linalg.lstsq(b, targets.T).solution.reshape(rank, c, kh)
    approx = torch.einsum("kci,knj->ncij", v, h)
    return float((w - approx).norm())


@pytest.mark.parametrize("shape,rank", [((8, 5, 3, 3), 4), ((6, 12, 5, 5), 7), ((5, 6, 2, 4), 2)])
def test_closed_form_beats_every_alternating_least_squares_fit(shape, rank):
    w = random_kernel(shape, seed=5)
    closed_form = decompose_kernel(w, rank).error
    fits = [alternating_least_squares(w, rank, seed) for seed in range(5)]
    assert closed_form <= min(fits) + 1e-9
    # and the fits are real competitors, not strawmen: the best comes within 1% of the optimum
    assert min(fits) <= closed_form * 1.01


@pytest.mark.parametrize(
    "weight,rank,message",
    [
        (torch.zeros(4, 3, 3, 3), 0, r"rank 0 is out of range .* allowed 1\.\.9"),
        (torch.zeros(4, 3, 3, 3), -2, r"allowed 1\.\.9"),
        (torch.zeros(4, 3, 3, 3), 10, r"rank 10 is out of range for a 3×3 conv 3→4 .* allowed 1\.\.9"),
        (torch.zeros(4, 3, 3, 3), 2.5, r"rank 2\.5 is out of range"),
        (torch.zeros(4, 3, 3), 1, r"expected a 4-D conv kernel N×C×kh×kw, got \(4, 3, 3\)"),
        (torch.zeros(2, 4, 3, 3, 3), 1, r"4-D"),
        (torch.zeros(8, 4, 1, 1), 1, r"1×1 kernel .* kh·kw > 1"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(weight, rank, message):
    with pytest.raises(ValueError, match=message):
        decompose_kernel(weight, rank)


def test_bad_groups_and_not_a_tensor():
    with pytest.raises(ValueError, match="groups=3 must be >= 1 and divide the 8 output channels"):
        decompose_kernel(torch.zeros(8, 2, 3, 3), 1, groups=3)
    with pytest.raises(ValueError, match="got ndarray"):
        max_rank(np.zeros((4, 3, 3, 3)))


def test_target_speedup_policy_reaches_the_target_with_the_largest_rank():
    w = torch.zeros(256, 128, 3, 3)
    k = TargetSpeedup(3.0).rank_for("conv", w)
    cost = lambda r: r * (128 * 3 + 256 * 3)  # noqa: E731
    assert 256 * 128 * 9 / cost(k) >= 3.0 > 256 * 128 * 9 / cost(k + 1)
    # an impossible target clamps to rank 1
    assert TargetSpeedup(1e6).rank_for("conv", w) == 1
    with pytest.raises(ValueError, match="target speedup must be > 1"):
        TargetSpeedup(0.5)


def test_energy_policy_keeps_the_smallest_rank_reaching_the_fraction():
    # a kernel with a known spectrum: s = 8, 4, 2, 1, 0.5, ... (energy shares 64, 16, 4, 1, ...)
    c, kh, n, kw = 6, 3, 24, 3
    u, _ = torch.linalg.qr(torch.randn(c * kh, c * kh, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(kw * n, c * kh, dtype=torch.float64))
    s = 8.0 * 0.5 ** torch.arange(c * kh, dtype=torch.float64)
    m = (u * s) @ v.T
    w = m.reshape(c, kh, kw, n).permute(3, 0, 1, 2)
    torch.testing.assert_close(singular_values(w), s)
    energy = s.square().cumsum(0) / s.square().sum()
    assert EnergyFraction(float(energy[1])).rank_for("conv", w) == 2
    assert EnergyFraction(float(energy[1]) + 1e-6).rank_for("conv", w) == 3
    # keeping all the energy of a 18-rank kernel costs more than the dense conv: stays dense
    assert EnergyFraction(1.0).rank_for("conv", w) is None


def test_policy_from_config():
    assert isinstance(policy_from_config({"ranks": [1, 2]}), ExplicitRanks)
    assert policy_from_config({"speedup": 2}).speedup == 2.0
    assert policy_from_config({"energy": 0.9}).fraction == 0.9
    with pytest.raises(ValueError, match=r"give exactly one of ranks, speedup, energy \(got \['speedup', 'energy'\]\)"):
        policy_from_config({"speedup": 2, "energy": 0.9})
    with pytest.raises(ValueError, match="exactly one"):
        policy_from_config({})
    with pytest.raises(ValueError, match=r"energy fraction must be in \(0, 1\]"):
        policy_from_config({"energy": 1.5})
