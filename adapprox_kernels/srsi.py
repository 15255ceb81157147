"""S-RSI and AS-RSI (Algorithms 1 and 2 of the Adapprox paper), written once.

Both run on any :class:`~adapprox_kernels.linear_operator.LinearOperator`, batched over ``B``
same-shaped matrices. Shapes: the operator is ``(B, m, n)``; the sketch width is
``r = min(k + p, m, n)``; factors are ``Q: (B, m, r)`` with orthonormal columns and
``U: (B, n, r)``, so that ``A ≈ Q Uᵀ``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .linear_operator import LinearOperator
from .rank_policy import next_rank_step
from .transfer import ConstantCache, handed_out, to_device_nowait

Orthonormalize = Callable[[torch.Tensor], torch.Tensor]
# ``(B, r, r)`` fp32 symmetric -> (eigenvalues, eigenvectors) by descending eigenvalue, with no
# host sync (kernels/jacobi_eigh.py); see rayleigh_ritz.
Eigh = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# How the rank-k factors are taken from the k + p sketch columns: "qr", the first k QR columns
# (Algorithm 1), or "rayleigh_ritz", the best rank-k part of Q Uᵀ (see rayleigh_ritz).
TRUNCATIONS = ("qr", "rayleigh_ritz")


def householder_orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``y`` (``(B, m, r) -> (B, m, r)``).

    Householder QR never breaks down on rank-deficient or all-zero sketches (the basis is then
    completed with arbitrary orthonormal columns), which is why it is the reference choice:
    second-moment sketches are numerically close to rank 1.
    """
    return torch.linalg.qr(y, mode="reduced").Q


def sketch_width(rank: int, oversample: int, m: int, n: int) -> int:
    """Number of sketch columns: ``k + p``, never more than the matrix can hold."""
    if oversample < 0:  # a narrower sketch than the rank: fewer columns than asked for, silently
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    return max(1, min(rank + oversample, m, n))


