"""Robust batched CholeskyQR: the plain-PyTorch reference of the ``csrc/`` extension.

``cholqr_orthonormalize(y)`` returns an orthonormal basis ``(B, m, r)`` of the columns of every
``y[b]`` (``m >= r``), like :func:`~adapprox_kernels.srsi.householder_orthonormalize`, but built
from Gram matrices, Cholesky factors and matrix products, which batch well on a GPU where
``torch.linalg.qr`` of a large batch does not (pytorch issue 143281). The CUDA extension runs
exactly these steps with cuBLAS / cuSOLVER; this module is its oracle and runs on any device.

The steps, per matrix, all in fp64 (on H100-class GPUs fp64 tensor-core GEMMs run at the fp32
SIMT rate, and fp64 is what lets Cholesky of a Gram matrix survive the ill-conditioned sketches
of a second moment, which is close to rank 1):

1. Completion: ``X = Y + δ·‖Y‖_F·D·C`` with ``C`` the first ``r`` DCT-II columns, ``D`` a fixed
   diagonal of pseudo-random signs (so ``D·C`` has orthonormal columns and lines up with no
   structured input, such as constant columns) and ``δ = 2⁻³²``. A rank-deficient or all-zero
   ``Y`` thereby gets its basis completed with fixed directions instead of a failing Cholesky,
   while its own directions move by ~``δ``, far below fp32 resolution (``‖Y‖_F`` is taken as 1
   for an all-zero ``Y``).
2. Shifted CholeskyQR: ``R = chol(XᵀX + s·I)``, ``X ← X R⁻¹`` with the shift
   ``s = 11·(m·r + r·(r+1))·u·trace(XᵀX)`` of Fukaya et al. (2020), so the Cholesky
   factorization cannot fail for a finite ``X`` and the result is well enough conditioned for:
3. two plain CholeskyQR passes (CholeskyQR2), orthonormal to fp64 rounding.
4. Check: every Cholesky succeeded and the last Gram matrix is within ``0.1`` of ``I`` (then the
   last pass ran on a well-conditioned, finite input, so its output is finite and orthonormal).
   Failing matrices (in practice only non-finite input) are recomputed with Householder QR, so
   a non-finite ``Y`` gives what ``torch.linalg.qr`` gives.

Built for fp32 sketches. On fp64 ones (FSDP2's row-sharded path of fp64 parameters) the
completion still moves the spans by ~``δ`` (far above fp64's rounding, which Householder QR
keeps), and a sketch below ~1e-154 in norm underflows ``‖Y‖_F`` to 0, so the completion takes
over its span; neither matters to a second-moment estimate, and both are left as they are.

``R⁻¹`` is formed explicitly (a small triangular solve against ``I``) so that each tall product
is one batched GEMM. The result is returned in ``y``'s dtype. Matrices are independent: a
matrix gets the same ``Q`` whatever else is in the batch. Columns may differ in sign from
Householder QR's (the ``R`` here has a positive diagonal); spans agree.
"""

from __future__ import annotations

import math

import torch

from .srsi import householder_orthonormalize

# Relative size of the completion term (step 1) and the last-Gram tolerance (step 4); the CUDA
# extension exports the same two numbers (tests compare them).
COMPLETION_SCALE = 2.0**-32
GRAM_TOLERANCE = 0.1


def check_sketch(y: torch.Tensor) -> None:
    """Raises ``ValueError`` unless ``y`` is a ``(B, m, r)`` floating tensor with ``m >= r``."""
    if y.dim() != 3:
        raise ValueError(f"orthonormalize expects a (B, m, r) tensor, got shape {tuple(y.shape)}")
    if not y.is_floating_point():
        raise ValueError(f"orthonormalize expects a floating-point tensor, got {y.dtype}")
    if y.shape[1] < y.shape[2]:
        raise ValueError(f"orthonormalize needs m >= r (at most m orthonormal columns), got shape {tuple(y.shape)}")


def row_signs(m: int, device: torch.device | str | None = None, rows: range | None = None) -> torch.Tensor:
    """``D``: ``±1`` per row from a 32-bit integer hash of the row index, ``(m,)`` fp64 (only
    ``rows``, e.g. one rank's block of a row-sharded sketch, when given).

    ``h = i·2654435761 mod 2³²; h ^= h >> 16; h = h·0x045D9F3B mod 2³²; h ^= h >> 16``; the sign
    is ``-1`` when ``h`` is odd. Every product stays below 2⁶³ (``i < 2³¹``), so int64 gives the
    exact uint32 arithmetic of the CUDA kernel."""
    mask = 0xFFFFFFFF
    rows = range(m) if rows is None else rows
    h = (torch.arange(rows.start, rows.stop, dtype=torch.int64, device=device) * 2654435761) & mask
    h = h ^ (h >> 16)
    h = (h * 0x045D9F3B) & mask
    h = h ^ (h >> 16)
    return 1.0 - 2.0 * (h & 1).to(torch.float64)


