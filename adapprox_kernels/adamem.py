"""AdaMeM (Vyas, Morwani, Kakade): low-rank momentum on top of one-sided Adafactor.

For a matrix parameter seen as ``(m, n)`` with ``m <= n`` (a taller-than-wide matrix is
transposed, a >2-D one folded to ``(shape[0], rest)`` first), with ``r = min(rank, m)``:

* every ``update_proj_gap`` steps, ``P`` (m×r, orthonormal) = the top-r left singular subspace
  of the gradient ``G`` (S-RSI with a Rayleigh–Ritz truncation, or an exact SVD);
* each step: ``R = Pᵀ G`` (r×n), residual ``S = G − P R``, momentum ``M = β1 M + (1−β1) R``;
  ``N1`` = Adafactor preconditioning of the (bias-corrected) momentum with a row (r) and column
  (n) second-moment statistic; ``N2 = S`` scaled per column by a one-sided Adafactor statistic
  (n); ``W ← W(1 − ηλ) − η (P N1 + δ N2)``.

State per matrix: ``P`` (m·r), ``exp_avg`` (r·n), ``row_sq`` (r), ``col_sq`` (n),
``resid_col_sq`` (n), in fp32 (fp64 for fp64 parameters), and ``param_shape``, the parameter's
own shape (a tuple, saved as an int64 tensor: a (30, 20) and a (20, 30) weight keep
alike-shaped tensors, so only it tells their states apart on load), and ``proj_pending``, true
while the matrix's last projection refresh found no gradient to take P from (see
``AdaMeM._matrix_step``). Vectors and scalars keep a dense second moment (plain Adafactor
without momentum: the one-sided rule on a 1×n matrix).
Same-shaped matrices of a param group go through the projection and the update in one batched
call. ``docs/adamem.md`` explains every choice the paper leaves open.

The functions below are the plain-PyTorch reference; the optimizer runs them directly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import EllipsisType
from typing import Any, Iterable

import torch

from .adapprox import matrix_shape
from .distributed import is_dtensor
from .linear_operator import DenseOperator
from .optim_base import SketchOptimizer, compute_dtype, keep_eager, to_host
from .options import POWER_ITERS_MAX, as_tuple, check_kinds, check_shared, is_int
from .reference import apply_updates, clipped_update, signed_clip_threshold
from .srsi import error_ratio, gaussian_sketch, rayleigh_ritz, sketch_width, subspace_iteration
from .state_report import StateReport, report_rows

PROJECTIONS = ("srsi", "svd")
MOMENTUM_TRANSFERS = ("keep", "rotate")
SECOND_MOMENT_SOURCES = ("momentum", "gradient")


# ------------------------------------------------------------------------------ reference ops
def top_left_subspace(
    g: torch.Tensor,
    rank: int,
    projection: str = "srsi",
    oversample: int = 5,
    iters: int = 5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Orthonormal basis ``(B, m, r)`` of the top-``rank`` left singular subspace of ``g: (B, m, n)``.

    ``"svd"``: exact. ``"srsi"``: S-RSI with ``rank + oversample`` columns, then Rayleigh–Ritz
    (:func:`~adapprox_kernels.srsi.rayleigh_ritz`, as Adapprox's ``truncation="rayleigh_ritz"``):
    the sketch's directions are ordered by singular value and the top ``rank`` kept. Taking
    the first ``rank`` QR columns instead would be a rank-``rank`` subspace iteration that
    ignores the oversampling.
    """
    if projection == "svd":
        return canonical_signs(torch.linalg.svd(g, full_matrices=False).U[..., :rank])
    op = DenseOperator(g)
    _, m, n = op.shape
    q, u = subspace_iteration(op, gaussian_sketch(op, sketch_width(rank, oversample, m, n), generator), iters)
    return canonical_signs(rayleigh_ritz(q, u)[0][..., :rank])


def canonical_signs(p: torch.Tensor) -> torch.Tensor:
    """Flip each column of ``p: (B, m, r)`` so that its largest-magnitude entry is positive.

    Singular vectors are defined up to sign, and SVD/QR implementations (CPU vs CUDA) choose
    differently; with ``momentum_transfer="keep"`` a flipped column would turn the kept
    momentum against the new gradient. A fixed convention makes P device-independent wherever
    G determines it: not where G's rank is below r, whose remaining columns complete the basis
    in whatever directions rounding chose (any completion is valid)."""
    idx = p.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(p.gather(1, idx))
    return p * torch.where(sign == 0, torch.ones_like(sign), sign)


