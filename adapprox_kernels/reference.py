"""Plain-PyTorch reference of one Adapprox step on a batch of same-shaped matrices.

This is the oracle that every fast path is tested against, and the CPU path of the optimizer.
It materializes the second moment V as a ``(B, m, n)`` fp32 tensor (float64 for float64
parameters), which the fused kernels never do.

Shapes: ``B`` matrices of shape ``(m, n)``; previous factors ``Q: (B, m, K)``, ``U: (B, n, K)``
zero-padded to a common ``K`` (zero columns add nothing to ``Q Uᵀ``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .linear_operator import DenseOperator

# Sums a tensor over the ranks that hold the other rows of the same matrices (row-sharded
# parameters, see adapprox_kernels.distributed); None when each matrix is whole here.
Reduce = Callable[[torch.Tensor], torch.Tensor]

_TF32_LOW_BITS = (1 << 13) - 1  # of fp32's 23 mantissa bits, tf32 keeps the top 10


def tf32_rounded(x: torch.Tensor, rounding: str = "nearest") -> torch.Tensor:
    """fp32 ``x`` cut to tf32's 10 mantissa bits, still fp32: ``"nearest"`` (ties to even; what
    ``precision="tf32_rn"`` feeds the tensor cores) or ``"trunc"`` (what tensor cores do to fp32
    operands). Inf and NaN stay as they are."""
    if rounding not in ("nearest", "trunc"):
        raise ValueError(f"rounding must be 'nearest' or 'trunc', got {rounding!r}")
    bits = x.float().contiguous().view(torch.int32)
    if rounding == "nearest":
        bits = bits + (_TF32_LOW_BITS >> 1) + ((bits >> 13) & 1)
    out = (bits & ~_TF32_LOW_BITS).view(torch.float32)
    return torch.where(x.isfinite(), out, x.float())


def second_moment(grad: torch.Tensor, q: torch.Tensor, u: torch.Tensor, beta2: float) -> torch.Tensor:
    """``V_t = β2·relu(Q Uᵀ) + (1−β2)·G²`` (Algorithm 3, line 341): ``(B, m, n)``."""
    return torch.bmm(q, u.transpose(1, 2)).clamp_min_(0).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def clipped_update(
    grad: torch.Tensor, v: torch.Tensor, eps: float, clip_threshold: float, reduce: Reduce | None = None
) -> torch.Tensor:
    """``Upd = G / (√V + ε)`` scaled by ``1 / max(1, RMS(Upd)/d)`` per matrix (lines 344–345),
    negated where ``clip_threshold`` is (``maximize``: see :func:`clip_divisor`).

    ``grad`` and ``v`` are ``(B, *shape)``; RMS is taken over each matrix. With ``reduce``, they
    are this rank's rows and the sum of squares and the size are summed over the ranks."""
    # In place on fresh temporaries: the same arithmetic in fewer allocations.
    upd = grad / v.sqrt().add_(eps)
    rows = _rows(upd)
    sq_sum, numel = rows.square().sum(dim=1), rows.shape[1]
    if reduce is not None:
        sq_sum, numel = reduce(torch.stack([sq_sum, torch.full_like(sq_sum, numel)]))
    return upd.div_(_per_matrix(clip_divisor(sq_sum, numel, clip_threshold), upd))


def signed_clip_threshold(clip_threshold: float | None, maximize: bool = False) -> float:
    """The threshold :func:`clipped_update` and :func:`clip_divisor` take: ``None`` (no
    clipping) as ∞, negated for ``maximize`` (the divisor then carries the sign)."""
    threshold = math.inf if clip_threshold is None else clip_threshold
    return -threshold if maximize else threshold


def clip_divisor(sq_sum: torch.Tensor, numel: int | torch.Tensor, clip_threshold: float) -> torch.Tensor:
    """``max(1, RMS/d)`` per matrix from ``Σ Upd²`` (``(B,)``) over ``numel`` entries, with
    ``d = |clip_threshold|``; negated where the threshold is negative (``maximize``): dividing
    by it negates the update, which is then exactly the update of −G (the RMS, V and ξ do not
    depend on G's sign), at no cost in any pass. At most the dtype's largest finite value: a
    threshold near float32's smallest normal must clip the update to ~0, not overflow, since
    the Triton kernels read an inf or NaN divisor as a bad gradient (they then write nothing,
    not even the decay). NaN stays NaN."""
    rms = (sq_sum / numel).sqrt_()
    if math.isinf(clip_threshold):  # no clipping: 1 (NaN where the sum is), not inf/inf = NaN where it overflowed
        divisor = torch.where(rms.isnan(), rms, 1.0)
    else:
        divisor = rms.div_(abs(clip_threshold)).clamp_(1.0, torch.finfo(sq_sum.dtype).max)
    return divisor.neg_() if clip_threshold < 0 else divisor


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, numel)`` view of ``x: (B, *shape)``; ``(B, 1)`` for a stack of scalars, which
    ``flatten(1)`` refuses."""
    return x.reshape(x.shape[0], -1)


def _per_matrix(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(B,)`` tensor to broadcast against ``like: (B, ...)``."""
    return x.view(-1, *([1] * (like.dim() - 1)))


