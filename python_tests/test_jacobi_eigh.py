"""The batched Jacobi eigensolver (``kernels/jacobi_eigh.py``) against ``torch.linalg.eigh`` in
float64. Runs under the Triton interpreter without a GPU (see triton_env.py): r <= 16, B <= 3."""

import pytest
import torch
from triton_env import DEVICE, triton_kernels  # noqa: F401  (autouse fixture)

SIZES = [1, 2, 3, 7, 13, 16]
TOL = 1e-5  # of the largest |eigenvalue|, of ‖A‖_F, and of 1 for orthonormality


def _eigh(a, **kw):
    from adapprox_kernels.kernels.jacobi_eigh import jacobi_eigh

    w, z = jacobi_eigh(a.float().to(DEVICE), **kw)
    return w.cpu().double(), z.cpu().double()


def _check(a, w, z, tol=TOL):
    """``w`` ascending and equal to eigh's, ``Z`` orthonormal, ``Z diag(w) Zᵀ = A``."""
    a = a.double()
    r = a.shape[-1]
    expected = torch.linalg.eigvalsh(a)
    scale = expected.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    assert ((w - expected).abs() / scale).max() <= tol, (w, expected)
    assert (w.diff(dim=-1) >= 0).all()
    assert (z.mT @ z - torch.eye(r, dtype=z.dtype)).abs().max() <= tol
    rebuilt = z @ torch.diag_embed(w) @ z.mT
    norm = a.norm(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    assert ((rebuilt - a).norm(dim=(1, 2), keepdim=True) / norm).max() <= tol


def _gram(batch, r, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2 * r + 1, r, generator=gen, dtype=torch.float64)
    return x.mT @ x


@pytest.mark.parametrize("by_dot", [True, False])
@pytest.mark.parametrize("r", SIZES)
def test_random_grams_and_symmetric_matrices(r, by_dot):
    gram = _gram(2, r, r)
    _check(gram, *_eigh(gram, by_dot=by_dot))
    sym = torch.randn(3, r, r, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
    sym = sym + sym.mT  # indefinite
    _check(sym, *_eigh(sym, by_dot=by_dot))


@pytest.mark.parametrize("r", [20, 33, 64])
def test_wider_tiles(r):
    """R = 32 (dots by default) and R = 64 (gathers). The fp32 rounding of 6 sweeps of r − 1
    rounds grows with r: ~1e-5 of the largest eigenvalue at r = 64 (2e-6 at r = 16)."""
    gram = _gram(1, r, r)
    _check(gram, *_eigh(gram), tol=3e-5)


def test_descending():
    gram = _gram(2, 13, 1)
    w, z = _eigh(gram, descending=True)
    assert (w.diff(dim=-1) <= 0).all()
    w_up, z_up = _eigh(gram)
    torch.testing.assert_close(w, w_up.flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(z, z_up.flip(-1), rtol=0, atol=0)


@pytest.mark.parametrize("by_dot", [True, False])
def test_rayleigh_ritz_product_matches_eigh(by_dot):
    """``Q Z_k (U Z_k)ᵀ``, the best rank-k part of ``Q Uᵀ``, from the Jacobi vectors equals the
    one from eigh's for every k with a gap after the k-th eigenvalue (here all: the singular
    values are 2^-j apart)."""
    gen = torch.Generator().manual_seed(3)
    batch, m, n, r = 2, 20, 18, 7
    q = torch.linalg.qr(torch.randn(batch, m, r, generator=gen, dtype=torch.float64)).Q
    left = torch.linalg.qr(torch.randn(batch, n, r, generator=gen, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(batch, r, r, generator=gen, dtype=torch.float64)).Q
    sigma = 2.0 ** -torch.arange(r, dtype=torch.float64)
    u = (left * sigma) @ right.mT  # singular values 1, 1/2, 1/4, ...
    gram = u.mT @ u
    _, z = _eigh(gram, descending=True, by_dot=by_dot)
    z_ref = torch.linalg.eigh(gram).eigenvectors.flip(-1)
    full = (q @ u.mT).norm(dim=(1, 2))
    for k in range(1, r + 1):
        ours = (q @ z[..., :k]) @ (u @ z[..., :k]).mT
        ref = (q @ z_ref[..., :k]) @ (u @ z_ref[..., :k]).mT
        assert ((ours - ref).norm(dim=(1, 2)) / full).max() <= TOL, k


def test_the_optimizers_rayleigh_ritz_can_take_the_kernels_vectors():
    """``srsi.rayleigh_ritz`` with its eigh replaced by the kernel: the same rank-k factors'
    products on an S-RSI result (a noisy low-rank matrix, 2 subspace iterations)."""
    from adapprox_kernels.srsi import gaussian_sketch, rayleigh_ritz, subspace_iteration
    from adapprox_kernels.linear_operator import DenseOperator

    gen = torch.Generator().manual_seed(4)
    batch, m, n, k, p = 2, 24, 20, 3, 5
    low = torch.randn(batch, m, k, generator=gen) @ torch.randn(batch, k, n, generator=gen)
    op = DenseOperator(low + 0.05 * torch.randn(batch, m, n, generator=gen))
    q, u = subspace_iteration(op, gaussian_sketch(op, k + p, gen), 2)
    q_ref, u_ref = rayleigh_ritz(q, u)
    _, z = _eigh(u.mT.double() @ u.double(), descending=True)
    z = z.float()
    ours = (q @ z)[..., :k] @ (u @ z)[..., :k].mT
    ref = q_ref[..., :k] @ u_ref[..., :k].mT
    assert ((ours - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).max() <= 1e-5


@pytest.mark.parametrize("r", [1, 5, 16])
def test_zero_matrix(r):
    w, z = _eigh(torch.zeros(2, r, r))
    assert (w == 0).all()
    assert torch.equal(z, torch.eye(r, dtype=z.dtype).expand(2, r, r))


def test_diagonal_matrix_is_exact():
    """No rotation at all: the diagonal, sorted, and a permutation matrix."""
    d = torch.tensor([[3.0, -1.0, 0.0, 7.0, 2.5, 1e-3, 1e3]])
    w, z = _eigh(torch.diag_embed(d))
    assert torch.equal(w.float(), d.sort(dim=-1).values)
    assert torch.equal(z.abs().sum(dim=-1), torch.ones(1, 7, dtype=z.dtype))
    assert torch.equal(z @ torch.diag_embed(w) @ z.mT, torch.diag_embed(d).double())


@pytest.mark.parametrize("by_dot", [True, False])
def test_repeated_eigenvalues(by_dot):
    gen = torch.Generator().manual_seed(5)
    r = 9
    basis = torch.linalg.qr(torch.randn(2, r, r, generator=gen, dtype=torch.float64)).Q
    values = torch.tensor([4.0, 4.0, 4.0, 1.0, 1.0, 0.0, 0.0, 0.0, -2.0], dtype=torch.float64)
    a = basis @ torch.diag_embed(values.expand(2, r)) @ basis.mT
    a = (a + a.mT) / 2
    _check(a, *_eigh(a, by_dot=by_dot))
    _check(torch.eye(r).expand(3, r, r) * 2.5, *_eigh(torch.eye(r).expand(3, r, r) * 2.5))


@pytest.mark.parametrize("r", [2, 7, 16])
def test_rank_one_gram(r):
    """``u uᵀ``: one eigenvalue ‖u‖², the rest 0 (to the tolerance), its vector ±u/‖u‖."""
    u = torch.randn(3, r, 1, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
    a = u @ u.mT
    w, z = _eigh(a, descending=True)
    _check(a, w.flip(-1), z.flip(-1))
    top = u[..., 0] / u.norm(dim=(1, 2))[:, None]
    torch.testing.assert_close((z[..., 0] * top).sum(-1).abs(), torch.ones(3, dtype=z.dtype), rtol=0, atol=1e-6)


def test_one_by_one():
    a = torch.tensor([[[2.5]], [[-3.0]], [[0.0]]])
    w, z = _eigh(a)
    assert torch.equal(w, a[..., 0].double()) and torch.equal(z, torch.ones(3, 1, 1, dtype=z.dtype))


def test_scale_range_and_strided_input():
    """Entries far from 1 (an fp32 Gram of small singular values: 1e-30 and 1e30) are scaled
    first; a transposed view is read through its strides."""
    gram = _gram(2, 6, 6)
    for factor in (1e-30, 1e30):
        _check(gram * factor, *_eigh(gram * factor))
    strided = gram.float().to(DEVICE).mT  # symmetric, so the same matrices, other strides
    assert not strided.is_contiguous()
    _check(gram, *_eigh(strided))


def test_a_matrix_that_is_not_finite_gets_nan_alone():
    a = _gram(3, 5, 7).float()
    a[1, 0, 2] = float("inf")
    a[2, 3, 3] = float("nan")
    w, z = _eigh(a)
    assert w[1:].isnan().all() and z[1:].isnan().all()
    _check(a[:1].double(), w[:1], z[:1])


def test_errors():
    from adapprox_kernels.kernels.jacobi_eigh import jacobi_eigh

    with pytest.raises(ValueError, match="r <= 64"):
        jacobi_eigh(torch.zeros(1, 65, 65, device=DEVICE))
    with pytest.raises(TypeError, match="float32"):
        jacobi_eigh(torch.zeros(1, 4, 4, dtype=torch.float64, device=DEVICE))
    for shape in ((4, 4), (1, 4, 5), (2, 1, 4, 4)):
        with pytest.raises(ValueError, match=r"\(B, r, r\)"):
            jacobi_eigh(torch.zeros(shape, device=DEVICE))
    with pytest.raises(ValueError, match="sweeps"):
        jacobi_eigh(torch.zeros(1, 4, 4, device=DEVICE), sweeps=-1)
    w, z = jacobi_eigh(torch.zeros(0, 4, 4, device=DEVICE))
    assert w.shape == (0, 4) and z.shape == (0, 4, 4)


def test_jacobi_kernel_compiles_for_hopper_without_spills_or_approximate_math():
    """Compiled for sm_90 (no GPU: triton's own ptxas), each tile size with the way and the warps
    the launcher picks: no spills, and the rotation's divisions and square roots correctly
    rounded, as under the interpreter (numpy). Triton's default ``/`` and ``tl.sqrt`` compile to
    div.full.f32 and sqrt.approx.ftz.f32 (up to 2 and 1 ulps off), with which c² + s² drifts
    from 1 several times as far per rotation, and Z's orthonormality with it (~1e-5 at r = 16,
    the tests' tolerance). Read from the PTX."""
    from test_triton_kernels import _compile_for_hopper

    got = _compile_for_hopper(_HOPPER_JACOBI)
    for tile, (regs, spills, approx) in got.items():
        assert spills == 0 and 0 < regs <= 255 and approx == [], (tile, regs, spills, approx)


_HOPPER_JACOBI = """
import json, re
from bench.kernel_resources import compile_sm90, ptxas_usage
from adapprox_kernels.kernels.jacobi_eigh import DEFAULT_SWEEPS, DOT_MAX_TILE, _jacobi_eigh_kernel

out = {}
for tile in (16, 32, 64):
    consts = dict(SWEEPS=DEFAULT_SWEEPS, R=tile, BY_DOT=tile <= DOT_MAX_TILE)
    kernel = compile_sm90(_jacobi_eigh_kernel, consts, warps=4 if tile <= 32 else 8, stages=1,
                          unit=frozenset({"stride_an", "stride_zn"}))
    ptx = kernel.asm["ptx"]
    approx = sorted(set(re.findall(r"(?:sqrt|div|rcp|rsqrt)\\.(?:approx|full)[.a-z0-9]*", ptx)))
    out[tile] = [*ptxas_usage(ptx), approx]
print(json.dumps(out))
"""


def test_rayleigh_ritz_by_the_kernel():
    """``srsi.rayleigh_ritz(q, u, eigh)`` with the kernel (as the optimizer passes it for CUDA
    buckets on the Triton backend): the rank-k products of the default (eigh in float64) on an
    S-RSI result, for every k; and non-finite and all-zero sketches are left as they are."""
    import functools

    from adapprox_kernels.kernels.jacobi_eigh import jacobi_eigh
    from adapprox_kernels.linear_operator import DenseOperator
    from adapprox_kernels.srsi import gaussian_sketch, rayleigh_ritz, subspace_iteration

    eigh = functools.partial(jacobi_eigh, descending=True)
    gen = torch.Generator().manual_seed(6)
    batch, m, n, k, p = 2, 24, 20, 3, 5
    low = torch.randn(batch, m, k, generator=gen) @ torch.randn(batch, k, n, generator=gen)
    op = DenseOperator((low + 0.05 * torch.randn(batch, m, n, generator=gen)).to(DEVICE))
    q, u = subspace_iteration(op, gaussian_sketch(op, k + p, gen).to(DEVICE), 2)
    q_ref, u_ref = rayleigh_ritz(q, u)
    q_ker, u_ker = rayleigh_ritz(q, u, eigh)
    for j in range(1, k + 1):  # the top k: well apart (a rank-3 matrix plus noise)
        ref = q_ref[..., :j] @ u_ref[..., :j].mT
        ours = q_ker[..., :j] @ u_ker[..., :j].mT
        assert ((ours - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).max() <= 1e-5, j
    torch.testing.assert_close(
        q_ker.mT @ q_ker, torch.eye(k + p, device=DEVICE).expand(batch, -1, -1), rtol=0, atol=1e-5
    )
    bad = u.clone()
    bad[0, 0, 0] = float("inf")
    q2, u2 = rayleigh_ritz(q, bad, eigh)
    assert torch.equal(q2[0], q[0]) and torch.equal(u2[0], bad[0])
    torch.testing.assert_close(q2[1] @ u2[1].mT, q_ref[1] @ u_ref[1].mT, rtol=0, atol=1e-5)
    zero = torch.zeros_like(u)
    q3, u3 = rayleigh_ritz(q, zero, eigh)
    assert torch.equal(u3, zero) and torch.equal(q3, q)
