"""The dense buckets' step (vectors, matrices too small to factor), whose second moment
``V_t = β2·V_{t−1} + (1−β2)·G²`` is stored (fp32, one per parameter), in two passes:

* :func:`dense_sums` reads G and ``V_{t−1}`` and writes nothing but the per-tensor sums
  ``[‖V_t‖², Σ (G/(√V_t+ε))²]``: the update's RMS, and the optimizer's non-finite gradient
  check (the second sum is NaN where G holds NaN or inf, or an entry whose square overflows
  ``V_t``: ``_tiles.raw_update``), before any state changes;
* :func:`dense_apply` rebuilds ``V_t``, writes it over ``V_{t−1}``, and applies the same clipped
  update, momentum of updates and decoupled weight decay as the factored update pass
  (:mod:`.apply_update`), writing W and M in their own dtypes (bf16 weights optionally rounded
  stochastically, the element's counter its flat offset); a tensor whose clip divisor is not
  finite is not written at all.

The step is elementwise but for the per-tensor RMS, so shape does not matter: every tensor is
read as a flat array (no view, no 2-D tile with one live row for a vector). Grid: one program
per ``block`` elements of every tensor; partial sums are added by a torch sum after the launch
(deterministic).
"""

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..transfer import update_scalars
from ._launch import (
    ELEMENTWISE_BLOCKS,
    MatrixTable,
    batch_chunks,
    check_rounding_keys,
    check_vector,
    on_device,
    step_tables,
)
from ._tiles import gated, matrix_seed, raw_update, store_step, update_and_average

# Elements per program: as many as one tile of the other elementwise passes (4096).
DENSE_BLOCK = ELEMENTWISE_BLOCKS.m * ELEMENTWISE_BLOCKS.n


