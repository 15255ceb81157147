"""Per-matrix sums over V as one reduction pass: ``‖V‖_F²``, ``Σ (G/(√V+ε))²`` and, when new
factors are given, ``‖V − Q_t U_tᵀ‖_F²`` (ξ's numerator).

The optimizer gets these from passes it makes anyway (the first ``V @ Ω`` and the update
pass); this kernel serves the operator's ``sq_norm`` / ``update_sq_norm`` /
``residual_sq_norm`` when they are asked for on their own (S-RSI outside the optimizer, tests).
Grid: one program per ``BLOCK_M × BLOCK_N`` tile of every matrix; each writes its partial sums
and a torch sum after the launch adds them (deterministic, no atomics).
"""

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._launch import (
    ELEMENTWISE_BLOCKS,
    Blocks,
    MatrixTable,
    batch_chunks,
    check_factors,
    check_new_factors,
    on_device,
    pointer_arg,
)
from ._tiles import inside, program_v_tile, raw_update, residual_sq, tile_sum


@triton.jit
def _v_norms_kernel(
    g_ptr, g_off_ptr, q_ptr, u_ptr, qn_ptr, un_ptr, out_ptr,
    M, N, K, K_NEW, FIRST,
    stride_gm, stride_gn,
    stride_qb, stride_qm, stride_qk,
    stride_ub, stride_un, stride_uk,
    stride_qnb, stride_qnm, stride_qnk,
    stride_unb, stride_unn, stride_unk,
    beta2, one_minus_beta2, eps,
    G_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, WITH_RESIDUAL: tl.constexpr,
):  # fmt: skip
    tile, tiles, b, rows, cols, g, v = program_v_tile(
        g_ptr, g_off_ptr, q_ptr, u_ptr, M, N, K, FIRST, stride_gm, stride_gn, stride_qb, stride_qm, stride_qk,
        stride_ub, stride_un, stride_uk, beta2, one_minus_beta2, G_ALIGN, BLOCK_M, BLOCK_N, HAS_LOWRANK,
    )  # fmt: skip
    upd = raw_update(g, v, inside(rows, cols, M, N), eps)
    tl.store(out_ptr + (b * 3) * tiles + tile, tile_sum(v * v))
    tl.store(out_ptr + (b * 3 + 2) * tiles + tile, tile_sum(upd * upd))
    if WITH_RESIDUAL:
        resid = residual_sq(
            v, qn_ptr, un_ptr, b, rows, cols, M, N, K_NEW,
            stride_qnb, stride_qnm, stride_qnk, stride_unb, stride_unn, stride_unk, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        tl.store(out_ptr + (b * 3 + 1) * tiles + tile, resid)


def v_norms(
    grads: Sequence[torch.Tensor] | MatrixTable,
    q: torch.Tensor,
    u: torch.Tensor,
    beta2: float,
    eps: float,
    q_new: torch.Tensor | None = None,
    u_new: torch.Tensor | None = None,
    *,
    blocks: Blocks = ELEMENTWISE_BLOCKS,
) -> torch.Tensor:
    """``(B, 3)`` fp32: ``[‖V‖_F², ‖V − q_new u_newᵀ‖_F², Σ (G/(√V+ε))²]`` per matrix (the
    middle one is 0 without new factors). ``grads`` ``B × (m, n)``; ``q: (B, m, K)``,
    ``u: (B, n, K)``, ``q_new: (B, m, k)``, ``u_new: (B, n, k)`` fp32."""
    table = grads if isinstance(grads, MatrixTable) else MatrixTable(grads, "grads")
    m, n = table.shape
    batch = len(table)
    check_factors(q, u, batch, m, n, table.device)
    with_residual = check_new_factors(q_new, u_new, batch, m, n, table.device)
    if not with_residual:
        q_new, u_new = q, u
    k, k_new = q.shape[2], q_new.shape[2]
    block_m, block_n = blocks.tile(m, n)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    out = torch.zeros(batch, 3, tiles, dtype=torch.float32, device=table.device)
    with on_device(table.device):
        for first, count in batch_chunks(batch):
            _v_norms_kernel[(tiles, count)](
                table.base, table.offsets, pointer_arg(q, out), pointer_arg(u, out),
                pointer_arg(q_new, out), pointer_arg(u_new, out), out,
                m, n, k, k_new, first, *table.stride, *q.stride(), *u.stride(), *q_new.stride(), *u_new.stride(),
                float(beta2), 1.0 - float(beta2), float(eps),
                G_ALIGN=table.align, BLOCK_M=block_m, BLOCK_N=block_n, HAS_LOWRANK=k > 0, WITH_RESIDUAL=with_residual,
                **blocks.options(),
            )  # fmt: skip
    return out.sum(dim=-1)