def completion_basis(
    m: int, r: int, device: torch.device | str | None = None, rows: range | None = None
) -> torch.Tensor:
    """``D·C``: the first ``r`` orthonormal DCT-II columns of size ``m`` with the rows' signs
    flipped by :func:`row_signs`, ``(m, r)`` fp64 with orthonormal columns (only ``rows`` when
    given).

    ``C[i, j] = w_j·cos(π·(2i+1)·j / (2m))``, ``w_0 = √(1/m)``, ``w_j = √(2/m)``; the phase
    ``(2i+1)·j`` is reduced modulo ``4m`` in integers first, as the CUDA kernel does."""
    rows = range(m) if rows is None else rows
    i = torch.arange(rows.start, rows.stop, dtype=torch.int64, device=device).unsqueeze(1)
    j = torch.arange(r, dtype=torch.int64, device=device).unsqueeze(0)
    phase = ((2 * i + 1) * j) % (4 * m)
    weight = torch.full((r,), math.sqrt(2.0 / m), dtype=torch.float64, device=device)
    weight[:1] = math.sqrt(1.0 / m)
    dct = torch.cos(phase.to(torch.float64) * (math.pi / (2 * m))) * weight
    return dct * row_signs(m, device, rows).unsqueeze(1)


def cholesky_shift(m: int, r: int) -> float:
    """The factor ``11·(m·r + r·(r+1))·u`` (fp64 ``u = 2⁻⁵³``) of ``trace(XᵀX)`` in step 2."""
    return 11.0 * (m * r + r * (r + 1)) * (torch.finfo(torch.float64).eps / 2)


def _cholqr_pass(x: torch.Tensor, shift: float, reduce=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CholeskyQR pass on ``x: (B, m, r)`` fp64, ``shift`` times the trace added to the Gram
    diagonal: returns ``(x R⁻¹, unshifted Gram (B, r, r), Cholesky info (B,))``. ``reduce`` sums
    the Gram over the ranks holding the other rows of ``x``."""
    gram = torch.bmm(x.transpose(1, 2), x)
    if reduce is not None:
        gram = reduce(gram)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    shifted = gram
    if shift:
        trace = gram.diagonal(dim1=1, dim2=2).sum(-1)
        shifted = gram + (shift * trace).view(-1, 1, 1) * eye
    lower, info = torch.linalg.cholesky_ex(shifted)  # shifted = L Lᵀ, so R = Lᵀ
    r_inv = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False).transpose(1, 2)
    return torch.bmm(x, r_inv), gram, info


def cholqr_orthonormalize(y: torch.Tensor, shards=None) -> torch.Tensor:
    """Orthonormal basis of the columns of every ``y[b]``: ``(B, m, r) -> (B, m, r)``, never NaN
    for finite input (rank-deficient and all-zero ``y`` included). See the module docstring.

    ``shards`` (a :class:`~adapprox_kernels.distributed.RowShards`): ``y`` is this rank's block
    of rows of a sketch split over ranks; the norm and the Gram matrices are summed over the
    ranks (every rank then takes the same decisions) and the fallback is its TSQR."""
    if shards is None:
        check_sketch(y)
        if y.numel() == 0:
            return torch.empty_like(y)
        m, rows, reduce, fallback = y.shape[1], None, None, householder_orthonormalize
    else:
        m, rows, reduce, fallback = shards.rows, shards.local_rows, shards.all_reduce, shards.tsqr
    r = y.shape[2]
    norm = torch.linalg.vector_norm(y, dim=(1, 2), dtype=torch.float64)
    if reduce is not None:
        norm = reduce(norm.square()).sqrt()
    scale = torch.where(norm > 0, norm, torch.ones_like(norm))
    x = y.to(torch.float64) + (COMPLETION_SCALE * scale).view(-1, 1, 1) * completion_basis(m, r, y.device, rows)
    x, _, info1 = _cholqr_pass(x, cholesky_shift(m, r), reduce)
    x, _, info2 = _cholqr_pass(x, 0.0, reduce)
    x, gram, info3 = _cholqr_pass(x, 0.0, reduce)
    gram_err = (gram - torch.eye(r, dtype=gram.dtype, device=gram.device)).abs().amax(dim=(1, 2))
    failed = (info1 != 0) | (info2 != 0) | (info3 != 0) | ~(gram_err <= GRAM_TOLERANCE)  # `~(<=)` catches NaN
    q = x.to(y.dtype)
    if bool(failed.any()):
        idx = failed.nonzero().squeeze(1)
        q[idx] = fallback(y[idx])
    return q
