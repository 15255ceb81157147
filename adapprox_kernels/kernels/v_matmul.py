"""``V @ X`` and ``Vᵀ @ Y`` with ``V = β2·relu(Q Uᵀ) + (1−β2)·G²`` never stored.

Fuses, per tile of V: the ``Q·Uᵀ`` tile product, the clamp at 0, the blend with ``G²`` (G
read in its own dtype) and the product with the thin matrix; optionally (``eps`` given, used
on the first product of a step) the sums ``‖V‖²`` and ``Σ (G/(√V+ε))²`` from the same tiles,
so that pass also yields ξ's denominator and the update's RMS.

Grid: ``(row blocks × r blocks, split, B)``. Each program owns ``BLOCK_M`` rows and ``BLOCK_R``
columns of the output and walks its share of the reduction axis; ``split > 1`` (chosen when
the grid would not fill the GPU) writes partial products that are summed afterwards, so the
result is deterministic. ``Vᵀ @ Y`` is the same kernel on the transposed view (``Vᵀ`` is
``β2·relu(U Qᵀ) + (1−β2)·(Gᵀ)²``). Limits: r columns beyond ``Blocks.r`` (64) re-read G once
per extra r block; G must be fp32, bf16 or fp16; factors and thin matrices fp32.

``precision``: the ``tl.dot`` input precision (``"tf32x3"``, ``"tf32"``, ``"ieee"``; None:
``dot_precision``), or ``"tf32_rn"``: tf32 with both operands rounded to nearest first.
"""

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._launch import (
    FIRST_PASS_BLOCKS,
    PRODUCT_BLOCKS,
    Blocks,
    MatrixTable,
    batch_chunks,
    check_factor,
    check_factors,
    dot_precision,
    on_device,
    pointer_arg,
    reduction_split,
)
from ._tiles import inside, load_tile, raw_update, round_to_tf32, v_tile


@triton.jit
def _v_matmul_kernel(
    g_ptr, g_off_ptr, q_ptr, u_ptr, x_ptr, out_ptr, norms_ptr,
    M, N, K, R, N_PER_SPLIT, FIRST,
    stride_gm, stride_gn,
    stride_qb, stride_qm, stride_qk,
    stride_ub, stride_un, stride_uk,
    stride_xb, stride_xn, stride_xr,
    stride_os, stride_ob, stride_om, stride_or,
    beta2, one_minus_beta2, eps,
    G_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, WITH_NORMS: tl.constexpr, PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
    K_UNROLL: tl.constexpr, K_DOT: tl.constexpr, REBUILD_TF32X3: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2) + FIRST  # this launch's first matrix: see _launch
    num_r = tl.cdiv(R, BLOCK_R)
    pid_m = pid // num_r
    pid_r = pid % num_r
    b64 = b.to(tl.int64)
    g_base = g_ptr + tl.load(g_off_ptr + b) * G_ALIGN
    q_base = q_ptr + b64 * stride_qb
    u_base = u_ptr + b64 * stride_ub
    x_base = x_ptr + b64 * stride_xb

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    v_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    upd_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_start = split * N_PER_SPLIT
    for n0 in range(0, N_PER_SPLIT, BLOCK_N):
        cols = n_start + n0 + tl.arange(0, BLOCK_N)
        g, v = v_tile(
            g_base, q_base, u_base, rows, cols, M, N, K,
            stride_gm, stride_gn, stride_qm, stride_qk, stride_un, stride_uk, beta2, one_minus_beta2,
            BLOCK_M, BLOCK_N, HAS_LOWRANK, K_UNROLL, K_DOT, REBUILD_TF32X3,
        )  # fmt: skip
        x = load_tile(x_base, cols, rs, stride_xn, stride_xr, N, R)
        if ROUND_TF32:
            acc = tl.dot(round_to_tf32(v), round_to_tf32(x), acc, input_precision="tf32")
        else:
            acc = tl.dot(v, x, acc, input_precision=PRECISION)
        if WITH_NORMS:
            v_sq += tl.sum(v * v, axis=1)
            upd = raw_update(g, v, inside(rows, cols, M, N), eps)
            upd_sq += tl.sum(upd * upd, axis=1)

    out_ptrs = (
        out_ptr + split.to(tl.int64) * stride_os + b64 * stride_ob
        + rows[:, None].to(tl.int64) * stride_om + rs[None, :].to(tl.int64) * stride_or
    )  # fmt: skip
    tl.store(out_ptrs, acc, mask=(rows[:, None] < M) & (rs[None, :] < R))
    if WITH_NORMS:
        # Partial sums: norms[b, c, slot], one slot per program; r blocks > 0 repeat the
        # sums of r block 0 and the host ignores them.
        slots = num_r * tl.num_programs(1) * tl.cdiv(M, BLOCK_M)
        slot = (pid_r * tl.num_programs(1) + split) * tl.cdiv(M, BLOCK_M) + pid_m
        tl.store(norms_ptr + (b64 * 2) * slots + slot, tl.sum(v_sq, axis=0))
        tl.store(norms_ptr + (b64 * 2 + 1) * slots + slot, tl.sum(upd_sq, axis=0))