def cosine_guidance_factor(
    upd: torch.Tensor, avg: torch.Tensor, max_scale: float, reduce: Reduce | None = None
) -> torch.Tensor:
    """Step scale from the cosine similarity c of this update and the running average of
    updates, per matrix: ``1 / max(1 − c, 1/max_scale)``; ``(B, 1, …, 1)``.

    The arXiv paper scales by about ``(1 − c + ε)⁻¹`` (its exact formula was lost); ours is
    bounded so a step is never scaled by more than ``max_scale`` (c → 1); ``1 − c <= 2``
    bounds it below by 0.5 (c = −1). ``reduce``: as in :func:`clipped_update` (c of the whole matrix)."""
    a, b = _rows(upd), _rows(avg)
    if reduce is None:
        return _per_matrix(cosine_scale((a * b).sum(dim=1), a.norm(dim=1), b.norm(dim=1), max_scale), upd)
    dot, a_sq, b_sq = reduce(torch.stack([(a * b).sum(dim=1), a.square().sum(dim=1), b.square().sum(dim=1)]))
    return _per_matrix(cosine_scale(dot, a_sq.sqrt(), b_sq.sqrt(), max_scale), upd)


def cosine_scale(dot: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor, max_scale: float) -> torch.Tensor:
    """The factor of :func:`cosine_guidance_factor` from ``⟨a, b⟩``, ``‖a‖``, ``‖b‖`` (``(B,)``)."""
    norms = norm_a * norm_b
    c = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(dot))
    # At most max_scale also where 1/max_scale is subnormal (max_scale near float32's largest),
    # whose reciprocal rounds to inf.
    return (1.0 / (1.0 - c).clamp_min(1.0 / max_scale)).clamp_max_(max_scale)


