"""Eigen-decomposition of a batch of small symmetric fp32 matrices, without a host sync.

``torch.linalg.eigh`` on CUDA reads its convergence flag on the host: one sync per call, and
no CUDA-graph capture. This kernel runs a cyclic Jacobi method with a *fixed* number of sweeps
instead (no convergence test at all), one program per matrix, the ``R × R`` matrix ``A`` and
the accumulated rotation ``Z`` held in registers (``R`` = the next power of two >= r, >= 16).
The padding is an identity block: its off-diagonal entries are 0, so no rotation ever couples
it to the ``r × r`` block.

Each sweep has ``n − 1`` rounds (``n`` = r rounded up to even) in the round-robin
("tournament") order: in round ``k`` index ``n − 1`` is paired with ``k`` and every other
``i < n − 1`` with ``(2k − i) mod (n − 1)``, so the ``n/2`` pairs of a round are disjoint and
a sweep visits every pair once. A round applies its ``n/2`` rotations at once as one orthogonal
``J`` built with masks from the pairing: ``A ← Jᵀ A J``, ``Z ← Z J`` (``tl.dot`` in ieee fp32).
The rotation of a pair ``p < q`` zeroes ``a_pq`` with Rutishauser's stable angle
``θ = (a_qq − a_pp) / (2 a_pq)``, ``t = sign(θ) / (|θ| + √(θ² + 1))``, ``c = 1/√(t² + 1)``,
``s = t c``; a pair whose ``a_pq`` is negligible is not rotated. Both rows of a pair compute
their ``(c, s)`` from the same (symmetrized) ``a_pq``, so ``J`` is orthogonal to rounding even
as ``A`` drifts from exact symmetry. The matrix is scaled by its largest entry first (an fp32
Gram squares its singular values: this keeps the angles away from over- and underflow).

Sweeps (``DEFAULT_SWEEPS``): cyclic Jacobi converges quadratically once the off-diagonal is
small, and S-RSI's Gram after its subspace iterations is nearly diagonal already. Six sweeps
also take a random Gram ``XᵀX`` or random symmetric matrix (nothing diagonal about them) to
eigenvalues within 1e-5 of the largest, ``Z`` orthonormal and ``Z diag(λ) Zᵀ`` equal to ``A``
to 1e-5 at r <= 16 (``test_random_grams_and_symmetric_matrices``), and a random Gram to 3e-5
up to r = 64 (``test_wider_tiles``); the cost is linear in them. The floor itself grows with r
(rounding over 6 (n − 1) rounds).

A matrix with an entry that is not finite gets NaN eigenvalues and eigenvectors (the others
of the batch are unaffected); the caller decides what to do with it (see
:func:`adapprox_kernels.srsi.rayleigh_ritz`).

Two ways to apply ``J`` (``BY_DOT``): the two dots the method is usually written with, or,
since ``J`` has two entries per column, as ``c·X`` minus ``s·X`` with the pair's rows (columns)
swapped (``tl.gather``): the same products to rounding, with ``R²`` instead of ``R³`` FMAs per
round. Compiled for sm_90 (``bench/jacobi_resources.py``, Triton 3.8,
``bench/results/jacobi_resources_sm90_triton3.8.0.txt``) the dots hold 92 / 238 registers per
thread at R = 16 / 32 (4 warps) and spill 8,460 bytes per thread at R = 64 even with 8 warps;
the gathers hold 40 / 116 / 173 (R = 64 with 8 warps) and spill nothing. The
default takes the dots where they do not spill (R <= 32) and the gathers at R = 64; no GPU has
timed either yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FP_FUSION, on_device

# R = 64: A and Z (and J, by dots) take 32 fp32 registers each per thread at 4 warps, 16 at the
# 8 warps the launcher gives R = 64.
MAX_SIZE = 64
DEFAULT_SWEEPS = 6
DOT_MAX_TILE = 32  # the widest tile whose rounds are dots by default (at 64 they spill)
MIN_TILE = 16  # tl.dot needs every dimension >= 16
# A pair whose |a_pq| (after scaling the matrix to a largest entry of 1) is below this is not
# rotated: it is far below what fp32 resolves next to the matrix's scale, and a_pq = 0 exactly
# (the padding, a decoupled pair) must not make θ = 0/0.
_NEGLIGIBLE = 1e-30
_NEGLIGIBLE_TL = tl.constexpr(_NEGLIGIBLE)  # what a kernel may read


@triton.jit
def _jacobi_eigh_kernel(
    a_ptr, w_ptr, z_ptr,
    r, stride_ab, stride_am, stride_an, stride_wb, stride_zb, stride_zm, stride_zn,
    SWEEPS: tl.constexpr, R: tl.constexpr, BY_DOT: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, R)[:, None]
    cols = tl.arange(0, R)[None, :]
    idx = tl.arange(0, R)
    inside = (rows < r) & (cols < r)
    diag = rows == cols
    a = tl.load(a_ptr + b * stride_ab + rows * stride_am + cols * stride_an, mask=inside, other=0.0)
    # Scale to a largest entry of 1 (an all-zero matrix: by 1). A matrix with an entry that is
    # not finite is flagged, and gets NaN eigenvalues and vectors.
    bad = tl.sum(tl.sum(tl.where(tl.abs(a) < float("inf"), 0, 1), axis=1), axis=0) > 0
    scale = tl.max(tl.max(tl.where(inside, tl.abs(a), 0.0), axis=1), axis=0)
    scale = tl.where((scale > 0) & ~bad, scale, 1.0)
    a = tl.where(bad, 0.0, a)
    a = tl.div_rn(a, scale)
    a = tl.where(diag & ~inside, 1.0, a)  # the identity block: decoupled
    z = tl.where(diag, 1.0, 0.0)
    n = r + r % 2
    last = n - 1
    for _ in range(SWEEPS):
        for k in range(last):
            # Partner of every index in this round; itself (no rotation) beyond n.
            other = (2 * k - idx + 2 * last) % last
            other = tl.where(idx == k, last, other)
            other = tl.where(idx == last, k, other)
            other = tl.where(idx >= n, idx, other)
            pair = cols == other[:, None]  # (i, partner(i))
            pair_t = rows == other[None, :]  # (partner(j), j)
            d = tl.sum(tl.where(diag, a, 0.0), axis=1)
            d_other = tl.sum(tl.where(pair, d[None, :], 0.0), axis=1)
            # a_pq the same bits in both rows of a pair: the mean of (i, p(i)) and (p(i), i).
            a_pq = 0.5 * (tl.sum(tl.where(pair, a, 0.0), axis=1) + tl.sum(tl.where(pair_t, a, 0.0), axis=0))
            low = idx < other
            a_pp = tl.where(low, d, d_other)  # p = min(i, partner), q = max
            a_qq = tl.where(low, d_other, d)
            rotate = (tl.abs(a_pq) > _NEGLIGIBLE_TL) & (idx != other)
            safe_pq = tl.where(rotate, a_pq, 1.0)
            # Correctly rounded division and square root, as the interpreter computes them: the
            # GPU's default ``/`` and ``tl.sqrt`` (div.full.f32, sqrt.approx.ftz.f32) are off by
            # up to 2 and 1 ulps, and c² + s² = 1 is what keeps J, and so Z, orthogonal.
            theta = tl.div_rn(a_qq - a_pp, 2.0 * safe_pq)
            abs_theta = tl.abs(theta)
            # √(θ² + 1) = |θ| to fp32 long before θ² overflows.
            root = tl.where(abs_theta > 1e18, abs_theta, tl.sqrt_rn(theta * theta + 1.0))
            t = tl.div_rn(tl.where(theta >= 0, 1.0, -1.0), abs_theta + root)
            c = tl.div_rn(tl.full(t.shape, 1.0, tl.float32), tl.sqrt_rn(t * t + 1.0))
            s = t * c
            c = tl.where(rotate, c, 1.0)
            s = tl.where(rotate, s, 0.0)
            # J[p, p] = J[q, q] = c, J[p, q] = s, J[q, p] = −s; row i holds its own c and ±s.
            s_row = tl.where(low, s, -s)
            if BY_DOT:
                j = tl.where(diag, c[:, None], tl.where(pair, s_row[:, None], 0.0))
                j_t = tl.where(diag, c[:, None], tl.where(pair, -s_row[:, None], 0.0))  # Jᵀ
                a = tl.dot(j_t, tl.dot(a, j, input_precision="ieee"), input_precision="ieee")
                z = tl.dot(z, j, input_precision="ieee")
            else:
                # The same products from J's two entries per column: (X J)[:, j] = c_j X[:, j]
                # − s_row[j] X[:, p(j)], (Jᵀ Y)[i, :] = c_i Y[i, :] − s_row[i] Y[p(i), :].
                by_col = tl.broadcast_to(other[None, :], (R, R))
                by_row = tl.broadcast_to(other[:, None], (R, R))
                a = a * c[None, :] - s_row[None, :] * tl.gather(a, by_col, axis=1)
                a = a * c[:, None] - s_row[:, None] * tl.gather(a, by_row, axis=0)
                z = z * c[None, :] - s_row[None, :] * tl.gather(z, by_col, axis=1)
    w = tl.sum(tl.where(diag, a, 0.0), axis=1) * scale
    w = tl.where(bad, float("nan"), w)
    z = tl.where(bad, float("nan"), z)
    tl.store(w_ptr + b * stride_wb + idx, w, mask=idx < r)
    tl.store(z_ptr + b * stride_zb + rows * stride_zm + cols * stride_zn, z, mask=inside)


def jacobi_eigh(
    gram: torch.Tensor, *, sweeps: int = DEFAULT_SWEEPS, descending: bool = False, by_dot: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(B, r)`` and orthonormal eigenvectors ``(B, r, r)`` (as columns: ``A =
    Z diag(λ) Zᵀ``) of every symmetric fp32 matrix of ``gram`` ``(B, r, r)``, ``r <= 64``, by
    ``sweeps`` cyclic Jacobi sweeps (see the module's docstring), with no host sync.

    Sorted like ``torch.linalg.eigh`` (ascending), or descending with ``descending=True``
    (``argsort`` and ``gather``, on the device). The kernel reads the whole matrix (not one
    triangle) and uses the mean of ``a_pq`` and ``a_qp``. ``by_dot``: apply the rotations by
    ``tl.dot`` (True) or by gathers (False); None: dots up to r = 32, gathers above (see the
    module's docstring). On CPU tensors this runs only under the Triton interpreter
    (``TRITON_INTERPRET=1``)."""
    if not isinstance(gram, torch.Tensor) or gram.dim() != 3 or gram.shape[1] != gram.shape[2]:
        shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise ValueError(f"jacobi_eigh needs a (B, r, r) batch of square matrices, got {shape}")
    if gram.dtype != torch.float32:
        raise TypeError(f"jacobi_eigh needs float32 matrices, got {gram.dtype}")
    batch, r = gram.shape[0], gram.shape[1]
    if r > MAX_SIZE:
        raise ValueError(
            f"jacobi_eigh holds the matrix in registers and takes r <= {MAX_SIZE}, got r = {r} "
            "(use torch.linalg.eigh for larger matrices)"
        )
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"sweeps must be an int >= 0, got {sweeps!r}")
    w = torch.empty(batch, r, dtype=torch.float32, device=gram.device)
    z = torch.empty(batch, r, r, dtype=torch.float32, device=gram.device)
    if batch == 0 or r == 0:
        return w, z
    tile = max(MIN_TILE, triton.next_power_of_2(r))
    if by_dot is None:
        by_dot = tile <= DOT_MAX_TILE
    with on_device(gram.device):
        _jacobi_eigh_kernel[(batch,)](
            gram, w, z, r, *gram.stride(), w.stride(0), *z.stride(),
            SWEEPS=sweeps, R=tile, BY_DOT=by_dot, num_warps=4 if tile <= 32 else 8, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    order = w.argsort(dim=-1, descending=descending)
    return w.gather(-1, order), z.gather(-1, order.unsqueeze(-2).expand_as(z))