def _as_table(grads: Sequence[torch.Tensor] | MatrixTable) -> MatrixTable:
    return grads if isinstance(grads, MatrixTable) else MatrixTable(grads, "grads")


def _launch(table, q, u, x, beta2, eps, transpose, blocks, split, precision):
    m, n = table.shape
    batch = len(table)
    check_factors(q, u, batch, m, n, table.device)
    sg_m, sg_n = table.stride
    if transpose:  # Vᵀ = β2·relu(U Qᵀ) + (1−β2)·(Gᵀ)²
        m, n, sg_m, sg_n, q, u = n, m, sg_n, sg_m, u, q
    check_factor(x, "x" if not transpose else "y", batch, n, table.device)
    r = x.shape[2]
    if r < 1:
        raise ValueError("the thin matrix needs at least one column")
    k = q.shape[2]
    block_m, block_n, block_r = blocks.fit(m, n, r)
    num_m, num_r, num_n = triton.cdiv(m, block_m), triton.cdiv(r, block_r), triton.cdiv(n, block_n)
    split = reduction_split(num_m * num_r * batch, num_n, table.device, split)
    n_per_split = triton.cdiv(num_n, split) * block_n
    split = triton.cdiv(n, n_per_split)  # no program left without columns
    out = torch.empty(split, batch, m, r, dtype=torch.float32, device=table.device)
    with_norms = eps is not None
    precision = precision or dot_precision(table.device)
    norms = (
        torch.empty(batch, 2, num_r * split * num_m, dtype=torch.float32, device=table.device) if with_norms else out
    )
    with on_device(table.device):
        for first, count in batch_chunks(batch):
            _v_matmul_kernel[(num_m * num_r, split, count)](
                table.base, table.offsets, pointer_arg(q, x), pointer_arg(u, x), x, out, norms,
                m, n, k, r, n_per_split, first,
                sg_m, sg_n, *q.stride(), *u.stride(), *x.stride(), *out.stride(),
                float(beta2), 1.0 - float(beta2), float(eps) if with_norms else 0.0,
                G_ALIGN=table.align, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
                HAS_LOWRANK=k > 0, WITH_NORMS=with_norms, PRECISION="tf32" if precision == "tf32_rn" else precision,
                ROUND_TF32=precision == "tf32_rn", K_UNROLL=blocks.rank_unroll(k), K_DOT=blocks.rank_dot(k),
                # Never plain tf32 for the rebuilt tiles (see lowrank_tile): tf32x3 where tensor cores have tf32
                # (ieee where the products are).
                REBUILD_TF32X3=precision != "ieee" and dot_precision(table.device) == "tf32x3",
                **blocks.options(),
            )  # fmt: skip
    product = out[0] if split == 1 else out.sum(dim=0)
    if not with_norms:
        return product, None
    # Only r block 0's partial sums count (the others recompute the same tiles).
    return product, norms.view(batch, 2, num_r, split * num_m)[:, :, 0].sum(dim=-1)


def v_matmul(
    grads: Sequence[torch.Tensor] | MatrixTable,
    q: torch.Tensor,
    u: torch.Tensor,
    x: torch.Tensor,
    beta2: float,
    *,
    eps: float | None = None,
    blocks: Blocks | None = None,
    split: int | None = None,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``V @ x`` for ``B`` matrices: ``grads`` ``B × (m, n)``, ``q: (B, m, K)``,
    ``u: (B, n, K)`` fp32, ``x: (B, n, r)`` fp32 -> ``(B, m, r)`` fp32.

    With ``eps``, also returns ``(B, 2)`` sums ``[‖V‖_F², Σ (G/(√V+ε))²]`` from the same pass
    (else ``None``). ``blocks`` caps the tile sizes (default ``PRODUCT_BLOCKS``, or
    ``FIRST_PASS_BLOCKS`` with the sums); ``split`` overrides the split-K heuristic (at most one
    split per ``BLOCK_N`` columns); ``precision``: see the module's docstring."""
    if blocks is None:
        blocks = PRODUCT_BLOCKS if eps is None else FIRST_PASS_BLOCKS
    return _launch(_as_table(grads), q, u, x, beta2, eps, False, blocks, split, precision)


def v_rmatmul(
    grads: Sequence[torch.Tensor] | MatrixTable,
    q: torch.Tensor,
    u: torch.Tensor,
    y: torch.Tensor,
    beta2: float,
    *,
    blocks: Blocks = PRODUCT_BLOCKS,
    split: int | None = None,
    precision: str | None = None,
) -> torch.Tensor:
    """``Vᵀ @ y``: ``y: (B, m, r)`` fp32 -> ``(B, n, r)`` fp32 (shapes as in :func:`v_matmul`)."""
    return _launch(_as_table(grads), q, u, y, beta2, None, True, blocks, split, precision)[0]