def stack_as(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``torch.stack([t.to(dtype) for t in tensors])`` with one conversion instead of one call
    per tensor: stacking promotes mixed floating dtypes to one that holds each exactly."""
    return torch.stack(tensors).to(dtype)


# Elements per tensor from which, on the CPU, a foreach op's loop over the tensors costs less
# than the stacked way's two extra passes (the stack and the copy back): quicker for the main
# job's 128-wide matrices, slower for its bucket of 26 vectors of 128.
_CPU_IN_PLACE_NUMEL = 4096


def in_place_ok(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> bool:
    """Update ``tensors`` (one bucket: same shape) by foreach ops in place rather than through a
    stacked copy written back? Only tensors already in the compute ``dtype`` (a bf16 or fp16 one
    must be rounded once, from fp32), on CUDA, where a foreach op is a few fused launches, or on
    the CPU where each holds at least ``_CPU_IN_PLACE_NUMEL`` elements: there a foreach op loops
    over the tensors, slower than one op on a stack of many small ones. Both ways give the same
    bits."""
    big_enough = tensors[0].is_cuda or tensors[0].numel() >= _CPU_IN_PLACE_NUMEL
    return big_enough and all(t.dtype == dtype for t in tensors)


def apply_updates(
    params: Sequence[torch.Tensor],
    upd: torch.Tensor,
    exp_avgs: Sequence[torch.Tensor] | None,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    weight_decay: float,
    cosine_max_scale: float | None,
    reduce: Reduce | None = None,
    rounding_keys: Sequence[int] | torch.Tensor | None = None,
    scalars: torch.Tensor | None = None,
) -> None:
    """Lines 346–349 for each matrix ``b``: momentum of updates, optional cosine guidance,
    decoupled weight decay. ``upd`` is fp32 ``(B, *param.shape)`` (float64 for float64
    parameters); each parameter is written in its own dtype, and each ``exp_avgs[b]`` (when
    β1 > 0) in its own. ``reduce``: see :func:`clipped_update` (only the cosine guidance reduces
    over the matrix). With ``rounding_keys`` (one per parameter, ints or an int64 tensor),
    bfloat16 parameters are rounded at random (:func:`stochastic_round_bf16`), the others to
    nearest. ``scalars``: ``[α, 1 − α·λ, β1, 1 − β1]`` (``transfer.update_scalars``), read in
    place of ``lr``, ``weight_decay`` and ``beta1`` by an fp32 update (see
    :func:`_apply_from_scalars`)."""
    upd = upd.reshape(len(params), *params[0].shape)
    if scalars is not None and upd.dtype == torch.float32:
        _apply_from_scalars(params, upd, exp_avgs, scalars, cosine_max_scale, reduce, rounding_keys)
        return
    # A handful of kernel launches per bucket rather than a few per parameter: foreach ops in
    # place (see in_place_ok), or batched arithmetic in fp32 and one foreach copy back (rounding
    # once to each tensor's own dtype). avg is a stacked tensor or the exp_avgs list itself.
    if exp_avgs is None:
        avg = upd
    elif in_place_ok(exp_avgs, upd.dtype):
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, upd.unbind(0), alpha=1 - beta1)
        avg = exp_avgs
    else:
        avg = stack_as(exp_avgs, upd.dtype).mul_(beta1).add_(upd, alpha=1 - beta1)
        torch._foreach_copy_(exp_avgs, avg.unbind(0))
    if cosine_max_scale is not None and exp_avgs is not None:
        avg = _stacked(avg)
        avg = avg * cosine_guidance_factor(upd, avg, cosine_max_scale, reduce)
    # A one-element tensor lr (a scheduler's) read as a number, as update_scalars does: ``alpha``
    # takes a 0-d tensor but not a (1,) one, and the decay is then rounded once from float64.
    lr = float(lr)
    decay = 1 - lr * weight_decay  # x·1 == x exactly: no launch without weight decay
    if in_place_ok(params, upd.dtype):
        if decay != 1:
            torch._foreach_mul_(params, decay)
        torch._foreach_add_(params, avg.unbind(0) if torch.is_tensor(avg) else avg, alpha=-lr)
    else:
        new = stack_as(params, upd.dtype)
        if decay != 1:
            new.mul_(decay)
        rows = new.add_(_stacked(avg), alpha=-lr).unbind(0)
        if rounding_keys is not None and any(p.dtype == torch.bfloat16 for p in params):
            rounded = stochastic_round_bf16(new, rounding_keys).unbind(0)
            rows = [r if p.dtype == torch.bfloat16 else x for p, r, x in zip(params, rounded, rows, strict=True)]
        torch._foreach_copy_(params, rows)


def _apply_from_scalars(
    params: Sequence[torch.Tensor],
    upd: torch.Tensor,
    exp_avgs: Sequence[torch.Tensor] | None,
    scalars: torch.Tensor,
    cosine_max_scale: float | None,
    reduce: Reduce | None,
    rounding_keys: Sequence[int] | torch.Tensor | None,
) -> None:
    """:func:`apply_updates` with α, λ and β1 from the fp32 tensor ``scalars``, for
    ``torch.compile``: read as Python numbers, they were constants of the compiled update,
    which dynamo compiled anew for every learning rate a scheduler wrote, until its recompile
    limit (then it ran eagerly). The same bits as the numbers: each is rounded to fp32 as the
    op rounds a Python number, ``addcmul`` rounds ``x + a·s`` once as ``add``'s ``alpha`` does,
    and ``x·1 == x`` where the eager update skips the decay. Always stacked (the in-place
    foreach way gives the same bits)."""
    lr, decay, beta1, one_minus_beta1 = scalars.to(upd.device).unbind(0)
    avg = upd
    if exp_avgs is not None:
        avg = stack_as(exp_avgs, upd.dtype).mul_(beta1).addcmul_(upd, one_minus_beta1)
        torch._foreach_copy_(exp_avgs, avg.unbind(0))
        if cosine_max_scale is not None:
            avg = avg * cosine_guidance_factor(upd, avg, cosine_max_scale, reduce)
    new = stack_as(params, upd.dtype).mul_(decay).addcmul_(avg, lr.neg())
    rows = new.unbind(0)
    if rounding_keys is not None and any(p.dtype == torch.bfloat16 for p in params):
        rounded = stochastic_round_bf16(new, rounding_keys).unbind(0)
        rows = [r if p.dtype == torch.bfloat16 else x for p, r, x in zip(params, rounded, rows, strict=True)]
    torch._foreach_copy_(params, rows)


_U32 = 0xFFFFFFFF


def hash32(x):
    """A 32-bit integer hash of ``x`` in ``[0, 2³²)``, a Python int or an int64 tensor
    (elementwise): Wellons' lowbias32 form with the multipliers 0x21f0aaad and 0x735a2d97, both
    below 2³¹, so that no int64 product overflows. The Triton kernels compute the same on
    uint32 (``kernels._tiles``)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _U32
    return x ^ (x >> 15)


def mix32(values: Sequence[int], start: int = 0) -> int:
    """Python ints folded into one 32-bit key by :func:`hash32`'s steps (each value's low and
    high 32 bits in turn): the same in every process and Python version, unlike ``hash``.
    ``start``: a key already folded, to go on from (``mix32(b, mix32(a)) == mix32((*a, *b))``)."""
    h = start
    for v in values:
        for part in (v & _U32, (v >> 32) & _U32):
            h = hash32((h + part) & _U32)
    return h


def shard_keys(keys: Sequence[int] | torch.Tensor, first_row: int) -> list[int] | list[torch.Tensor]:
    """The rounding keys of a row shard of each matrix (see ``distributed.RowShards``), which
    numbers its elements from 0: each key and the first row folded together, so that each
    shard draws its own bits (other bits than one process draws for the whole matrix, as
    unbiased). The key goes in first: folded after it, the row would be added to the unhashed
    key (``prefix + step``), and the shard at row r would draw on step t the stream of the shard
    at row 0 on step t + r. Inside torch.compile ``keys`` is a tensor, and so is each key."""
    return [mix32((k, first_row)) for k in keys]


def rounding_noise(key: int | torch.Tensor, start: int, count: int, device: torch.device) -> torch.Tensor:
    """``(count,)`` int32 in ``[0, 2¹⁶)``, the random low bits of stochastic rounding for the
    elements ``start … start + count − 1`` of a matrix whose key this step is ``key`` (each
    matrix its own, see ``SketchOptimizer._rounding_keys``): for element ``i``, the top 16 bits
    of ``hash32(hash32(key) + i)`` (sums mod 2³²). A counter-based stream: any backend draws the
    same bits for the same key and element, and nothing is stored."""
    seed = hash32(key & _U32)
    idx = torch.arange(start, start + count, device=device, dtype=torch.int64)
    return (hash32((seed + idx) & _U32) >> 16).to(torch.int32)


def stochastic_round_bf16(x: torch.Tensor, keys: Sequence[int] | torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """fp32 ``x: (B, …)`` rounded to bfloat16 values at random, still fp32 (the low 16 bits
    zero): ``|x|`` goes up to the next bf16 value with probability equal to the part of the gap
    it has covered, else down, so the expected result is ``x`` (round-to-nearest drops an update
    below half a bf16 ulp for good). Noise from :func:`rounding_noise` with ``keys[b]`` for
    ``x[b]``, made ``chunk`` elements of a matrix at a time (it holds a few int64 temporaries
    an element); inf and NaN stay."""
    flat = x.reshape(len(x), -1).contiguous()
    out = torch.empty_like(flat)
    for b, row in enumerate(flat):
        for start in range(0, row.numel(), chunk):
            part = row[start : start + chunk]
            noise = rounding_noise(keys[b], start, part.numel(), x.device)
            bits = (part.view(torch.int32) + noise) & -0x10000  # no int32 overflow for finite values
            out[b, start : start + part.numel()] = torch.where(part.isfinite(), bits.view(torch.float32), part)
    return out.view_as(x)


def _stacked(x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``x`` as one ``(B, …)`` tensor."""
    return x if torch.is_tensor(x) else torch.stack(x)


class ReferenceSecondMoment(DenseOperator):
    """The second moment ``V_t`` of a batch as a linear operator, materialized.

    ``grad: (B, m, n)`` in the factors' dtype (fp32, or float64 for float64 parameters);
    ``q: (B, m, K)``, ``u: (B, n, K)`` the previous factors."""

    def __init__(self, grad: torch.Tensor, q: torch.Tensor, u: torch.Tensor, beta2: float):
        super().__init__(second_moment(grad, q, u, beta2))
        self.grad = grad

    def clipped_update(self, eps: float, clip_threshold: float, reduce: Reduce | None = None) -> torch.Tensor:
        """The clipped update ``(B, m, n)`` from the exact ``V_t``, not its compression."""
        return clipped_update(self.grad, self.a, eps, clip_threshold, reduce)
