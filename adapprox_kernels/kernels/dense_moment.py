"""The dense buckets' step (vectors, matrices too small to factor), whose second moment
``V_t = β2·V_{t−1} + (1−β2)·G²`` is stored (fp32, one per parameter), in two passes:

* :func:`dense_sums` reads G and ``V_{t−1}`` and writes nothing but the per-matrix sums
  ``[‖V_t‖², Σ (G/(√V_t+ε))²]``: the update's RMS, and the optimizer's non-finite gradient
  check (the second sum is NaN or inf exactly where G holds NaN or inf), before any state
  changes;
* :func:`dense_apply` rebuilds ``V_t``, writes it over ``V_{t−1}``, and applies the same clipped
  update, momentum of updates and decoupled weight decay as the factored update pass
  (:mod:`.apply_update`), writing W and M in their own dtypes.

Grid: one program per ``BLOCK_M × BLOCK_N`` tile of every matrix; a vector is a ``(1, n)``
matrix. Partial sums are added on the host (deterministic).
"""

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..transfer import lr_and_decay
from ._launch import ELEMENTWISE_BLOCKS, Blocks, MatrixTable, check_vector, step_tables
from ._tiles import load_tile, raw_update, store_step, update_and_average


@triton.jit
def _dense_tile(g_base, v_base, rows, cols, M, N, stride_gm, stride_gn, stride_vm, stride_vn, beta2, one_minus_beta2):
    """The gradient tile and ``V_t = β2·V_{t−1} + (1−β2)·G²`` on ``rows × cols`` (fp32)."""
    g = load_tile(g_base, rows, cols, stride_gm, stride_gn, M, N)
    v = beta2 * load_tile(v_base, rows, cols, stride_vm, stride_vn, M, N) + one_minus_beta2 * (g * g)
    return g, v


