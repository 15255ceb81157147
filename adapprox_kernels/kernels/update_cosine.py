"""The sums cosine guidance needs, as one reduction pass: per matrix ``Σ Upd·M_t``,
``Σ Upd²`` and ``Σ M_t²``, where ``Upd`` is the clipped update and
``M_t = β1·M_{t−1} + (1−β1)·Upd`` the new momentum of updates, both rebuilt in registers.

Only run when cosine guidance is on: the cosine scales the weight step, so it must be known
before the update pass writes W (one extra pass over G and M). Grid: one program per
``BLOCK_M × BLOCK_N`` tile; partial sums are added by a torch sum after the launch.
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
    check_vector,
    on_device,
    pointer_arg,
)
from ._tiles import inside, program_v_tile, tile_ptrs, tile_sum, update_and_average


@triton.jit
def _update_cosine_kernel(
    g_ptr, g_off_ptr, q_ptr, u_ptr, mom_ptr, mom_off_ptr, clip_ptr, scalars_ptr, out_ptr,
    M, N, K, FIRST,
    stride_gm, stride_gn,
    stride_qb, stride_qm, stride_qk,
    stride_ub, stride_un, stride_uk,
    stride_mm, stride_mn,
    beta2, one_minus_beta2, eps,
    G_ALIGN: tl.constexpr, MOM_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
):  # fmt: skip
    tile, tiles, b, rows, cols, g, v = program_v_tile(
        g_ptr, g_off_ptr, q_ptr, u_ptr, M, N, K, FIRST, stride_gm, stride_gn, stride_qb, stride_qm, stride_qk,
        stride_ub, stride_un, stride_uk, beta2, one_minus_beta2, G_ALIGN, BLOCK_M, BLOCK_N, HAS_LOWRANK,
        G_AFTER_FACTORS=True,  # the rank loop's loads all in flight (see v_tile)
    )  # fmt: skip
    mom_ptrs = tile_ptrs(mom_ptr + tl.load(mom_off_ptr + b) * MOM_ALIGN, rows, cols, stride_mm, stride_mn)
    mask = inside(rows, cols, M, N)
    upd, avg = update_and_average(g, v, mask, eps, tl.load(clip_ptr + b), mom_ptrs, scalars_ptr, True)
    tl.store(out_ptr + (b * 3) * tiles + tile, tile_sum(upd * avg))
    tl.store(out_ptr + (b * 3 + 1) * tiles + tile, tile_sum(upd * upd))
    tl.store(out_ptr + (b * 3 + 2) * tiles + tile, tile_sum(avg * avg))


def update_cosine_sums(
    grads: Sequence[torch.Tensor] | MatrixTable,
    q: torch.Tensor,
    u: torch.Tensor,
    exp_avgs: Sequence[torch.Tensor] | MatrixTable,
    clip: torch.Tensor,
    *,
    beta2: float,
    eps: float,
    beta1: float,
    scalars: torch.Tensor | None = None,
    blocks: Blocks = ELEMENTWISE_BLOCKS,
) -> torch.Tensor:
    """``(B, 3)`` fp32: ``[Σ Upd·M_t, Σ Upd², Σ M_t²]`` per matrix. ``grads``, ``exp_avgs``:
    ``B × (m, n)``; ``q: (B, m, K)``, ``u: (B, n, K)``; ``clip: (B,)`` the divisor
    ``±max(1, RMS/d)`` of each matrix's update; ``scalars``: as in
    :func:`~.apply_update.apply_update` (only β1 is read), else built from ``beta1``."""
    table = grads if isinstance(grads, MatrixTable) else MatrixTable(grads, "grads")
    moms = exp_avgs if isinstance(exp_avgs, MatrixTable) else MatrixTable(exp_avgs, "exp_avgs")
    m, n = table.shape
    batch = len(table)
    if moms.shape != table.shape or len(moms) != batch or moms.device != table.device:
        raise ValueError(f"exp_avgs: need {batch} matrices {table.shape} on {table.device}")
    check_factors(q, u, batch, m, n, table.device)
    clip = check_vector(clip, "clip", batch, table.device)
    if scalars is None:
        scalars = update_scalars(0.0, 0.0, beta1, table.device)
    scalars = check_vector(scalars, "scalars", 4, table.device)
    k = q.shape[2]
    block_m, block_n = blocks.tile(m, n)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    out = torch.empty(batch, 3, tiles, dtype=torch.float32, device=table.device)
    with on_device(table.device):
        for first, count in batch_chunks(batch):
            _update_cosine_kernel[(tiles, count)](
                table.base, table.offsets, pointer_arg(q, out), pointer_arg(u, out),
                moms.base, moms.offsets, clip, scalars,
                out, m, n, k, first, *table.stride, *q.stride(), *u.stride(), *moms.stride,
                float(beta2), 1.0 - float(beta2), float(eps),
                G_ALIGN=table.align, MOM_ALIGN=moms.align, BLOCK_M=block_m, BLOCK_N=block_n,
                HAS_LOWRANK=k > 0,
                **blocks.options(),
            )  # fmt: skip
    return out.sum(dim=-1)
