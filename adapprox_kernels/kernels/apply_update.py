"""The update pass: one read of G (and M, W), one write of W (and M), fusing

* ``Upd = G/(√V+ε) / clip`` with V rebuilt in registers (the exact ``V_t``, not its
  compression) and ``clip = ±max(1, RMS(Upd)/d)`` (negative for ``maximize``) from the first
  ``V @ Ω`` pass;
* the momentum of updates ``M_t = β1·M_{t−1} + (1−β1)·Upd`` (optional, stored in M's dtype);
* the step ``W ← W·(1 − α·λ) − α·s·M_t`` (decoupled weight decay; ``s`` the cosine-guidance
  factor of each matrix, 1 without guidance), written in W's dtype (fp32, bf16, fp16) with
  round-to-nearest-even; all arithmetic fp32. α, ``1 − α·λ`` and β1 are read from a device
  tensor, not passed as launch constants, so that a captured CUDA graph replays with new ones;
* optionally, for bf16 weights, stochastic rounding of the new weight instead (given a
  key per matrix, ``rounding_keys``, also read from the device): the same bits as
  :func:`adapprox_kernels.reference.stochastic_round_bf16`, noise from a counter-based hash of
  the matrix's key and the element's flat index ``row·n + col``;
* optionally ξ's numerator ``‖V − Q_t U_tᵀ‖_F²`` for the new factors, from the same V tiles.

A matrix whose clip divisor is not finite is not written at all (see ``_tiles.gated``):
that is how the optimizer launches a step's updates before it has read its non-finite check.

Grid: one program per ``BLOCK_M × BLOCK_N`` tile of every matrix (elementwise work, so the
grid is as parallel as the matrices are large); residual partial sums are added by a torch sum
after the launch. W and M are read and written in place through matrix tables (see
``_launch.MatrixTable``).
"""

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..transfer import update_scalars
from ._launch import (
    ELEMENTWISE_BLOCKS,
    Blocks,
    MatrixTable,
    batch_chunks,
    check_factors,
    check_new_factors,
    check_rounding_keys,
    check_vector,
    on_device,
    pointer_arg,
    step_tables,
)
from ._tiles import (
    gated,
    inside,
    matrix_seed,
    program_v_tile,
    residual_sq,
    store_step,
    tile_ptrs,
    update_and_average,
)