def rotate_momentum(p_old: torch.Tensor, p_new: torch.Tensor, exp_avg: torch.Tensor, row_sq: torch.Tensor) -> None:
    """``momentum_transfer="rotate"``: express the momentum in the new basis, in place.

    ``M ← O M`` with ``O = P_newᵀ P_old`` (r×r), so ``P_new M`` is the projection of the old
    ``P_old M`` onto the new subspace (equal to it when the subspace did not move). The row
    statistic follows as the diagonal of ``O diag(row) Oᵀ``; the column statistic (a mean over
    the r rows) is kept. Shapes: ``P: (B, m, r)``, ``exp_avg: (B, r, n)``, ``row_sq: (B, r)``.
    """
    o = p_new.mT @ p_old
    exp_avg.copy_(o @ exp_avg)
    row_sq.copy_((o * o @ row_sq.unsqueeze(-1)).squeeze(-1))


def adafactor_precondition(
    x: torch.Tensor,
    stat: torch.Tensor,
    row_sq: torch.Tensor,
    col_sq: torch.Tensor,
    *,
    beta2: float,
    bias2: float,
    eps: float,
    clip_threshold: float,
) -> torch.Tensor:
    """Algorithm 3 on a batch: update the factored second moment of ``stat`` and precondition ``x``.

    ``row_sq (B, r) ← β2·row_sq + (1−β2)·mean_cols(stat²)``, ``col_sq (B, n)`` likewise over
    rows; ``V̂ = row_sq col_sqᵀ / mean(row_sq) / bias2`` (Adafactor's rank-1 estimate, with sums
    or means alike); returns ``x / (√V̂ + ε)`` clipped to RMS ≤ ``clip_threshold``: ``(B, r, n)``.
    """
    sq = stat.square()
    row_sq.mul_(beta2).add_(sq.mean(dim=2), alpha=1 - beta2)
    col_sq.mul_(beta2).add_(sq.mean(dim=1), alpha=1 - beta2)
    # An all-zero row statistic (zero gradients so far) gives V̂ = 0, not 0/0. With β2 near 1,
    # bias2 = 1 − β2^t is ~1e-12 early on and mean·bias2 can underflow (to 0 for zero
    # gradients): there the bias correction divides col_sq first.
    tiny = torch.finfo(row_sq.dtype).tiny
    mean = row_sq.mean(dim=1, keepdim=True).clamp_min(tiny)
    denom = mean * bias2
    scaled = torch.where(denom >= tiny, col_sq / denom, col_sq / bias2 / mean)
    v = row_sq.unsqueeze(2) * scaled.unsqueeze(1)
    return clipped_update(x, v, eps, clip_threshold)


def one_sided_precondition(
    s: torch.Tensor, col_sq: torch.Tensor, *, beta2: float, bias2: float, eps: float, clip_threshold: float
) -> torch.Tensor:
    """Algorithm 4 on a batch: ``col_sq (B, n) ← β2·col_sq + (1−β2)·mean_rows(s²)``; returns
    ``s / (√(col_sq/bias2) + ε)`` clipped: ``(B, m, n)``.

    Only a column statistic, so ``N2 = S D`` with ``D`` diagonal on the right: ``Pᵀ N2 = Pᵀ S D
    = 0`` keeps the residual step orthogonal to the subspace (Claim 3.1). A row statistic would
    scale on the left and break that.
    """
    col_sq.mul_(beta2).add_(s.square().mean(dim=1), alpha=1 - beta2)
    return clipped_update(s, (col_sq / bias2).unsqueeze(1), eps, clip_threshold)


# The rounding noise in R = PᵀG and S = G − P R of an exactly low-rank G, computed in its own
# precision (unit roundoff u): at most 30.6·u·‖G‖_F for S and 11.2·u·‖G‖_F for a row of R beyond
# G's rank, measured with S-RSI and SVD projections on fp32 and fp64 G from 16×64 to 2048×2048,
# ranks 1–8, flat and spread singular values (bench/results/adamem_noise_floors_cpu.json, rows
# `arithmetic_noise`). The floor keeps an 8.4× margin.
NOISE_FLOOR = 256.0
# A gradient that arrived in bf16 or fp16 was rounded to that dtype before the cast: an error E
# whose entries are independent and uniform within half the dtype's spacing at each entry. E
# sets the noise: about ‖E‖_F in S, and at most about ‖E‖_2 in a row of R beyond G's rank
# (:func:`gradient_rounding_noise` estimates both). Measured on exactly low-rank G from 2×3 to
# 768×2048 (bench/adamem_noise_floors.py, bench/results/adamem_noise_floors_cpu.json): S at most
# 0.98 of its estimate, such rows at most 1.00 of theirs. Roundings that repeat (G with many
# equal rows) are not independent: rows up to 2.26, above the floor. The margin is thin on
# purpose: rows of R near the noise are mostly real on decaying spectra, and each one dropped
# loses an O(1) part of the step (docs/adamem.md).
GRADIENT_NOISE_MARGIN = 1.25
# The grids an fp32 gradient's values may lie on, coarsest first: the fp32 mantissa bits that
# each leaves zero.
_GRIDS = ((torch.bfloat16, 0xFFFF), (torch.float16, 0x1FFF))