def gaussian_sketch(op: LinearOperator, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """The starting ``U ~ N(0, 1)^{n×r}`` of Algorithm 1, for every matrix: ``(B, n, r)``."""
    b, _, n = op.shape
    return torch.randn(b, n, width, generator=generator, device=op.device, dtype=op.dtype)


def subspace_iteration(
    op: LinearOperator,
    sketch: torch.Tensor,
    iters: int,
    orthonormalize: Orthonormalize = householder_orthonormalize,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop of Algorithm 1 from a given ``(B, n, r)`` start: ``l`` times
    ``Q = orth(A U); U = Aᵀ Q``. Returns the full-width ``(Q, U)``.

    Every product but the last only chooses the subspace; the last, ``U = Aᵀ Q``, is the factor
    itself. An operator may offer ``project(q)`` for it: a more precise ``Aᵀ Q`` than its
    ``rmatmul`` (see :class:`~adapprox_kernels.triton_backend.TritonSecondMoment`)."""
    if iters < 1:
        raise ValueError(f"subspace iteration needs at least one iteration, got {iters}")
    project = getattr(op, "project", op.rmatmul)
    u = sketch
    for i in range(iters):
        q = orthonormalize(op.matmul(u))
        u = op.rmatmul(q) if i + 1 < iters else project(q)
    return q, u


def rayleigh_ritz(q: torch.Tensor, u: torch.Tensor, eigh: Eigh | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the full-width S-RSI result so that its leading columns are the best low-rank
    parts of ``Q Uᵀ``: ``(Q Z, U Z)`` with ``Z`` the eigenvectors of ``Uᵀ U`` (``(B, r, r)``),
    by descending eigenvalue.

    ``Z`` is orthonormal, so ``Q Z`` stays orthonormal and ``Q Uᵀ`` is unchanged at full width;
    the first ``k`` columns are then the best rank-``k`` approximation of ``Q Uᵀ = Q Qᵀ A``
    (``U = Aᵀ Q``) within ``range(Q)``, never worse than the first ``k`` QR columns, and the
    ``p`` oversampling columns improve them (with the first ``k`` QR columns they never do: QR
    is triangular). The eigen-decomposition (unless ``eigh`` is given) and the rotation run in
    float64 (the Gram squares the singular values; an fp32 matmul on a GPU may run in tf32). A
    Gram that is not finite (an overflowed V) leaves ``Q`` and ``U`` as they are (their ξ is
    NaN, which the optimizer handles). On CUDA, ``torch.linalg.eigh`` reads its convergence
    flag on the host: one sync per call, and no CUDA-graph capture. ``eigh`` replaces it (see
    ``Eigh``; the Triton Jacobi kernel, which needs no sync): it gets the Gram scaled to a
    largest entry of 1, in fp32."""
    u64 = u.double()
    gram = u64.mT @ u64
    finite = gram.isfinite().all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gram = torch.where(finite, gram, eye)
    if eigh is None:
        z = torch.linalg.eigh(gram).eigenvectors.flip(-1)  # descending
    else:
        scale = gram.abs().amax(dim=(-2, -1), keepdim=True)  # fp32 holds the scaled Gram
        z = eigh((gram / torch.where(scale > 0, scale, torch.ones_like(scale))).float())[1]
    # The rotation in float64, rounded once to the factors' dtype: an fp32 matmul on a GPU runs
    # in tf32 wherever the training script allows it (torch.backends.cuda.matmul.allow_tf32,
    # set_float32_matmul_precision("high")), which would leave Q Z orthonormal only to tf32's
    # rounding (10 mantissa bits, ~1e-3 relative) and put a floor of that order under ξ (the
    # default xi_thresh is 1e-3).
    z = z.to(torch.float64)
    return (
        torch.where(finite, (q.double() @ z).to(q.dtype), q),
        torch.where(finite, (u64 @ z).to(u.dtype), u),
    )


def truncate(
    q: torch.Tensor, u: torch.Tensor, truncation: str, eigh: Eigh | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-width ``(Q, U)`` whose first ``k`` columns are the rank-``k`` factors, for any k
    (``eigh``: see :func:`rayleigh_ritz`)."""
    if truncation == "qr":
        return q, u
    if truncation == "rayleigh_ritz":
        return rayleigh_ritz(q, u, eigh)
    raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")


def srsi(
    op: LinearOperator,
    rank: int,
    oversample: int = 5,
    iters: int = 5,
    generator: torch.Generator | None = None,
    orthonormalize: Orthonormalize = householder_orthonormalize,
    truncation: str = "qr",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1: a rank-``k`` approximation ``A ≈ Q Uᵀ`` of every matrix of ``op``.

    Args:
        op: the ``(B, m, n)`` :class:`~adapprox_kernels.linear_operator.LinearOperator`.
        rank: k (>= 1).
        oversample: p, extra sketch columns (the sketch is ``min(k + p, m, n)`` wide).
        iters: l, subspace iterations (>= 1).
        generator: draws the Gaussian sketch (default: torch's global RNG).
        orthonormalize: ``(B, m, r) -> (B, m, r)`` orthonormal basis (default Householder QR).
        truncation: ``"qr"`` (the first k QR columns, Algorithm 1) or ``"rayleigh_ritz"``
            (:func:`rayleigh_ritz`).

    Returns ``Q: (B, m, k')`` with orthonormal columns and ``U: (B, n, k')`` where
    ``k' = min(k, m, n)``.
    """
    _, m, n = op.shape
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    width = sketch_width(rank, oversample, m, n)
    q, u = subspace_iteration(op, gaussian_sketch(op, width, generator), iters, orthonormalize)
    q, u = truncate(q, u, truncation)
    k = min(rank, width)
    return q[..., :k], u[..., :k]


def error_ratio(op: LinearOperator, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """ξ = ‖A − Q Uᵀ‖_F / ‖A‖_F per matrix, ``(B,)``; ξ of an all-zero matrix is 0."""
    return ratio_from_sq_norms(op.sq_norm(), op.residual_sq_norm(q, u))


def ratio_from_sq_norms(total: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """ξ from ``‖A‖_F²`` and ``‖A − Q Uᵀ‖_F²`` (``(B,)`` each), however they were computed; NaN
    where either is not finite (a matrix whose squares overflow float32), 0 where ``A = 0``."""
    resid = resid.clamp_min(0)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    xi = torch.where(total > 0, (resid / safe_total).sqrt(), torch.zeros_like(total))
    return xi + (total + resid) * 0  # inf·0 and NaN·0 are NaN; both sums are >= 0


def column_mask(ranks: tuple[int, ...], width: int, device: torch.device) -> torch.Tensor:
    """``(B, 1, width)`` bool, true where column ``j < ranks[b]``.

    Built on the host and copied without waiting for the GPU. Cached: ranks change rarely.
    Traced by torch.compile without the cache (dynamo would warn that it ignores it)."""
    if torch.compiler.is_compiling():
        return _build_column_mask(ranks, width, device)
    key = (ranks, width, device)
    mask = _MASKS.get(key)
    if mask is None:
        mask = _MASKS.put(key, _build_column_mask(ranks, width, device))
    return handed_out(mask)


def _build_column_mask(ranks: tuple[int, ...], width: int, device: torch.device) -> torch.Tensor:
    # Made on the host whatever the default device (torch.set_default_device), then copied.
    columns, ranks_ = torch.arange(width, device="cpu"), torch.tensor(ranks, device="cpu")
    keep = (columns.unsqueeze(0) < ranks_.unsqueeze(1)).unsqueeze(1)
    return to_device_nowait(keep, device)


# A mask is B·width bytes, and while the ranks of a bucket move nearly every step adds one: a
# 1,024-entry LRU could hold 1,024 masks of a 512-matrix bucket at k_max = 256 (width 261 with
# the default oversampling), 130 MiB of device memory. A step uses about two masks per
# factored bucket.
_MASKS = ConstantCache(max_entries=1024, max_elements=16 << 20)


def truncate_columns(x: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """Zero the columns of ``x[b]`` beyond ``ranks[b]``: ``(B, d, r) -> (B, d, r)``.

    Zero columns add nothing to ``Q Uᵀ``, so a batch of matrices of different ranks shares one
    padded tensor."""
    return x * column_mask(tuple(ranks), x.shape[-1], x.device).to(x.dtype)


def as_rsi(
    op: LinearOperator,
    ranks: Sequence[int],
    *,
    k_min: int,
    k_max: int,
    xi_thresh: float,
    oversample: int = 5,
    iters: int = 5,
    generator: torch.Generator | None = None,
    sketch: torch.Tensor | None = None,
    orthonormalize: Orthonormalize = householder_orthonormalize,
    truncation: str = "qr",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Algorithm 2 on a batch, each matrix ``b`` at its own rank ``ranks[b]``.

    The batch shares one sketch width ``r = min(max(ranks) + p, m, n)``; a matrix of smaller
    rank simply gets more oversampling. ξ of matrix ``b`` is measured with its first
    ``ranks[b]`` columns. ``sketch`` (``(B, n, r)``) replaces the Gaussian start (warm start).
    ``k_min``, ``k_max``, ``xi_thresh``: the bounds and threshold of Algorithm 2's rule
    (:func:`~adapprox_kernels.rank_policy.next_rank_step`, Δk from ``min(k_max, m, n)``);
    ``oversample``, ``iters``, ``generator``, ``orthonormalize`` and ``truncation`` as for :func:`srsi`.

    Returns the full-width ``Q: (B, m, r)``, ``U: (B, n, r)``, ``ξ: (B,)`` and the proposed next
    ranks (before the rank moment), at most ``min(k_max, m, n)``, as the optimizer caps them.
    """
    b, m, n = op.shape
    if len(ranks) != b:
        raise ValueError(f"need one rank per matrix: {len(ranks)} ranks for a batch of {b}")
    width = sketch_width(max(ranks), oversample, m, n)
    if sketch is None:
        sketch = gaussian_sketch(op, width, generator)
    q, u = truncate(*subspace_iteration(op, sketch, iters, orthonormalize), truncation)
    used = [min(k, q.shape[-1]) for k in ranks]
    xi = error_ratio(op, truncate_columns(q, used), truncate_columns(u, used))
    xi_host = xi.tolist()
    cap = min(k_max, m, n)
    k_next = [next_rank_step(k, x, xi_thresh, min(k_min, cap), cap) for k, x in zip(used, xi_host, strict=True)]
    return q, u, xi, k_next