@triton.jit
def _dense_sums_kernel(
    g_ptr, g_off_ptr, v_ptr, v_off_ptr, out_ptr,
    M, N, stride_gm, stride_gn, stride_vm, stride_vn, beta2, one_minus_beta2, eps,
    G_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    b = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    rows = (tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    g, v = _dense_tile(
        g_ptr + tl.load(g_off_ptr + b) * G_ALIGN, v_ptr + tl.load(v_off_ptr + b) * V_ALIGN, rows, cols, M, N,
        stride_gm, stride_gn, stride_vm, stride_vn, beta2, one_minus_beta2,
    )  # fmt: skip
    upd = raw_update(g, v, rows, cols, M, N, eps)
    tiles = tl.num_programs(0)
    b64 = b.to(tl.int64)
    tl.store(out_ptr + (b64 * 2) * tiles + tile, tl.sum(tl.sum(v * v, axis=1), axis=0))
    tl.store(out_ptr + (b64 * 2 + 1) * tiles + tile, tl.sum(tl.sum(upd * upd, axis=1), axis=0))


@triton.jit
def _dense_apply_kernel(
    g_ptr, g_off_ptr, v_ptr, v_off_ptr, w_ptr, w_off_ptr, mom_ptr, mom_off_ptr, clip_ptr, lr_decay_ptr,
    M, N, stride_gm, stride_gn, stride_vm, stride_vn, stride_wm, stride_wn, stride_mm, stride_mn,
    beta2, one_minus_beta2, eps, beta1, one_minus_beta1,
    G_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, W_ALIGN: tl.constexpr, MOM_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    b = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    rows = (tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    v_base = v_ptr + tl.load(v_off_ptr + b) * V_ALIGN
    g, v = _dense_tile(
        g_ptr + tl.load(g_off_ptr + b) * G_ALIGN, v_base, rows, cols, M, N,
        stride_gm, stride_gn, stride_vm, stride_vn, beta2, one_minus_beta2,
    )  # fmt: skip
    v_ptrs = v_base + rows[:, None].to(tl.int64) * stride_vm + cols[None, :].to(tl.int64) * stride_vn
    tl.store(v_ptrs, v, mask=(rows[:, None] < M) & (cols[None, :] < N))
    mom_base = mom_ptr + tl.load(mom_off_ptr + b) * MOM_ALIGN
    _, avg = update_and_average(
        g, v, rows, cols, M, N, eps, tl.load(clip_ptr + b), mom_base, stride_mm, stride_mn,
        beta1, one_minus_beta1, HAS_MOMENTUM,
    )  # fmt: skip
    store_step(
        avg, rows, cols, M, N, w_ptr + tl.load(w_off_ptr + b) * W_ALIGN, stride_wm, stride_wn,
        mom_base, stride_mm, stride_mn, lr_decay_ptr, 1.0, HAS_MOMENTUM,
    )  # fmt: skip


def _tables(grads, sqs) -> tuple[MatrixTable, MatrixTable]:
    table = grads if isinstance(grads, MatrixTable) else MatrixTable(grads, "grads")
    v = sqs if isinstance(sqs, MatrixTable) else MatrixTable(sqs, "exp_avg_sqs", writable=True)
    if v.dtype != torch.float32:
        raise ValueError(f"exp_avg_sqs: expected float32, got {v.dtype}")
    if v.shape != table.shape or len(v) != len(table) or v.device != table.device:
        raise ValueError(f"exp_avg_sqs: need {len(table)} matrices {table.shape} on {table.device}")
    return table, v


def dense_sums(
    grads: Sequence[torch.Tensor] | MatrixTable,
    exp_avg_sqs: Sequence[torch.Tensor] | MatrixTable,
    beta2: float,
    eps: float,
    *,
    blocks: Blocks = ELEMENTWISE_BLOCKS,
) -> torch.Tensor:
    """``(B, 2)`` fp32 ``[‖V_t‖_F², Σ (G/(√V_t+ε))²]`` per matrix, ``V_t`` from ``grads`` and the
    stored ``exp_avg_sqs`` (``B × (m, n)``, fp32, not written)."""
    table, v = _tables(grads, exp_avg_sqs)
    m, n = table.shape
    block_m, block_n = blocks.tile(m, n)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    out = torch.empty(len(table), 2, tiles, dtype=torch.float32, device=table.device)
    _dense_sums_kernel[(tiles, len(table))](
        table.base, table.offsets, v.base, v.offsets, out,
        m, n, *table.stride, *v.stride, float(beta2), 1.0 - float(beta2), float(eps),
        G_ALIGN=table.align, V_ALIGN=v.align, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    return out.sum(dim=-1)


def dense_apply(
    grads: Sequence[torch.Tensor] | MatrixTable,
    exp_avg_sqs: Sequence[torch.Tensor] | MatrixTable,
    params: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor] | None,
    clip: torch.Tensor,
    *,
    beta2: float,
    eps: float,
    lr: float,
    beta1: float,
    weight_decay: float,
    lr_decay: torch.Tensor | None = None,
    blocks: Blocks = ELEMENTWISE_BLOCKS,
) -> None:
    """Writes ``V_t`` into ``exp_avg_sqs`` and steps ``params`` (and ``exp_avgs`` when given) in
    place. Shapes and dtypes as in :func:`~.apply_update.apply_update`, with the stored
    ``exp_avg_sqs`` (fp32) in place of the factors; ``clip: (B,)`` is ``max(1, RMS/d)`` from
    :func:`dense_sums`."""
    table, v = _tables(grads, exp_avg_sqs)
    m, n = table.shape
    batch = len(table)
    weights, moms = step_tables(params, exp_avgs, table)
    check_vector(clip, "clip", batch, table.device)
    if lr_decay is None:
        lr_decay = lr_and_decay(lr, weight_decay, table.device)
    check_vector(lr_decay, "lr_decay", 2, table.device)
    block_m, block_n = blocks.tile(m, n)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    mom_table = moms if moms is not None else weights  # a placeholder the kernel never touches
    _dense_apply_kernel[(tiles, batch)](
        table.base, table.offsets, v.base, v.offsets, weights.base, weights.offsets, mom_table.base, mom_table.offsets,
        clip, lr_decay,
        m, n, *table.stride, *v.stride, *weights.stride, *mom_table.stride,
        float(beta2), 1.0 - float(beta2), float(eps), float(beta1), 1.0 - float(beta1),
        G_ALIGN=table.align, V_ALIGN=v.align, W_ALIGN=weights.align, MOM_ALIGN=mom_table.align,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_MOMENTUM=moms is not None,
        num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    for written in (v, weights, moms):
        if written is not None:
            written.writeback()