def unit_roundoff(dtype: torch.dtype) -> float:
    """The largest relative error of rounding to nearest in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def _smallest_binade(dtype: torch.dtype) -> float:
    """The spacing-defining binade below which ``dtype``'s numbers are evenly spaced (its
    subnormals'), and at least 2^-63, whose square is still an fp32 normal number (bf16's
    2^-126 squares to 0: entries below 1e-19 count as 2^-63)."""
    return max(torch.finfo(dtype).smallest_normal, 2.0**-63)


def _rounding_grid(g: torch.Tensor, grad_dtype: torch.dtype | None) -> tuple[torch.Tensor | float, float]:
    """``(eps, smallest binade)`` of the dtype that ``g: (B, m, n)`` (fp32) was rounded to:
    ``grad_dtype`` where it is bf16 or fp16; else, per matrix ``(B, 1, 1)``, bf16's or fp16's
    where every entry of 16-odd rows lies on that grid (zeros aside, a real fp32 gradient does
    with chance 2^-16 per entry for bf16's, 2^-13 for fp16's; under autocast an fp32 weight's
    gradient is a bf16 product cast up), and eps 0 where none does, or where the rows sampled
    are all zero. A detected grid keeps fp32's smallest binade: GradScaler's unscaling moves
    fp16's underflow down by its scale, which the bits do not tell."""
    for dtype, _ in _GRIDS:
        if grad_dtype == dtype:
            return torch.finfo(dtype).eps, _smallest_binade(dtype)
    eps = torch.zeros_like(g[:, :1, :1])
    bits = g[:, :: max(1, g.shape[1] // 16)].view(torch.int32).flatten(1)
    low, seen = bits & 0xFFFF, (bits & 0x7FFFFFFF).amax(dim=1) != 0
    for dtype, mask in reversed(_GRIDS):  # the coarsest last, so it wins where both hold
        on = (((low if mask == 0xFFFF else low & mask).amax(dim=1) == 0) & seen).view(-1, 1, 1)
        eps = torch.where(on, torch.finfo(dtype).eps, eps)
    return eps, _smallest_binade(torch.float32)


def gradient_rounding_noise(
    g: torch.Tensor, grad_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimates of ``(‖E‖_2, ‖E‖_F)``, each ``(B,)``, for the error E of the rounding that
    ``g: (B, m, n)`` (fp32) went through once (see :func:`_rounding_grid`; 0 where none is
    seen): each entry's error has variance ``spacing²/12``, the spacing of the rounding dtype's
    numbers there (at a zero, its subnormals': it may be an underflow), and ``‖E‖_2`` ≲
    largest row + largest column norm of E (Bandeira–van Handel)."""
    if g.dtype != torch.float32:
        raise ValueError(f"gradient_rounding_noise reads fp32 bits; got {g.dtype}")
    eps, tiny = _rounding_grid(g, grad_dtype)
    # 2^⌊log2|g|⌋ from g's exponent bits, where the spacing is eps·2^⌊log2|g|⌋ (frexp was slower
    # on the CPU).
    binade = (g.view(torch.int32) & 0x7F800000).view(torch.float32)
    var = binade.clamp_min_(tiny).square_()
    row_var, col_var = var.sum(dim=2), var.sum(dim=1)  # times (eps²/12); a norm over dim 1 was slower
    scale = (eps if isinstance(eps, float) else eps.view(-1)) / math.sqrt(12)
    return scale * (row_var.amax(dim=1).sqrt() + col_var.amax(dim=1).sqrt()), scale * row_var.sum(dim=1).sqrt()


def noise_floors(g: torch.Tensor, grad_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row floor, residual floor)``, each ``(B,)``: the norms at or below which a row of
    ``R = PᵀG``, and ``S`` as a whole, are rounding noise (see :func:`split_gradient`).

    ``g: (B, m, n)`` in the compute dtype; ``grad_dtype``: the dtype the gradients arrived in.
    An fp32 ``g``'s own earlier rounding to bf16 or fp16 counts too (:func:`_rounding_grid`)."""
    row_floor = resid_floor = NOISE_FLOOR * unit_roundoff(g.dtype) * torch.linalg.vector_norm(g, dim=(1, 2))
    if g.dtype == torch.float32:
        spectral, frobenius = gradient_rounding_noise(g, grad_dtype)
        row_floor = torch.maximum(row_floor, GRADIENT_NOISE_MARGIN * spectral)
        resid_floor = torch.maximum(resid_floor, GRADIENT_NOISE_MARGIN * frobenius)
    return row_floor, resid_floor


def split_gradient(
    g: torch.Tensor, proj: torch.Tensor, floors: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``R = Pᵀ G`` ``(B, r, n)`` and ``S = G − P R`` ``(B, m, n)``, with the parts that are
    rounding noise set to exactly zero: the rows of R, and S as a whole, whose norm is at most
    ``floors`` (default: :func:`noise_floors` of ``g`` alone); S always when ``r = m``.

    Adafactor scales each row of R and one-sided Adafactor each column of S to an O(1) step
    whatever its size, so an exactly low-rank G (a small-batch fine-tune: rank ≤ tokens per
    batch, below r) would otherwise step along pure rounding noise, larger than its real step
    and even uphill: with no floor, fp32's cos(step, G) ranged from −0.53 to 0.59 where fp64's
    was 0.77–0.90 (rows ``unfloored``); a bf16 gradient with fp32's floor alone stepped with cos
    0.09–0.14 to the exact gradient's step (rows ``cosine``, low-rank cases; both in
    bench/results/adamem_noise_floors_cpu.json). A real part at or below the floor is dropped
    with the noise."""
    m, r = proj.shape[-2:]
    row_floor, resid_floor = noise_floors(g) if floors is None else floors
    r_proj = proj.mT @ g
    if r == m:
        resid = torch.zeros_like(g)
    else:
        resid = g - proj @ r_proj
        resid = resid * (torch.linalg.vector_norm(resid, dim=(1, 2)) > resid_floor).view(-1, 1, 1).to(g.dtype)
    r_proj = r_proj * (torch.linalg.vector_norm(r_proj, dim=2) > row_floor.unsqueeze(1)).unsqueeze(2).to(g.dtype)
    return r_proj, resid


def adamem_directions(
    g: torch.Tensor,
    proj: torch.Tensor,
    exp_avg: torch.Tensor,
    row_sq: torch.Tensor,
    col_sq: torch.Tensor,
    resid_col_sq: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    step: int,
    eps: float,
    clip_threshold: float | None = None,
    second_moment: str = "momentum",
    bias_correction: bool = True,
    floors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lines 6–10 of Algorithm 1 for a batch with a given projection; updates the state in place.

    ``g: (B, m, n)`` with ``m <= n``, ``proj: (B, m, r)`` orthonormal, ``exp_avg: (B, r, n)``,
    ``row_sq: (B, r)``, ``col_sq, resid_col_sq: (B, n)``. Returns the two descent directions
    ``(P N1, N2)``, each ``(B, m, n)``; the step is ``−η (P N1 + δ N2)``; see :func:`split_gradient`
    for R and S and ``floors``.
    """
    clip = signed_clip_threshold(clip_threshold)
    bias1 = 1 - beta1**step if bias_correction else 1.0
    bias2 = 1 - beta2**step if bias_correction else 1.0
    r_proj, resid = split_gradient(g, proj, floors)
    exp_avg.mul_(beta1).add_(r_proj, alpha=1 - beta1)
    m_hat = exp_avg / bias1
    stat = m_hat if second_moment == "momentum" else r_proj
    n1 = adafactor_precondition(m_hat, stat, row_sq, col_sq, beta2=beta2, bias2=bias2, eps=eps, clip_threshold=clip)
    n2 = one_sided_precondition(resid, resid_col_sq, beta2=beta2, bias2=bias2, eps=eps, clip_threshold=clip)
    return proj @ n1, n2


def _shape_tuple(shape: Any) -> Any:
    """A saved ``param_shape`` as the tuple of ints the live state keeps: state dicts hold it as
    a 1-D int64 tensor (torch's ``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)``
    takes tensors, ints, floats and dicts only), older ones as a tuple. Anything else as it is,
    for the load's check to name."""
    if torch.is_tensor(shape) and shape.dim() == 1 and not shape.is_floating_point():
        return tuple(int(x) for x in shape.tolist())
    if isinstance(shape, (tuple, list)) and all(map(is_int, shape)):
        return tuple(int(x) for x in shape)
    return shape


def _fill_legacy_entries(p: torch.Tensor, state: dict[str, Any]) -> None:
    """A matrix state of a version that did not record ``param_shape`` or ``proj_pending`` takes
    ``p``'s shape and no pending refresh (what that version did), so that the step finds both and
    the next checkpoint has them; a saved ``param_shape`` becomes the live tuple again."""
    if "P" in state:
        state["param_shape"] = _shape_tuple(state.get("param_shape", tuple(p.shape)))
        state.setdefault("proj_pending", False)


def _oriented_shape(p: torch.Tensor) -> tuple[tuple[int, int], bool]:
    """``((m', n'), transposed)``: the matrix view with ``m' <= n'``; vectors are ``1×numel``."""
    shape = matrix_shape(p)
    if shape is None:
        return (1, p.numel()), False
    m, n = shape
    return ((n, m), True) if m > n else ((m, n), False)


# ------------------------------------------------------------------------------- optimizer
class AdaMeM(SketchOptimizer):
    """Adafactor with momentum kept only in the top-r gradient subspace (AdaMeM).

    Args:
        params: parameters or param groups (``named_parameters()`` is accepted too); a group may
            set any option below, and its values are checked as the constructor's are.
        lr: learning rate η: a number, or a one-element floating tensor (filled in place by a scheduler).
        betas: ``(β1, β2)``: momentum of the projected gradient; decay of every second-moment
            statistic.
        rank: r, the momentum rank (capped at ``min(m, n)`` per matrix).
        update_proj_gap: T, the projection is recomputed on steps 1, T+1, 2T+1, …
        residual_scale: δ, weight of the residual (momentum-free) direction.
        eps: ε added to ``√V̂`` (Adam's placement); at least float32's smallest normal, ~1.2e-38
            (a zero residual divides by it).
        weight_decay: λ, decoupled: ``W ← W(1 − ηλ) − η·update``.
        projection: ``"srsi"`` (randomized, the package's S-RSI + Rayleigh–Ritz) or ``"svd"``
            (exact, as in the paper).
        oversample, power_iters: p and l of S-RSI (l at most 1000).
        momentum_transfer: on a projection change, ``"keep"`` the momentum as it is (the paper,
            as GaLore) or ``"rotate"`` it into the new basis (see :func:`rotate_momentum`).
        second_moment: the Adafactor statistics of the low-rank part are taken of the
            ``"momentum"`` (the paper's Algorithm 3) or of the projected ``"gradient"``
            (Adam-style, as GaLore's Adafactor).
        bias_correction: Adam's bias corrections ``1 − β^t`` of the momentum and the statistics.
        clip_threshold: ``None`` (the paper) or d: each direction is scaled to RMS ≤ d.
        maximize: step up the gradient, as torch.optim's ``maximize``: the step on ``−G``.
        bf16_stochastic_round: write bfloat16 weights rounded at random (unbiased), as
            :class:`~adapprox_kernels.Adapprox` does.
        nonfinite: ``"raise"`` (a ``FloatingPointError`` naming the parameter, before anything is
            modified) or ``"skip"`` (that parameter's step is skipped, its state untouched and
            ``state["nonfinite_skips"]`` counts it).
        seed: seed of the optimizer's own sketch RNG (default: drawn from torch's global RNG).

    DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism) raise
    ``NotImplementedError``: the projection and the update need whole matrices. Under DDP
    AdaMeM runs unchanged; Adapprox steps FSDP2's row shards.
    """

    # _matrix_step eager even inside torch.compile(opt.step): with two matrix shapes in a group,
    # dynamo's resume function after the projection's graph break stepped the second bucket
    # with a wrong update (silently, where the shapes have one size; torch 2.14.1).
    _EAGER_UNDER_COMPILE = (*SketchOptimizer._EAGER_UNDER_COMPILE, "_matrix_step")

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        rank: int = 128,
        update_proj_gap: int = 200,
        residual_scale: float = 1.0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        projection: str = "srsi",
        oversample: int = 5,
        power_iters: int = 5,
        momentum_transfer: str = "keep",
        second_moment: str = "momentum",
        bias_correction: bool = True,
        clip_threshold: float | None = None,
        nonfinite: str = "raise",
        seed: int | None = None,
        maximize: bool = False,
        bf16_stochastic_round: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=as_tuple(betas), rank=rank, update_proj_gap=update_proj_gap, residual_scale=residual_scale,
            eps=eps, weight_decay=weight_decay, projection=projection, oversample=oversample,
            power_iters=power_iters, momentum_transfer=momentum_transfer, second_moment=second_moment,
            bias_correction=bias_correction, clip_threshold=clip_threshold, nonfinite=nonfinite, maximize=maximize,
            bf16_stochastic_round=bf16_stochastic_round,
        )  # fmt: skip
        super().__init__(params, defaults, seed)  # checks every group's values: _check_hyperparameters
        self._reset_step_caches()

    def _check_params(self, params: list[torch.Tensor]) -> None:
        """Refuses DTensor parameters (the constructor's groups arrive through ``add_param_group`` too)."""
        if any(map(is_dtensor, params)):
            raise NotImplementedError(
                "AdaMeM does not support DTensor parameters (FSDP2's fully_shard, tensor parallelism): its "
                "projection and update need whole matrices. Use DDP, or Adapprox, which steps FSDP2's row shards."
            )

    @staticmethod
    def _check_hyperparameters(h: dict[str, Any]) -> None:
        check_shared(h, betas=2)  # clip_threshold too
        check_kinds(
            h,
            ints={"rank": 1, "update_proj_gap": 1, "oversample": 0, "power_iters": (1, POWER_ITERS_MAX)},
            reals=("residual_scale", "weight_decay"),
            flags=("bias_correction", "maximize", "bf16_stochastic_round"),
            choices={
                "projection": PROJECTIONS, "momentum_transfer": MOMENTUM_TRANSFERS,
                "second_moment": SECOND_MOMENT_SOURCES,
            },
        )  # fmt: skip

    def _gradient_limit(self, p: torch.Tensor) -> float:
        """``√(max/numel)`` of the compute dtype: below it, every sum of squares of the gradient
        (‖G‖_F², S-RSI's products, the statistics) stays finite; above it, the step would write
        NaN (entries of ~1e17 on a 64×256 matrix), so the non-finite policy takes such a
        gradient: raised before anything changes, or skipped."""
        dtype = compute_dtype(p)
        return math.sqrt(torch.finfo(dtype).max / max(p.numel(), 1))

    def _reset_step_caches(self) -> None:
        # (states, ξ, found a subspace) of the buckets that refreshed their projection this
        # step, read once in _end_step.
        self._xi_pending: list[tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor]] = []
        keep_eager(type(self), self._EAGER_UNDER_COMPILE)

    # ---------------------------------------------------------------------------------- state
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if state:
            return state
        try:
            dtype = compute_dtype(p)
            kw = dict(dtype=dtype, device=p.device)
            state["step"] = 0
            state["nonfinite_skips"] = 0
            if matrix_shape(p) is None:
                state["exp_avg_sq"] = torch.zeros(p.numel(), **kw)
                return state
            (m, n), _ = _oriented_shape(p)
            r = min(group["rank"], m)
            state["param_shape"] = tuple(p.shape)  # the orientation, which no tensor's shape shows
            state["rank"] = r
            state["xi"] = float("nan")  # ‖S‖/‖G‖ on the last projection step
            state["proj_pending"] = False  # P is refreshed on this matrix's next step, not on schedule
            state["P"] = torch.zeros(m, r, **kw)  # replaced on the first step
            state["exp_avg"] = torch.zeros(r, n, **kw)
            state["row_sq"] = torch.zeros(r, **kw)
            state["col_sq"] = torch.zeros(n, **kw)
            state["resid_col_sq"] = torch.zeros(n, **kw)
            return state
        except BaseException:
            # Out of memory (or Ctrl-C) halfway: a half-made state would fail every later step
            # and every load of a checkpoint saved now; an empty one is made anew.
            state.clear()
            raise

    def _saved_shapes(self, p: torch.Tensor, state: dict[str, Any]) -> dict[str, tuple[int, ...] | EllipsisType | None]:
        if matrix_shape(p) is None:
            return {"step": None, "exp_avg_sq": (p.numel(),)}
        (m, n), _ = _oriented_shape(p)
        if torch.is_tensor(state.get("P")) and state["P"].dim():  # a 0-d one has no width: the rank says it
            r = state["P"].shape[-1]
        elif isinstance(state.get("rank"), int):
            r = min(state["rank"], m)
        else:  # another optimizer's state (AdamW's): no rank to check the shapes against
            return {"step": None, "rank": None, **dict.fromkeys(("P", "exp_avg", "row_sq"), ...), "col_sq": (n,),
                    "resid_col_sq": (n,)}  # fmt: skip
        return {
            "step": None, "rank": None, "P": (m, r), "exp_avg": (r, n), "row_sq": (r,), "col_sq": (n,),
            "resid_col_sq": (n,),
        }  # fmt: skip

    def _saved_mismatches(self, p: torch.Tensor, state: dict[str, Any]) -> list[str]:
        """The saved ``rank`` (an int >= 1), ``param_shape`` and ``proj_pending`` (a bool), where
        there are (older checkpoints have neither of the last two): the state of a (30, 20)
        weight has the shapes of a (20, 30) one's, both oriented to 20×30, and would train in
        the wrong basis."""
        problems = []
        saved = _shape_tuple(state.get("param_shape"))
        if saved is not None and (type(saved) is not tuple or saved != tuple(p.shape)):
            problems.append(f"it was saved for a parameter of shape {saved}")
        rank = state.get("rank")
        if not torch.is_tensor(rank) and "rank" in state and not (is_int(rank) and rank >= 1):
            problems.append(f"'rank' is {rank!r}, not an int >= 1")
        pending = state.get("proj_pending", False)
        if not isinstance(pending, bool):
            problems.append(f"'proj_pending' is a {type(pending).__name__}, not a bool")
        return problems

    def _draws_sketches(self, groups: list[dict[str, Any]]) -> bool:
        # The saved groups replace ours; one saved before the option existed takes the default.
        return any(group.get("projection", self.defaults["projection"]) != "svd" for group in groups)

    def _export_state(self, saved: dict[Any, dict[str, Any]]) -> None:
        """``param_shape`` as a 1-D int64 tensor (see :func:`_shape_tuple`)."""
        for key, state in saved.items():
            if isinstance(state.get("param_shape"), tuple):
                saved[key] = {**state, "param_shape": torch.tensor(state["param_shape"], dtype=torch.int64)}

    def _complete_loaded_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """A matrix state saved without ``param_shape`` or ``proj_pending`` (by a version that did
        not record them) takes this parameter's shape and no pending refresh, so that the run's
        next checkpoint has both; a saved ``param_shape`` tensor becomes the live tuple."""
        _fill_legacy_entries(p, state)

    # ----------------------------------------------------------------------------------- step
    def _check_states(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        """Every step, so a quick test first, the full check (:meth:`_check_state_fits`) only where
        it fails: a matrix's state names its shape, a vector's holds its size."""
        for _, params in groups:
            self._check_no_aliases(params)  # maps over the data pointers, no Python loop
            for p in params:
                state = self.state.get(p)
                if not state:
                    continue
                if "P" in state:
                    shape = state.get("param_shape")
                    if shape is not None and type(shape) is not tuple:  # a saved tensor written in directly (ZeRO)
                        shape = state["param_shape"] = _shape_tuple(shape)
                    fits = type(shape) is tuple and shape == tuple(p.shape) and "proj_pending" in state
                    held = state["P"]
                else:
                    held = state["exp_avg_sq"]
                    fits = matrix_shape(p) is None and held.shape == (p.numel(),)
                # The parameter's dtype changed since (model.double()): the state's with it.
                fits = fits and getattr(held, "dtype", None) == compute_dtype(p)
                if not fits:
                    self._check_state_fits(p, state)
                    # A state of an older version that did not come through load_state_dict
                    # (ZeroRedundancyOptimizer sets its optimizer's state directly; an unpickled
                    # optimizer): the step reads proj_pending (KeyError).
                    _fill_legacy_entries(p, state)
                    self._match_state_dtypes(p, state)

    def _run_ahead(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> list:
        """Nothing runs ahead; forgets the refresh outcomes of a step that failed midway, which
        that step never stored: the next step's ``_end_step`` would apply them (its ξ, and a
        pending refresh cancelled or set)."""
        self._xi_pending.clear()
        return []

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        # One batched call per (kind, shape, rank, step count, refresh, dtype, device): the
        # members share the bias corrections (step counts differ after a skipped non-finite
        # step) and whether P is recomputed (on schedule, or pending from a step without a
        # gradient to take it from). The parameter's own shape, not its matrix view: (16, 8)
        # and (16, 8, 1) fold alike but are written back each in its own shape. The gradient's
        # dtype too (a parameter's grad_dtype may differ from its dtype): the noise floors take
        # the rounding of the dtype the gradients arrived in, one per bucket.
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            state = self.state[p] or self._init_state(p, group)
            state["step"] += 1
            lowrank = "P" in state
            refresh = lowrank and _refresh_due(state["step"], group["update_proj_gap"], state["proj_pending"])
            key = (lowrank, tuple(p.shape), state.get("rank"), state["step"], refresh, p.dtype, p.grad.dtype, p.device)
            buckets[key].append(p)
        for (lowrank, _, _, step, refresh, *_), bucket in buckets.items():
            if lowrank:
                self._matrix_step(group, bucket, step, refresh)
            else:
                self._vector_step(group, bucket, step)

    def _apply(self, group: dict[str, Any], bucket: list[torch.Tensor], upd: torch.Tensor) -> None:
        """``W ← W(1 − ηλ) − η·upd``; ``upd: (B, …)`` holds each parameter's numel."""
        states = [self.state[p] for p in bucket]
        apply_updates(
            bucket, upd, None, lr=self._lr(group), beta1=0.0, weight_decay=group["weight_decay"], cosine_max_scale=None,
            rounding_keys=self._rounding_keys(group, bucket, states),
            scalars=self._traced_scalars(group, upd.device, momentum=False),
        )  # fmt: skip

    def _vector_step(self, group: dict[str, Any], bucket: list[torch.Tensor], step: int) -> None:
        """Dense Adafactor without momentum: the one-sided rule on a ``1×numel`` view (no δ:
        there is no momentum part to weigh it against)."""
        # The gradients first: read through the parameters as keys of self.state, dynamo would
        # guard each gradient by identity and compile this anew for every step's new gradients.
        grads = [p.grad for p in bucket]
        states = [self.state[p] for p in bucket]
        v = torch.stack([s["exp_avg_sq"] for s in states])
        g = _signed(torch.stack([grad.reshape(1, -1).to(v.dtype) for grad in grads]), group)
        beta2 = group["betas"][1]
        upd = one_sided_precondition(
            g, v, beta2=beta2, bias2=1 - beta2**step if group["bias_correction"] else 1.0, eps=group["eps"],
            clip_threshold=signed_clip_threshold(group["clip_threshold"]),
        )  # fmt: skip
        for s, new in zip(states, v, strict=True):
            s["exp_avg_sq"].copy_(new)
        self._apply(group, bucket, upd)

    def _matrix_step(self, group: dict[str, Any], bucket: list[torch.Tensor], step: int, refresh: bool) -> None:
        """One step of a bucket of matrices; ``refresh``: recompute P first.

        A matrix whose gradient has no row of ``P_newᵀ G`` above the noise floor (all zero:
        LoRA's A on its first step, B being 0) has no subspace to take, and ``P_new`` would be
        an arbitrary basis kept for T steps: it keeps its P and momentum, and ``_end_step``
        marks its refresh pending, so its next step recomputes P (then after 2, 4, 8, … steps
        into the period while it stays pending: :func:`_refresh_due`)."""
        states = [self.state[p] for p in bucket]
        _, transposed = _oriented_shape(bucket[0])
        keys = ("P", "exp_avg", "row_sq", "col_sq", "resid_col_sq")
        proj, exp_avg, row_sq, col_sq, resid_col_sq = (torch.stack([s[k] for s in states]) for k in keys)
        g = _signed(torch.stack([p.grad.reshape(matrix_shape(p)).to(proj.dtype) for p in bucket]), group)
        if transposed:
            g = g.mT
        # The gradients' own rounding (bf16, fp16) counts in the floors.
        floors = noise_floors(g, bucket[0].grad.dtype)

        if refresh:
            p_new = top_left_subspace(
                g, proj.shape[-1], group["projection"], group["oversample"], group["power_iters"],
                self._generator(g.device),
            )  # fmt: skip
            found = (torch.linalg.vector_norm(p_new.mT @ g, dim=2) > floors[0].unsqueeze(1)).any(dim=1)
            if group["momentum_transfer"] == "rotate":
                rotated = exp_avg.clone(), row_sq.clone()
                rotate_momentum(proj, p_new, *rotated)
                exp_avg = torch.where(found.view(-1, 1, 1), rotated[0], exp_avg)
                row_sq = torch.where(found.view(-1, 1), rotated[1], row_sq)
            proj = torch.where(found.view(-1, 1, 1), p_new, proj)
            self._xi_pending.append((states, error_ratio(DenseOperator(g), proj, (proj.mT @ g).mT), found))

        beta1, beta2 = group["betas"]
        low, resid = adamem_directions(
            g, proj, exp_avg, row_sq, col_sq, resid_col_sq, beta1=beta1, beta2=beta2, step=step, eps=group["eps"],
            clip_threshold=group["clip_threshold"], second_moment=group["second_moment"],
            bias_correction=group["bias_correction"], floors=floors,
        )  # fmt: skip
        for b, s in enumerate(states):
            for k, full in zip(keys, (proj, exp_avg, row_sq, col_sq, resid_col_sq), strict=True):
                s[k].copy_(full[b])
        upd = low.add_(resid, alpha=group["residual_scale"])
        self._apply(group, bucket, upd.mT if transposed else upd)

    def _end_step(self) -> None:
        """Every ξ and refresh outcome of the step from one host read per device (not one per
        bucket): a matrix whose refresh found no gradient keeps its ξ and is marked pending."""
        pending = self._xi_pending[:]  # not an attribute set: see BucketMixin._reset_step_caches
        self._xi_pending.clear()
        values = to_host([t for _, xi, found in pending for t in (xi, found)])
        for (states, _, _), xis, founds in zip(pending, values[::2], values[1::2], strict=True):
            for s, xi, found in zip(states, xis, founds, strict=True):
                s["proj_pending"] = not found
                if found:
                    s["xi"] = xi

    # -------------------------------------------------------------------------- observability
    def state_report(self) -> StateReport:
        """Per parameter: kind (``lowrank`` / ``dense``), rank, last ξ = ‖S‖/‖G‖ and state bytes,
        with totals next to AdamW's."""
        return StateReport(report_rows(self))


def _refresh_due(step: int, gap: int, pending: bool) -> bool:
    """Is P recomputed on this step? On schedule (steps 1, T+1, 2T+1, …), and while a refresh
    is pending (the last one found no gradient to take P from), 1, 2, 4, 8, … steps into the
    period: a gradient that stays zero (a module unused for a while) costs about log2(T)
    projections and host reads a period, not one a step, and one that comes back c steps into
    the period is taken up within c more steps (or at the next scheduled refresh)."""
    since = (step - 1) % gap
    return since == 0 or (pending and since & (since - 1) == 0)


def _signed(g: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """The stacked gradients ``g`` (a fresh tensor), negated in place for ``maximize``."""
    return g.neg_() if group["maximize"] else g