@triton.jit
def _apply_update_kernel(
    g_ptr, g_off_ptr, q_ptr, u_ptr, w_ptr, w_off_ptr, mom_ptr, mom_off_ptr, clip_ptr, scale_ptr,
    qn_ptr, un_ptr, resid_ptr, scalars_ptr, key_ptr,
    M, N, K, K_NEW, FIRST,
    stride_gm, stride_gn,
    stride_qb, stride_qm, stride_qk,
    stride_ub, stride_un, stride_uk,
    stride_wm, stride_wn,
    stride_mm, stride_mn,
    stride_qnb, stride_qnm, stride_qnk,
    stride_unb, stride_unn, stride_unk,
    beta2, one_minus_beta2, eps,
    G_ALIGN: tl.constexpr, W_ALIGN: tl.constexpr, MOM_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, HAS_MOMENTUM: tl.constexpr, WITH_RESIDUAL: tl.constexpr,
    STOCHASTIC: tl.constexpr = 0,
):  # fmt: skip
    tile, tiles, b, rows, cols, g, v = program_v_tile(
        g_ptr, g_off_ptr, q_ptr, u_ptr, M, N, K, FIRST, stride_gm, stride_gn, stride_qb, stride_qm, stride_qk,
        stride_ub, stride_un, stride_uk, beta2, one_minus_beta2, G_ALIGN, BLOCK_M, BLOCK_N, HAS_LOWRANK,
    )  # fmt: skip
    clip = tl.load(clip_ptr + b)
    mask = gated(inside(rows, cols, M, N), clip)
    mom_ptrs = tile_ptrs(mom_ptr + tl.load(mom_off_ptr + b) * MOM_ALIGN, rows, cols, stride_mm, stride_mn)
    _, avg = update_and_average(g, v, mask, eps, clip, mom_ptrs, scalars_ptr, HAS_MOMENTUM)
    w_ptrs = tile_ptrs(w_ptr + tl.load(w_off_ptr + b) * W_ALIGN, rows, cols, stride_wm, stride_wn)
    idx = rows[:, None].to(tl.int64) * N + cols[None, :]  # flat index in the matrix: stochastic rounding's counter
    store_step(
        avg, mask, w_ptrs, mom_ptrs, scalars_ptr, tl.load(scale_ptr + b), matrix_seed(key_ptr, b, STOCHASTIC), idx,
        HAS_MOMENTUM, STOCHASTIC,
    )  # fmt: skip
    if WITH_RESIDUAL:
        resid = residual_sq(
            v, qn_ptr, un_ptr, b, rows, cols, M, N, K_NEW,
            stride_qnb, stride_qnm, stride_qnk, stride_unb, stride_unn, stride_unk, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        tl.store(resid_ptr + b * tiles + tile, resid)


def apply_update(
    grads: Sequence[torch.Tensor] | MatrixTable,
    q: torch.Tensor,
    u: torch.Tensor,
    params: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor] | None,
    clip: torch.Tensor,
    scale: torch.Tensor | None = None,
    q_new: torch.Tensor | None = None,
    u_new: torch.Tensor | None = None,
    *,
    beta2: float,
    eps: float,
    lr: float,
    beta1: float,
    weight_decay: float,
    scalars: torch.Tensor | None = None,
    blocks: Blocks = ELEMENTWISE_BLOCKS,
    rounding_keys: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Write ``params`` (and ``exp_avgs`` when given) in place; returns the ``(B,)`` residual
    sums ``‖V − q_new u_newᵀ‖_F²`` when new factors are given, else ``None``.

    ``grads``, ``params``, ``exp_avgs``: ``B × (m, n)`` (each list of one dtype: fp32, bf16 or
    fp16); ``q: (B, m, K)``, ``u: (B, n, K)`` the previous factors (fp32, as the new ones);
    ``clip: (B,)`` the update divisor ``±max(1, RMS/d)``; ``scale: (B,)`` the cosine-guidance
    step factor (default 1); ``q_new: (B, m, k)``, ``u_new: (B, n, k)``. ``scalars``: an fp32
    ``(4,)`` device tensor ``[α, 1 − α·λ, β1, 1 − β1]`` read instead of ``lr``,
    ``weight_decay`` and ``beta1`` (what a CUDA graph replays with; see
    :func:`~adapprox_kernels.transfer.update_scalars`). ``rounding_keys``: an int64 ``(B,)``
    device tensor, each matrix's key in ``[0, 2³²)``; bf16 params are then rounded
    stochastically, bit for bit as ``reference.stochastic_round_bf16(new_fp32, keys)`` on the
    ``(B, m, n)`` stack (read from the device, so a CUDA graph replays with new keys each step);
    ignored for other dtypes, and without it every dtype rounds to nearest even."""
    table = grads if isinstance(grads, MatrixTable) else MatrixTable(grads, "grads")
    m, n = table.shape
    batch = len(table)
    weights, moms = step_tables(params, exp_avgs, table)
    check_factors(q, u, batch, m, n, table.device)
    clip = check_vector(clip, "clip", batch, table.device)
    if scalars is None:
        scalars = update_scalars(lr, weight_decay, beta1, table.device)
    scalars = check_vector(scalars, "scalars", 4, table.device)
    if scale is None:
        scale = torch.ones(batch, dtype=torch.float32, device=table.device)
    scale = check_vector(scale, "scale", batch, table.device)
    rounding_keys = check_rounding_keys(rounding_keys, batch, table.device)
    with_residual = check_new_factors(q_new, u_new, batch, m, n, table.device)
    if not with_residual:
        q_new, u_new = q, u
    k, k_new = q.shape[2], q_new.shape[2]
    block_m, block_n = blocks.tile(m, n)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    resid = torch.zeros(batch, tiles, dtype=torch.float32, device=table.device)
    mom_table = moms if moms is not None else weights  # a placeholder the kernel never touches
    with on_device(table.device):
        for first, count in batch_chunks(batch):
            _apply_update_kernel[(tiles, count)](
                table.base, table.offsets, pointer_arg(q, resid), pointer_arg(u, resid),
                weights.base, weights.offsets, mom_table.base, mom_table.offsets, clip, scale,
                pointer_arg(q_new, resid), pointer_arg(u_new, resid), resid, scalars,
                scalars if rounding_keys is None else rounding_keys,  # a placeholder the kernel never reads
                m, n, k, k_new, first,
                *table.stride, *q.stride(), *u.stride(), *weights.stride, *mom_table.stride,
                *q_new.stride(), *u_new.stride(),
                float(beta2), 1.0 - float(beta2), float(eps),
                G_ALIGN=table.align, W_ALIGN=weights.align, MOM_ALIGN=mom_table.align,
                BLOCK_M=block_m, BLOCK_N=block_n,
                HAS_LOWRANK=k > 0, HAS_MOMENTUM=moms is not None, WITH_RESIDUAL=with_residual,
                STOCHASTIC=rounding_keys is not None and weights.dtype == torch.bfloat16,
                **blocks.options(),
            )  # fmt: skip
    weights.writeback()
    if moms is not None:
        moms.writeback()
    return resid.sum(dim=-1) if with_residual else None