@triton.jit
def _dense_block(g_ptr, g_off_ptr, v_ptr, v_off_ptr, NUMEL, FIRST, beta2, one_minus_beta2,
                 G_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """This program's block of tensor ``b`` as ``(b, block, offs, mask, v_ptrs, G, V_t)``: the
    offsets, which lie inside, the V pointers, G and ``V_t = β2·V_{t−1} + (1−β2)·G²`` (fp32, 0
    outside); ``b`` counts from the launch's ``FIRST`` (see ``_launch.batch_chunks``)."""
    block, b = tl.program_id(0), tl.program_id(1).to(tl.int64) + FIRST
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    g = tl.load(g_ptr + tl.load(g_off_ptr + b) * G_ALIGN + offs, mask=mask, other=0.0).to(tl.float32)
    v_ptrs = v_ptr + tl.load(v_off_ptr + b) * V_ALIGN + offs
    v = beta2 * tl.load(v_ptrs, mask=mask, other=0.0) + one_minus_beta2 * (g * g)
    return b, block, offs, mask, v_ptrs, g, v


@triton.jit
def _dense_sums_kernel(
    g_ptr, g_off_ptr, v_ptr, v_off_ptr, out_ptr, NUMEL, FIRST, beta2, one_minus_beta2, eps,
    G_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, block, _, mask, _, g, v = _dense_block(
        g_ptr, g_off_ptr, v_ptr, v_off_ptr, NUMEL, FIRST, beta2, one_minus_beta2, G_ALIGN, V_ALIGN, BLOCK
    )
    upd = raw_update(g, v, mask, eps)
    blocks = tl.num_programs(0)
    slot = b * 2 * blocks + block
    tl.store(out_ptr + slot, tl.sum(v * v, axis=0))
    tl.store(out_ptr + slot + blocks, tl.sum(upd * upd, axis=0))


@triton.jit
def _dense_apply_kernel(
    g_ptr, g_off_ptr, v_ptr, v_off_ptr, w_ptr, w_off_ptr, mom_ptr, mom_off_ptr, clip_ptr, scalars_ptr, key_ptr,
    NUMEL, FIRST, beta2, one_minus_beta2, eps,
    G_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, W_ALIGN: tl.constexpr, MOM_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr, HAS_MOMENTUM: tl.constexpr, STOCHASTIC: tl.constexpr = 0,
):  # fmt: skip
    b, _, offs, mask, v_ptrs, g, v = _dense_block(
        g_ptr, g_off_ptr, v_ptr, v_off_ptr, NUMEL, FIRST, beta2, one_minus_beta2, G_ALIGN, V_ALIGN, BLOCK
    )
    clip = tl.load(clip_ptr + b)
    mask = gated(mask, clip)
    tl.store(v_ptrs, v, mask=mask)
    mom_ptrs = mom_ptr + tl.load(mom_off_ptr + b) * MOM_ALIGN + offs
    _, avg = update_and_average(g, v, mask, eps, clip, mom_ptrs, scalars_ptr, HAS_MOMENTUM)
    w_ptrs = w_ptr + tl.load(w_off_ptr + b) * W_ALIGN + offs
    seed = matrix_seed(key_ptr, b, STOCHASTIC)
    store_step(avg, mask, w_ptrs, mom_ptrs, scalars_ptr, 1.0, seed, offs, HAS_MOMENTUM, STOCHASTIC)


def _tables(grads, sqs) -> tuple[MatrixTable, MatrixTable]:
    table = grads if isinstance(grads, MatrixTable) else MatrixTable(grads, "grads", flat=True)
    v = sqs if isinstance(sqs, MatrixTable) else MatrixTable(sqs, "exp_avg_sqs", flat=True)
    if v.dtype != torch.float32:
        raise ValueError(f"exp_avg_sqs: expected float32, got {v.dtype}")
    if (v.shape, len(v), v.device) != (table.shape, len(table), table.device):
        raise ValueError(f"exp_avg_sqs: need {len(table)} tensors {table.shape} on {table.device}")
    return table, v


def _grid_block(numel: int, block: int) -> tuple[int, int]:
    """``(programs per tensor, elements per program)``: ``block``, or less for a small tensor."""
    block = max(16, min(block, triton.next_power_of_2(numel)))
    return triton.cdiv(numel, block), block


def dense_sums(
    grads: Sequence[torch.Tensor] | MatrixTable,
    exp_avg_sqs: Sequence[torch.Tensor] | MatrixTable,
    beta2: float,
    eps: float,
    *,
    block: int = DENSE_BLOCK,
) -> torch.Tensor:
    """``(B, 2)`` fp32 ``[‖V_t‖_F², Σ (G/(√V_t+ε))²]`` per tensor, ``V_t`` from ``grads`` and the
    stored ``exp_avg_sqs`` (``B`` tensors of one shape; fp32, not written)."""
    table, v = _tables(grads, exp_avg_sqs)
    programs, block = _grid_block(table.numel, block)
    out = torch.empty(len(table), 2, programs, dtype=torch.float32, device=table.device)
    with on_device(table.device):
        for first, count in batch_chunks(len(table)):
            _dense_sums_kernel[(programs, count)](
                table.base, table.offsets, v.base, v.offsets, out, table.numel, first,
                float(beta2), 1.0 - float(beta2), float(eps),
                G_ALIGN=table.align, V_ALIGN=v.align, BLOCK=block,
                **ELEMENTWISE_BLOCKS.options(),
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
    scalars: torch.Tensor | None = None,
    block: int = DENSE_BLOCK,
    rounding_keys: torch.Tensor | None = None,
) -> None:
    """Writes ``V_t`` into ``exp_avg_sqs`` and steps ``params`` (and ``exp_avgs`` when given) in
    place; all ``B`` tensors of one shape, params and exp_avgs each of one dtype (fp32, bf16,
    fp16). ``clip: (B,)`` is ``±max(1, RMS/d)`` from :func:`dense_sums` (a tensor whose ``clip`` is
    not finite is not written: V, W and M stay as they are); ``scalars`` as in
    :func:`~.apply_update.apply_update`. ``rounding_keys`` (int64 ``(B,)`` on the device, a key per
    tensor): bf16 params are rounded stochastically, bit for bit as
    ``reference.stochastic_round_bf16(new_fp32, keys)`` on the ``(B, numel)`` stack of the flat
    tensors; ignored for other dtypes."""
    table, v = _tables(grads, exp_avg_sqs)
    weights, moms = step_tables(params, exp_avgs, table, flat=True)
    clip = check_vector(clip, "clip", len(table), table.device)
    rounding_keys = check_rounding_keys(rounding_keys, len(table), table.device)
    if scalars is None:
        scalars = update_scalars(lr, weight_decay, beta1, table.device)
    scalars = check_vector(scalars, "scalars", 4, table.device)
    programs, block = _grid_block(table.numel, block)
    mom_table = moms if moms is not None else weights  # a placeholder the kernel never touches
    with on_device(table.device):
        for first, count in batch_chunks(len(table)):
            _dense_apply_kernel[(programs, count)](
                table.base, table.offsets, v.base, v.offsets,
                weights.base, weights.offsets, mom_table.base, mom_table.offsets, clip, scalars,
                scalars if rounding_keys is None else rounding_keys,  # a placeholder the kernel never reads
                table.numel, first, float(beta2), 1.0 - float(beta2), float(eps),
                G_ALIGN=table.align, V_ALIGN=v.align, W_ALIGN=weights.align, MOM_ALIGN=mom_table.align,
                BLOCK=block, HAS_MOMENTUM=moms is not None,
                STOCHASTIC=rounding_keys is not None and weights.dtype == torch.bfloat16,
                **ELEMENTWISE_BLOCKS.options(),
            )  # fmt: skip
    for written in (v, weights, moms):
        if written is not None:
            written.writeback()
