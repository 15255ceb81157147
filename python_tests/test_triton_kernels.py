"""Every Triton kernel against the plain-PyTorch reference (which materializes V).

Runs on CPU tensors under the Triton interpreter when there is no GPU (see triton_env.py);
shapes are small because the interpreter costs milliseconds per program and loop iteration.
Small ``Blocks`` reach the multi-tile, multi-r-block and split paths."""

import importlib
import pkgutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_env import DEVICE, triton_kernels  # noqa: F401  (autouse fixture)

from adapprox_kernels import reference
from adapprox_kernels.backends import resolve_backend

BETA2 = 0.9  # far from 1 so that both terms of V matter
EPS = 1e-8


def _blocks(small: bool):
    from adapprox_kernels.kernels._launch import Blocks

    return Blocks(16, 16, 16) if small else Blocks()


def _inputs(batch, m, n, k, dtype, seed=0):
    """Gradients (own allocations), previous factors with matrix 1 at a lower rank (its last
    column zero-padded, as the optimizer pads mixed ranks), and V from the reference."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(m, n, generator=gen).to(dtype).to(DEVICE) for _ in range(batch)]
    q = torch.randn(batch, m, k, generator=gen).to(DEVICE)
    u = torch.randn(batch, n, k, generator=gen).to(DEVICE)  # Q Uᵀ has negative entries: relu matters
    if batch > 1 and k > 1:
        q[1, :, -1] = 0
        u[1, :, -1] = 0
    g32 = torch.stack([g.float() for g in grads])
    return grads, q, u, g32, reference.second_moment(g32, q, u, BETA2)


def _close(actual, expected, rtol=1e-5):
    """Max error relative to the largest reference entry (entries near 0 carry no weight)."""
    scale = expected.abs().max().clamp_min(1e-30)
    assert ((actual - expected).abs().max() / scale).item() <= rtol, (actual, expected)


def _same_rebuild(actual, expected):
    """Two ways of rebuilding V that add the same terms in the same order: the same bits under
    the interpreter. Compiled for an H100 they are the same bits in whole tiles, but in a
    partial one the compiler rounds the masked sums differently: up to 1.4e-7 of the largest
    entry measured (21 × 35, k = 3 … 16)."""
    if DEVICE.type == "cuda":
        _close(actual, expected, rtol=1e-6)
    else:
        assert torch.equal(actual, expected)


# (B, m, n, K, r, grad dtype, small blocks, split)
PRODUCT_CASES = [
    (2, 37, 129, 3, 6, torch.float32, False, None),
    (2, 37, 129, 3, 6, torch.bfloat16, False, None),
    (2, 37, 129, 3, 6, torch.float16, False, None),
    (3, 1, 9, 1, 1, torch.float32, False, None),
    (3, 9, 1, 1, 2, torch.bfloat16, False, None),
    (1, 13, 11, 0, 4, torch.float32, False, None),  # first step: no factors yet
    (2, 18, 33, 17, 17, torch.float32, True, 2),  # 2 r blocks (k+p > block), 2×3 tiles of V (3×2 of Vᵀ), split-K
]


@pytest.mark.parametrize("case", PRODUCT_CASES, ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}-K{c[3]}-r{c[4]}-{c[5]}-{c[6]}")
def test_products_and_first_pass_sums(case):
    from adapprox_kernels.kernels.v_matmul import v_matmul, v_rmatmul

    batch, m, n, k, r, dtype, small, split = case
    grads, q, u, g32, v = _inputs(batch, m, n, k, dtype)
    x = torch.randn(batch, n, r, device=DEVICE)
    y = torch.randn(batch, m, r, device=DEVICE)
    blocks = _blocks(small)
    prod, sums = v_matmul(grads, q, u, x, BETA2, eps=EPS, blocks=blocks, split=split)
    _close(prod, v @ x)
    _close(v_rmatmul(grads, q, u, y, BETA2, blocks=blocks, split=split), v.transpose(1, 2) @ y)
    upd = g32 / (v.sqrt() + EPS)
    torch.testing.assert_close(sums[:, 0], v.square().sum(dim=(1, 2)), rtol=1e-5, atol=0)
    torch.testing.assert_close(sums[:, 1], upd.square().sum(dim=(1, 2)), rtol=1e-5, atol=0)
    plain, none = v_matmul(grads, q, u, x, BETA2, blocks=blocks, split=split)
    assert none is None
    _close(plain, v @ x)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3), m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(0, 4), r=st.integers(1, 20),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), split=st.sampled_from([None, 2]), seed=st.integers(0, 99),
)  # fmt: skip
def test_products_match_the_reference_for_any_shape(batch, m, n, k, r, dtype, split, seed):
    """Shapes hypothesis draws, with 16-wide blocks: ragged tiles, r blocks and split-K."""
    from adapprox_kernels.kernels.v_matmul import v_matmul, v_rmatmul

    grads, q, u, g32, v = _inputs(batch, m, n, k, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, n, r, generator=gen).to(DEVICE), torch.randn(batch, m, r, generator=gen).to(DEVICE)
    prod, sums = v_matmul(grads, q, u, x, BETA2, eps=EPS, blocks=_blocks(True), split=split)
    _close(prod, v @ x)
    _close(v_rmatmul(grads, q, u, y, BETA2, blocks=_blocks(True), split=split), v.transpose(1, 2) @ y)
    torch.testing.assert_close(sums[:, 0], v.square().sum(dim=(1, 2)), rtol=1e-5, atol=0)
    torch.testing.assert_close(sums[:, 1], (g32 / (v.sqrt() + EPS)).square().sum(dim=(1, 2)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("k", [1, 3, 4, 17])
def test_unrolled_rank_loop_gives_the_same_bits(k):
    """``Blocks.unroll``: the rebuild of V unrolled to the next power of two of k (columns past k
    masked off; k = 17 > 16 keeps the run-time loop) adds the same terms in the same order
    (:func:`_same_rebuild`)."""
    from adapprox_kernels.kernels.v_matmul import v_matmul, v_rmatmul

    grads, q, u, _, v = _inputs(2, 21, 35, k, torch.float32)
    x, y = torch.randn(2, 35, 6, device=DEVICE), torch.randn(2, 21, 6, device=DEVICE)
    loop, unrolled = _blocks(True), _blocks(True)._replace(unroll=16)
    prod, sums = v_matmul(grads, q, u, x, BETA2, eps=EPS, blocks=unrolled)
    _close(prod, v @ x)
    _same_rebuild(prod, v_matmul(grads, q, u, x, BETA2, eps=EPS, blocks=loop)[0])
    _same_rebuild(sums, v_matmul(grads, q, u, x, BETA2, eps=EPS, blocks=loop)[1])
    rprod = v_rmatmul(grads, q, u, y, BETA2, blocks=unrolled)
    _close(rprod, v.transpose(1, 2) @ y)
    _same_rebuild(rprod, v_rmatmul(grads, q, u, y, BETA2, blocks=loop))


@pytest.mark.parametrize("k", [3, 5])
def test_unrolled_rank_loop_never_reads_the_columns_past_k(k):
    """The unrolled rebuild runs to the next power of two of k: columns from k on are masked off
    in both factors' loads (one mask is not enough: 0 × NaN is NaN). The factors here are views
    of a wider stack whose columns past k hold NaN; the results are the run-time loop's
    (:func:`_same_rebuild`)."""
    from adapprox_kernels.kernels.v_matmul import v_matmul, v_rmatmul

    grads, q, u, _, _ = _inputs(2, 21, 35, k, torch.float32)
    nan_q = torch.cat([q, torch.full((2, 21, 16), float("nan"), device=DEVICE)], dim=2)[:, :, :k]
    nan_u = torch.cat([u, torch.full((2, 35, 16), float("nan"), device=DEVICE)], dim=2)[:, :, :k]
    x, y = torch.randn(2, 35, 6, device=DEVICE), torch.randn(2, 21, 6, device=DEVICE)
    loop, unrolled = _blocks(True), _blocks(True)._replace(unroll=16)
    prod, sums = v_matmul(grads, nan_q, nan_u, x, BETA2, eps=EPS, blocks=unrolled)
    want, want_sums = v_matmul(grads, q, u, x, BETA2, eps=EPS, blocks=loop)
    _same_rebuild(prod, want)
    _same_rebuild(sums, want_sums)
    rprod = v_rmatmul(grads, nan_q, nan_u, y, BETA2, blocks=unrolled)
    _same_rebuild(rprod, v_rmatmul(grads, q, u, y, BETA2, blocks=loop))


@pytest.mark.parametrize("k, dot_from", [(1, 1), (3, 1), (16, 8), (17, 1), (5, 6), (65, 1)])
def test_rebuild_by_dot_matches_the_reference(k, dot_from):
    """``Blocks.dot_from``: the rebuilt tile of V as one dot of factor tiles padded to
    ``max(16, next power of two of k)`` columns (k = 17: 32) matches the reference, with the
    first pass's sums and in both products, also when ``unroll`` is set (the dot wins); below
    ``dot_from`` and above ``MAX_DOT_RANK`` the loop runs (:func:`_same_rebuild`). The padded columns must
    read as 0: the factors' columns past k hold garbage here, as a wider stack's would."""
    from adapprox_kernels.kernels._launch import MAX_DOT_RANK
    from adapprox_kernels.kernels.v_matmul import v_matmul, v_rmatmul

    grads, q, u, g32, v = _inputs(2, 21, 35, k, torch.float32)
    wide_q = torch.cat([q, torch.full((2, 21, 40), 1e6, device=DEVICE)], dim=2)[:, :, :k]
    wide_u = torch.cat([u, torch.full((2, 35, 40), -1e6, device=DEVICE)], dim=2)[:, :, :k]
    x, y = torch.randn(2, 35, 6, device=DEVICE), torch.randn(2, 21, 6, device=DEVICE)
    loop, dot = _blocks(True), _blocks(True)._replace(unroll=16, dot_from=dot_from)
    dotted = dot_from <= k <= MAX_DOT_RANK
    assert dot.rank_dot(k) == (max(16, 1 << (k - 1).bit_length()) if dotted else 0)
    prod, sums = v_matmul(grads, wide_q, wide_u, x, BETA2, eps=EPS, blocks=dot)
    rprod = v_rmatmul(grads, wide_q, wide_u, y, BETA2, blocks=dot)
    _close(prod, v @ x)
    _close(rprod, v.transpose(1, 2) @ y)
    torch.testing.assert_close(sums[:, 0], v.square().sum(dim=(1, 2)), rtol=1e-5, atol=0)
    torch.testing.assert_close(sums[:, 1], (g32 / (v.sqrt() + EPS)).square().sum(dim=(1, 2)), rtol=1e-5, atol=0)
    if not dotted:
        _same_rebuild(prod, v_matmul(grads, q, u, x, BETA2, eps=EPS, blocks=loop)[0])


def _column_major(t):
    """``t: (B, d, c)``, the same values with each column's entries adjacent (strides
    ``(d·c, 1, d)``): the optimizer's new ``q`` (a QR's transposed result) and ``y``."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _in_wider(t):
    """``t: (B, d, c)`` as the first ``c`` columns of a stack 5 columns wider, those NaN (row
    stride ``c + 5``)."""
    return torch.cat([t, torch.full((*t.shape[:2], 5), float("nan"), device=DEVICE)], dim=2)[:, :, : t.shape[2]]


def _strided_factors():
    """``_inputs`` at rank 3 with ``q`` column-major and ``u`` in a wider stack, so that neither
    of their strides equals the other's, and new factors laid out alike; also the contiguous
    ``q_new, u_new`` and the reference V."""
    grads, q, u, g32, v = _inputs(2, 21, 35, 3, torch.float32)
    q_new, u_new = torch.randn(2, 21, 4, device=DEVICE), torch.randn(2, 35, 4, device=DEVICE)
    return grads, _column_major(q), _in_wider(u), _column_major(q_new), _in_wider(u_new), q_new, u_new, g32, v


@pytest.mark.parametrize("rebuild", ["loop", "unrolled", "dot"])
def test_products_read_each_factor_by_its_own_strides(rebuild):
    """The products' three rebuilds of V read ``u`` by ``u``'s strides, not ``q``'s: the other
    tests give factors whose strides are equal (both row-major, equally wide), where reading
    one's for the other's goes unseen, though the optimizer's new ``q`` is column-major."""
    from adapprox_kernels.kernels.v_matmul import v_matmul, v_rmatmul

    grads, q, u, *_, v = _strided_factors()
    blocks = _blocks(True)._replace(unroll=16 if rebuild == "unrolled" else 0, dot_from=1 if rebuild == "dot" else 0)
    assert (blocks.rank_unroll(3) > 0, blocks.rank_dot(3) > 0) == (rebuild == "unrolled", rebuild == "dot")
    x, y = torch.randn(2, 35, 6, device=DEVICE), _column_major(torch.randn(2, 21, 6, device=DEVICE))
    prod, sums = v_matmul(grads, q, u, x, BETA2, eps=EPS, blocks=blocks)
    _close(prod, v @ x)
    _close(v_rmatmul(grads, q, u, y, BETA2, blocks=blocks), v.transpose(1, 2) @ y)
    torch.testing.assert_close(sums[:, 0], v.square().sum(dim=(1, 2)), rtol=1e-5, atol=0)


def test_update_passes_read_each_factor_by_its_own_strides():
    """The same for the update, cosine and norms passes, old and new factors (ξ's residual);
    the update pass with zero weights, lr 1 and no momentum or decay writes ``−Upd``."""
    from adapprox_kernels.kernels.apply_update import apply_update
    from adapprox_kernels.kernels.update_cosine import update_cosine_sums
    from adapprox_kernels.kernels.v_norms import v_norms

    grads, q, u, qn, un, q_new, u_new, g32, v = _strided_factors()
    blocks, clip = _blocks(True), _clip(g32, v, 0.5)
    upd = reference.clipped_update(g32, v, EPS, 0.5)
    resid = (v - q_new @ u_new.transpose(1, 2)).square().sum(dim=(1, 2))
    torch.testing.assert_close(v_norms(grads, q, u, BETA2, EPS, qn, un, blocks=blocks)[:, 1], resid, rtol=1e-5, atol=0)
    moms = [torch.randn(21, 35, device=DEVICE) for _ in range(2)]
    avg = 0.8 * torch.stack(moms) + 0.2 * upd
    want = torch.stack([(upd * avg).sum(dim=(1, 2)), upd.square().sum(dim=(1, 2)), avg.square().sum(dim=(1, 2))], 1)
    got = update_cosine_sums(grads, q, u, moms, clip, beta2=BETA2, eps=EPS, beta1=0.8, blocks=blocks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = [torch.zeros(21, 35, device=DEVICE) for _ in range(2)]
    kw = dict(beta2=BETA2, eps=EPS, lr=1.0, beta1=0.0, weight_decay=0.0)
    got = apply_update(grads, q, u, params, None, clip, None, qn, un, blocks=blocks, **kw)
    torch.testing.assert_close(torch.stack(params), -upd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, resid, rtol=1e-5, atol=0)


def test_tf32_rounding_of_the_reference():
    one_ulp = 2.0**-10  # tf32's spacing at 1
    x = torch.tensor([1 + 1.75 * one_ulp, -(1 + 0.5 * one_ulp), 1 + 1.5 * one_ulp, 3.0, 0.0, float("inf")])
    assert reference.tf32_rounded(x, "trunc").tolist() == [1 + one_ulp, -1.0, 1 + one_ulp, 3.0, 0.0, float("inf")]
    # to nearest, ties to the even mantissa: 1 + 0.5 ulp -> 1, 1 + 1.5 ulp -> 1 + 2 ulp
    assert reference.tf32_rounded(x).tolist() == [1 + 2 * one_ulp, -1.0, 1 + 2 * one_ulp, 3.0, 0.0, float("inf")]
    assert reference.tf32_rounded(torch.tensor([float("nan")])).isnan().all()


@pytest.mark.parametrize("transpose", [False, True])
def test_tf32_rn_products_round_both_operands_to_nearest(transpose):
    """``precision="tf32_rn"``: the products of V and the thin matrix rounded to tf32 (nearest),
    as the reference computes them; visibly not the fp32 product."""
    from adapprox_kernels.kernels.v_matmul import v_matmul, v_rmatmul

    grads, q, u, _, v = _inputs(2, 37, 129, 3, torch.float32)
    if transpose:
        y = torch.randn(2, 37, 6, device=DEVICE)
        out = v_rmatmul(grads, q, u, y, BETA2, precision="tf32_rn")
        a, b = v.transpose(1, 2), y
    else:
        x = torch.randn(2, 129, 6, device=DEVICE)
        out, _ = v_matmul(grads, q, u, x, BETA2, eps=EPS, precision="tf32_rn")
        a, b = v, x
    # The kernel's fp32 V may differ from the reference's by an ulp, which can move an entry
    # to the neighbouring tf32 value: a few 1e-6 of the product. tf32 itself moves it ~2e-4,
    # truncating instead of rounding ~8e-4.
    rounded = reference.tf32_rounded(a).double() @ reference.tf32_rounded(b).double()
    _close(out.double(), rounded, rtol=2e-5)
    exact = a.double() @ b.double()
    assert ((out.double() - exact).abs().max() / exact.abs().max()).item() > 5e-5


@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms(dtype, small):
    from adapprox_kernels.kernels.v_norms import v_norms

    grads, q, u, g32, v = _inputs(2, 37, 29, 3, dtype)
    q_new = torch.randn(2, 37, 18, device=DEVICE)
    u_new = torch.randn(2, 29, 18, device=DEVICE)
    sums = v_norms(grads, q, u, BETA2, EPS, q_new, u_new, blocks=_blocks(small))
    expected = torch.stack(
        [
            v.square().sum(dim=(1, 2)),
            (v - q_new @ u_new.transpose(1, 2)).square().sum(dim=(1, 2)),
            (g32 / (v.sqrt() + EPS)).square().sum(dim=(1, 2)),
        ],
        dim=1,
    )
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(v_norms(grads, q, u, BETA2, EPS)[:, [0, 2]], expected[:, [0, 2]], rtol=1e-5, atol=0)


def test_update_sum_with_eps_zero_leaves_the_padding_out():
    """ε = 0 (the launchers take it; the optimizer asks for ε > 0): a ragged tile's padding,
    G = V = 0 there, adds nothing to ``Σ (G/√V)²`` instead of 0/0 = NaN (``_tiles.raw_update``'s
    mask); inside the matrix V > 0."""
    from adapprox_kernels.kernels.v_norms import v_norms

    grads, q, u, g32, v = _inputs(2, 37, 29, 3, torch.float32)
    sums = v_norms(grads, q, u, BETA2, 0.0, blocks=_blocks(True))[:, 2]
    torch.testing.assert_close(sums, (g32 / v.sqrt()).square().sum(dim=(1, 2)), rtol=1e-5, atol=0)


def _clip(g32, v, threshold):
    upd = g32 / (v.sqrt() + EPS)
    return reference.clip_divisor(upd.flatten(1).square().sum(dim=1), upd[0].numel(), threshold)


# k = 1: the JIT makes an int argument equal to 1 a constant, a kernel of its own on a GPU
@pytest.mark.parametrize("shape,k", [((37, 29), 2), ((1, 20), 2), ((20, 1), 2), ((37, 29), 1)])
def test_cosine_sums(shape, k):
    from adapprox_kernels.kernels.update_cosine import update_cosine_sums

    grads, q, u, g32, v = _inputs(2, *shape, k, torch.bfloat16)
    moms = [torch.randn(*shape).to(torch.bfloat16).to(DEVICE) for _ in range(2)]
    clip = _clip(g32, v, 0.5)
    sums = update_cosine_sums(grads, q, u, moms, clip, beta2=BETA2, eps=EPS, beta1=0.8, blocks=_blocks(True))
    upd = reference.clipped_update(g32, v, EPS, 0.5)
    avg = 0.8 * torch.stack([m.float() for m in moms]) + 0.2 * upd
    expected = torch.stack([(upd * avg).sum(dim=(1, 2)), upd.square().sum(dim=(1, 2)), avg.square().sum(dim=(1, 2))], 1)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-6)


# Tolerances for the written weights/momentum: fp32 to rounding; bf16/fp16 may differ by one
# unit in the last place where the fp32 value sits on a rounding boundary.
WRITE_TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2**-8, 1e-6), torch.float16: (2**-10, 1e-6)}


@pytest.mark.parametrize(
    "dtype,momentum,cosine,residual,shape",
    [
        (torch.float32, True, True, True, (37, 29)),
        (torch.bfloat16, True, False, True, (37, 29)),
        (torch.float16, False, False, False, (37, 29)),
        (torch.bfloat16, False, True, True, (1, 20)),
        (torch.float32, True, False, True, (20, 1)),
    ],
)
def test_apply_update(dtype, momentum, cosine, residual, shape):
    from adapprox_kernels.kernels.apply_update import apply_update

    grads, q, u, g32, v = _inputs(2, *shape, 2, dtype)
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(*shape, generator=gen).to(dtype).to(DEVICE) for _ in range(2)]
    moms = [torch.randn(*shape, generator=gen).to(dtype).to(DEVICE) for _ in range(2)] if momentum else None
    ref_params = [p.clone() for p in params]
    ref_moms = [m.clone() for m in moms] if momentum else None
    clip = _clip(g32, v, 0.5)
    scale = torch.tensor([1.0, 1.7], device=DEVICE) if cosine else None
    q_new, u_new = (torch.randn(2, shape[0], 3, device=DEVICE), torch.randn(2, shape[1], 3, device=DEVICE))
    kw = dict(beta2=BETA2, eps=EPS, lr=0.1, beta1=0.8 if momentum else 0.0, weight_decay=0.1)
    resid = apply_update(
        grads, q, u, params, moms, clip, scale, *((q_new, u_new) if residual else ()), blocks=_blocks(True), **kw
    )

    # Reference: lines 345–349 with the same per-matrix factor in place of the cosine factor.
    upd = reference.clipped_update(g32, v, EPS, 0.5)
    avg = torch.stack([m.float() for m in ref_moms]).mul_(0.8).add_(upd, alpha=0.2) if momentum else upd
    for m, new in zip(ref_moms or [], avg):
        m.copy_(new)
    step = avg * scale.view(-1, 1, 1) if cosine else avg
    for p, s in zip(ref_params, step):
        p.copy_(p.float().mul_(1 - 0.1 * 0.1).add_(s, alpha=-0.1))
    rtol, atol = WRITE_TOL[dtype]
    for got, want in zip(params + (moms or []), ref_params + (ref_moms or [])):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
        if dtype != torch.float32:  # round-to-nearest-even like PyTorch, not truncation
            assert (got != want).float().mean().item() < 0.01
    if residual:
        expected = (v - q_new @ u_new.transpose(1, 2)).square().sum(dim=(1, 2))
        torch.testing.assert_close(resid, expected, rtol=1e-5, atol=0)
    else:
        assert resid is None


@pytest.mark.parametrize(
    "dtype,momentum,shape,transposed",
    [
        (torch.float32, True, (37, 29), False),
        (torch.bfloat16, True, (1, 20), False),  # a vector: one row
        (torch.float16, False, (20, 33), True),  # V, W and M non-contiguous: staged and written back
        (torch.float32, False, (1, 1), False),
        (torch.float32, True, (2, 5, 9), False),  # any shape: read flat
    ],
)
def test_dense_moment(dtype, momentum, shape, transposed):
    """The dense buckets' two passes against the reference: the sums leave V alone, the update
    writes V_t, M and W (several blocks per tensor, a partial last one)."""
    from adapprox_kernels.kernels.dense_moment import dense_apply, dense_sums

    gen = torch.Generator().manual_seed(5)

    def matrices(dt, positive=False):
        out = [torch.randn(*(shape[::-1] if transposed else shape), generator=gen) for _ in range(3)]
        out = [(x.abs() if positive else x).to(dt).to(DEVICE) for x in out]
        return [x.t() for x in out] if transposed else out

    grads = [g.contiguous() for g in matrices(dtype)]
    grads[1][0, 0] = 0.0  # V = 0 where G = 0 and V_{t−1} = 0: ε keeps the update finite
    sqs = matrices(torch.float32, positive=True)
    sqs[1][0, 0] = 0.0
    params, moms = matrices(dtype), matrices(dtype) if momentum else None
    want_v = torch.stack([s.clone() for s in sqs])
    g32 = torch.stack([g.float() for g in grads])
    want_v.mul_(BETA2).addcmul_(g32, g32, value=1 - BETA2)
    ref_params, ref_moms = [p.clone() for p in params], [m.clone() for m in moms] if momentum else None

    sums = dense_sums(grads, sqs, BETA2, EPS, block=16)
    upd = g32 / (want_v.sqrt() + EPS)
    want_sums = torch.stack([want_v.flatten(1).square().sum(dim=1), upd.flatten(1).square().sum(dim=1)], dim=1)
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=0)
    clip = _clip(g32, want_v, 0.5)
    kw = dict(beta2=BETA2, eps=EPS, lr=0.1, beta1=0.8 if momentum else 0.0, weight_decay=0.1)
    dense_apply(grads, sqs, params, moms, clip, block=16, **kw)

    upd = reference.clipped_update(g32, want_v, EPS, 0.5)
    avg = torch.stack([m.float() for m in ref_moms]).mul_(0.8).add_(upd, alpha=0.2) if momentum else upd
    for m, new in zip(ref_moms or [], avg):
        m.copy_(new)
    for p, s in zip(ref_params, avg):
        p.copy_(p.float().mul_(1 - 0.1 * 0.1).add_(s, alpha=-0.1))
    torch.testing.assert_close(torch.stack(sqs), want_v, rtol=1e-6, atol=0)
    rtol, atol = WRITE_TOL[dtype]
    for got, want in zip(params + (moms or []), ref_params + (ref_moms or [])):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


def test_batches_past_the_grid_limit_take_several_launches(monkeypatch):
    """A CUDA grid's second and third axes take at most 65,535 programs, fewer than the matrices
    one bucket may hold (an MoE's experts), and every pass puts the matrix index on one of
    them. With that limit made 2, each pass over 3 matrices launches 2 and then 1, and gives
    the bits of one launch over all 3."""
    from adapprox_kernels.kernels import _launch
    from adapprox_kernels.kernels.apply_update import apply_update
    from adapprox_kernels.kernels.dense_moment import dense_apply, dense_sums
    from adapprox_kernels.kernels.update_cosine import update_cosine_sums
    from adapprox_kernels.kernels.v_matmul import _v_matmul_kernel, v_matmul, v_rmatmul
    from adapprox_kernels.kernels.v_norms import v_norms

    grads, q, u, g32, v = _inputs(3, 18, 33, 2, torch.float32)
    x, y = torch.randn(3, 33, 3, device=DEVICE), torch.randn(3, 18, 3, device=DEVICE)
    clip = _clip(g32, v, 0.5)
    flat = [g.flatten() for g in grads]
    kw = dict(beta2=BETA2, eps=EPS, lr=0.1, beta1=0.8, weight_decay=0.0)
    blocks = _blocks(True)

    def every_pass():
        moms, params, dense_params = [g.clone() for g in grads], [g.clone() for g in grads], [g.clone() for g in flat]
        sqs = [g.square() for g in flat]
        return [
            *v_matmul(grads, q, u, x, BETA2, eps=EPS, blocks=blocks, split=2),
            v_rmatmul(grads, q, u, y, BETA2, blocks=blocks, split=2),
            v_norms(grads, q, u, BETA2, EPS, q, u, blocks=blocks),
            update_cosine_sums(grads, q, u, moms, clip, beta2=BETA2, eps=EPS, beta1=0.8, blocks=blocks),
            apply_update(grads, q, u, params, moms, clip, blocks=blocks, **kw),
            *params,
            *moms,
            dense_sums(flat, sqs, BETA2, EPS, block=16),
            dense_apply(flat, sqs, dense_params, None, clip, block=16, **kw),
            *dense_params,
            *sqs,
        ]

    whole = every_pass()
    launches = []
    kernel_class = type(_v_matmul_kernel)  # the interpreter's or the JIT's: both launch through run()
    run = kernel_class.run

    def recording(self, *args, grid, **kwargs):
        launches.append(tuple(grid))
        return run(self, *args, grid=grid, **kwargs)

    monkeypatch.setattr(kernel_class, "run", recording)
    monkeypatch.setattr(_launch, "MAX_GRID_AXIS", 2)
    chunked = every_pass()
    assert len(launches) == 2 * 7 and [grid[-1] for grid in launches] == [2, 1] * 7, launches
    for a, b in zip(whole, chunked):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("bad_clip", [float("nan"), float("inf")])
def test_update_passes_write_nothing_where_the_clip_is_not_finite(dense, bad_clip):
    """The gate the optimizer launches its updates behind: matrix 0, with a NaN gradient entry
    and a non-finite clip divisor, keeps its W, M (and dense V) bit for bit; matrix 1 gets the
    same bits as in a launch where nothing was wrong."""
    from adapprox_kernels.kernels.apply_update import apply_update
    from adapprox_kernels.kernels.dense_moment import dense_apply

    grads, q, u, _, _ = _inputs(2, 19, 23, 2, torch.float32)
    gen = torch.Generator().manual_seed(3)

    def tensors():
        return [torch.randn(19, 23, generator=gen).to(DEVICE) for _ in range(2)]

    params, moms, sqs = tensors(), tensors(), [t.abs() for t in tensors()]
    kw = dict(beta2=BETA2, eps=EPS, lr=0.1, beta1=0.8, weight_decay=0.1)

    def launch(grads, clip):
        ps, ms, vs = [p.clone() for p in params], [m.clone() for m in moms], [v.clone() for v in sqs]
        if dense:
            dense_apply(grads, vs, ps, ms, clip, block=64, **kw)
        else:
            apply_update(grads, q, u, ps, ms, clip, blocks=_blocks(True), **kw)
        return ps, ms, vs

    clean = launch(grads, torch.tensor([1.0, 1.3], device=DEVICE))
    bad = [g.clone() for g in grads]
    bad[0][4, 5] = float("nan")
    gated = launch(bad, torch.tensor([bad_clip, 1.3], device=DEVICE))
    for name, want_all, got_all, before in zip(("W", "M", "V"), clean, gated, (params, moms, sqs)):
        assert torch.equal(got_all[0], before[0]), f"{name} of the gated matrix was written"
        assert torch.equal(got_all[1], want_all[1]), f"{name} of the other matrix differs"
        if name != "V" or dense:
            assert not torch.equal(got_all[1], before[1]), f"{name} of the other matrix was not written"


try:  # the autouse fixture skips every test of the module without triton
    import triton
    import triton.language as tl

    from adapprox_kernels.kernels import _tiles
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _hash32_kernel(x_ptr, out_ptr, key_ptr, seed_ptr, N, BLOCK: tl.constexpr):
        """``_tiles.hash32`` of int64 values in ``[0, 2³²)`` (read as uint32), and the seed
        ``matrix_seed(keys, b)`` of each program ``b``."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < N, other=0).to(tl.uint32)
        tl.store(out_ptr + offs, _tiles.hash32(x).to(tl.int64), mask=offs < N)
        seed = _tiles.matrix_seed(key_ptr, tl.program_id(0).to(tl.int64), True)
        tl.store(seed_ptr + tl.program_id(0), seed.to(tl.int64))


def test_hash32_matches_the_reference():
    """The kernels' uint32 hash wraps mod 2³² exactly as the reference's int64 one (no
    promotion to int64, a logical shift), extremes included; the seed of matrix ``b`` is
    ``hash32(keys[b])``, keys at the ends of ``[0, 2³²)`` included."""
    gen = torch.Generator().manual_seed(11)
    x = torch.cat([torch.tensor([0, 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]),
                   torch.randint(0, 2**32, (3000,), generator=gen)]).to(DEVICE)  # fmt: skip
    out = torch.full_like(x, -1)
    keys = torch.tensor([2**32 - 2, 2**32 - 1, 0, 123456789], device=DEVICE)
    seeds = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
    block = 1024
    assert x.numel() <= 4 * block
    _hash32_kernel[(4,)](x, out, keys, seeds, x.numel(), BLOCK=block)
    assert torch.equal(out, reference.hash32(x))
    assert torch.equal(seeds, reference.hash32(keys))
    assert len(set(out.tolist())) == len(set(x.tolist()))  # a bijection of uint32


if triton is not None:

    @triton.jit
    def _rounding_kernel(x_ptr, bf16_ptr, tf32_ptr, N, BLOCK: tl.constexpr):
        """``_tiles.round_to`` (to bf16) and ``_tiles.round_to_tf32`` of fp32 values."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
        tl.store(bf16_ptr + offs, _tiles.round_to(x, tl.bfloat16), mask=offs < N)
        tl.store(tf32_ptr + offs, _tiles.round_to_tf32(x), mask=offs < N)


def _exact_ties(low_bits, kept):
    """fp32 values whose ``low_bits`` dropped bits are exactly half an ulp of the kept ones:
    ``kept`` (the upper bits: sign, exponent, mantissa) with even and odd last mantissa bits,
    at 1, large, small and subnormal exponents, both signs; plus neighbours just off the tie."""
    half = 1 << (low_bits - 1)
    bits = [(h << low_bits) | low for h in kept for low in (half, half - 1, half + 1)]
    bits += [b | (1 << 31) for b in bits]
    bits = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32)
    return bits.view(torch.float32).to(DEVICE)


def _round_with_the_kernel(x):
    bf16 = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    tf32 = torch.empty_like(x)
    _rounding_kernel[(1,)](x, bf16, tf32, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return bf16, tf32


def test_round_to_bf16_breaks_exact_ties_to_even():
    """The kernels' fp32 -> bf16 rounding is PyTorch's, bit for bit, at exact ties: 1 + 2⁻⁸
    (even mantissa below) rounds down to 1, 1 + 3·2⁻⁸ (odd below) up to 1 + 2⁻⁶ -- not half up.
    Random data almost never lands on a tie."""
    # upper 16 bits: 1 and 1 + 2⁻⁷, 2¹⁰⁰ and 2¹⁰⁰·(1 + 3·2⁻⁷), 2⁻¹⁰⁰ and next, subnormals, largest
    x = _exact_ties(16, [0x3F80, 0x3F81, 0x7180, 0x7183, 0x0D80, 0x0D81, 0x0000, 0x0001, 0x7F7E, 0x7F7F])
    bf16, _ = _round_with_the_kernel(x)
    assert torch.equal(bf16.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    bf16, _ = _round_with_the_kernel(torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)], device=DEVICE))
    assert bf16.tolist() == [1.0, 1 + 2**-6, -1.0]


def test_round_to_tf32_breaks_exact_ties_to_even():
    """``_tiles.round_to_tf32`` is ``reference.tf32_rounded`` bit for bit at exact ties:
    1 + 2⁻¹¹ (even mantissa below) rounds down to 1, 1 + 3·2⁻¹¹ (odd below) up to 1 + 2⁻⁹."""
    # upper 19 bits: 1 and 1 + 2⁻¹⁰, 2¹⁰⁰ and 2¹⁰⁰·(1 + 3·2⁻¹⁰), 2⁻¹⁰⁰ and next, subnormals, largest
    x = _exact_ties(13, [0x1FC00, 0x1FC01, 0x38C00, 0x38C03, 0x06C00, 0x06C01, 0x0, 0x1, 0x3FBFE, 0x3FBFF])
    _, tf32 = _round_with_the_kernel(x)
    assert torch.equal(tf32.view(torch.int32), reference.tf32_rounded(x).view(torch.int32))
    _, tf32 = _round_with_the_kernel(torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11)], device=DEVICE))
    assert tf32.tolist() == [1.0, 1 + 2**-9, -1.0]


def _bf16_start(shape, batch, seed, special=False):
    """``batch`` fp32 tensors of bf16 values (a bf16 copy holds them exactly); ``special``: an
    inf and a -inf among them (which stochastic rounding keeps)."""
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(*shape, generator=gen).to(torch.bfloat16).float() for _ in range(batch)]
    if special:
        out[0].view(-1)[0], out[-1].view(-1)[-1] = float("inf"), float("-inf")
    return out


def _assert_stochastic_rounding(run, starts, keys):
    """``run(params, keys)`` steps ``params`` in place. With bf16 params and ``keys`` (one per
    matrix) the result is ``reference.stochastic_round_bf16`` of what fp32 params from the same
    values become, bit for bit; without keys, their round to nearest even; fp32 params ignore
    the keys."""
    f32 = [p.clone().to(DEVICE) for p in starts]
    run(f32, None)
    new = torch.stack(f32)
    f32_key = [p.clone().to(DEVICE) for p in starts]
    run(f32_key, torch.tensor(keys, device=DEVICE))
    assert torch.equal(torch.stack(f32_key), new), "fp32 weights must ignore the rounding keys"

    def bf16(rounding_keys):
        ps = [p.to(torch.bfloat16).to(DEVICE) for p in starts]
        run(ps, rounding_keys)
        return torch.stack(ps)

    got = bf16(torch.tensor(keys, device=DEVICE))
    want = reference.stochastic_round_bf16(new, keys).to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (got != want).sum()
    nearest = new.to(torch.bfloat16)
    assert torch.equal(bf16(None).view(torch.int16), nearest.view(torch.int16))
    finite = new.isfinite()
    if finite.sum() >= 300:  # it does round at random: away from nearest with probability 1/4 on average
        assert 0.15 < (got != nearest)[finite].float().mean().item() < 0.35
    assert torch.equal(got[~finite], nearest[~finite])


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("shape,keys", [((37, 129), [2**32 - 1, 0]), ((1, 130), [123456789, 5, 2**31])])
def test_apply_update_stochastic_rounding(shape, keys, momentum):
    """Stochastic rounding of bf16 weights in the update pass: the noise of element ``(i, j)``
    of matrix ``b`` is ``hash32(hash32(keys[b]) + i·n + j)`` (the sum wraps mod 2³²)."""
    batch = len(keys)
    from adapprox_kernels.kernels.apply_update import apply_update

    grads, q, u, g32, v = _inputs(batch, *shape, 2, torch.float32, seed=2)
    clip = _clip(g32, v, 0.5)
    moms = [torch.randn(*shape, device=DEVICE) for _ in range(batch)] if momentum else None
    kw = dict(beta2=BETA2, eps=EPS, lr=0.1, beta1=0.8 if momentum else 0.0, weight_decay=0.1)
    scale = torch.linspace(1.0, 1.5, batch, device=DEVICE)

    def run(params, rounding_keys):
        ms = [m.clone() for m in moms] if momentum else None
        apply_update(grads, q, u, params, ms, clip, scale, blocks=_blocks(True), rounding_keys=rounding_keys, **kw)

    _assert_stochastic_rounding(run, _bf16_start(shape, batch, 4, special=True), keys)


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 50)])
def test_dense_apply_stochastic_rounding(shape, momentum):
    """The same in the dense pass, whose counter is the element's flat offset (several blocks
    per tensor, a partial last one)."""
    from adapprox_kernels.kernels.dense_moment import dense_apply

    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(*shape, generator=gen).to(DEVICE) for _ in range(3)]
    sqs = [torch.rand(*shape, generator=gen).to(DEVICE) for _ in range(3)]
    moms = [torch.randn(*shape, generator=gen).to(DEVICE) for _ in range(3)] if momentum else None
    clip = torch.tensor([1.0, 1.2, 2.0], device=DEVICE)
    kw = dict(beta2=BETA2, eps=EPS, lr=0.1, beta1=0.8 if momentum else 0.0, weight_decay=0.1)

    def run(params, rounding_keys):
        ms = [m.clone() for m in moms] if momentum else None
        dense_apply(grads, [v.clone() for v in sqs], params, ms, clip, block=16, rounding_keys=rounding_keys, **kw)

    _assert_stochastic_rounding(run, _bf16_start(shape, 3, 8, special=len(shape) > 1), [2**31 + 5, 7, 2**32 - 2])


@pytest.mark.parametrize("dense", [False, True])
def test_bad_rounding_keys(dense):
    from adapprox_kernels.kernels.apply_update import apply_update
    from adapprox_kernels.kernels.dense_moment import dense_apply

    grads, q, u, _, _ = _inputs(2, 6, 5, 1, torch.float32)
    params = [g.to(torch.bfloat16) for g in grads]
    kw = dict(beta2=BETA2, eps=EPS, lr=0.1, beta1=0.0, weight_decay=0.0)
    bads = (
        torch.tensor([3, 4], dtype=torch.int32),
        torch.tensor([3.0, 4.0]),
        torch.tensor([1]),
        torch.tensor([1, 2, 3]),
    )
    for bad in (*bads, torch.tensor(3), 3, [3, 4]):
        bad = bad.to(DEVICE) if torch.is_tensor(bad) else bad
        with pytest.raises(ValueError, match="rounding_keys: expected an int64 \\(2,\\) tensor"):
            if dense:
                sqs = [torch.ones(6, 5, device=DEVICE) for _ in range(2)]
                dense_apply(grads, sqs, params, None, torch.ones(2, device=DEVICE), rounding_keys=bad, **kw)
            else:
                apply_update(grads, q, u, params, None, torch.ones(2, device=DEVICE), rounding_keys=bad, **kw)


def test_dense_moment_errors():
    from adapprox_kernels.kernels.dense_moment import dense_apply, dense_sums

    grads = [torch.randn(3, 4, device=DEVICE) for _ in range(2)]
    with pytest.raises(ValueError, match="float32"):
        dense_sums(grads, [torch.ones(3, 4, device=DEVICE, dtype=torch.bfloat16)] * 2, BETA2, EPS)
    with pytest.raises(ValueError, match="exp_avg_sqs: need 2"):
        dense_sums(grads, [torch.ones(3, 4, device=DEVICE)], BETA2, EPS)
    with pytest.raises(ValueError, match="params: need 2"):
        sqs, params = [torch.ones(3, 4, device=DEVICE) for _ in range(2)], [torch.ones(4, 3, device=DEVICE)] * 2
        kw = dict(beta2=BETA2, eps=EPS, lr=0.1, beta1=0.0, weight_decay=0.0)
        dense_apply(grads, sqs, params, None, torch.ones(2, device=DEVICE), **kw)


def test_apply_update_writes_non_contiguous_params():
    """A transposed-view parameter is staged and copied back, not silently dropped."""
    from adapprox_kernels.kernels.apply_update import apply_update

    grads, q, u, g32, v = _inputs(2, 9, 5, 1, torch.float32)
    params = [torch.randn(5, 9, device=DEVICE).t(), torch.randn(9, 5, device=DEVICE)]
    before = [p.clone() for p in params]
    clip = torch.ones(2, device=DEVICE)
    apply_update(grads, q, u, params, None, clip, beta2=BETA2, eps=EPS, lr=0.1, beta1=0.0, weight_decay=0.0)
    upd = g32 / (v.sqrt() + EPS)
    for p, b, d in zip(params, before, upd):
        torch.testing.assert_close(p, b - 0.1 * d, rtol=1e-6, atol=1e-6)


def test_strided_per_matrix_vectors_are_read_as_their_entries():
    """``clip``, ``scale``, ``scalars`` and ``rounding_keys`` given as strided views (a column of
    the ``(B, 2)`` sums a pass returns, ``sums[:, 1]``) step as their contiguous copies: the
    kernels read entry ``b`` at ``x + b``, and such a view's entry 1 was read from another
    column (matrix 1 stepped with the wrong clip divisor, silently)."""
    from adapprox_kernels.kernels.apply_update import apply_update
    from adapprox_kernels.kernels.dense_moment import dense_apply
    from adapprox_kernels.kernels.update_cosine import update_cosine_sums

    grads, q, u, _, _ = _inputs(2, 9, 5, 1, torch.bfloat16)

    def column(values, dtype=torch.float32):  # a (len,) view of stride 2
        return torch.tensor([[v, 1e3] for v in values], dtype=dtype, device=DEVICE)[:, 0]

    strided = dict(clip=column([1.0, 2.0]), scale=column([1.0, 1.5]), scalars=column([0.1, 0.99, 0.9, 0.1]),
                   keys=column([3, 5], torch.int64))  # fmt: skip
    kw = dict(beta2=BETA2, eps=EPS, lr=0.0, beta1=0.0, weight_decay=0.0)
    runs = []
    for vectors in (strided, {k: v.contiguous() for k, v in strided.items()}):
        params = [torch.ones(9, 5, dtype=torch.bfloat16, device=DEVICE) for _ in range(2)]
        moms = [torch.ones(9, 5, device=DEVICE) for _ in range(2)]
        apply_update(grads, q, u, params, moms, vectors["clip"], vectors["scale"], **kw, scalars=vectors["scalars"],
                     rounding_keys=vectors["keys"])  # fmt: skip
        cos = update_cosine_sums(grads, q, u, moms, vectors["clip"], beta2=BETA2, eps=EPS, beta1=0.9,
                                 scalars=vectors["scalars"])  # fmt: skip
        dense = [torch.ones(45, dtype=torch.bfloat16, device=DEVICE) for _ in range(2)]
        sqs = [torch.ones(45, device=DEVICE) for _ in range(2)]
        dense_apply([g.flatten() for g in grads], sqs, dense, None, vectors["clip"], **kw, scalars=vectors["scalars"],
                    rounding_keys=vectors["keys"])  # fmt: skip
        runs.append([*params, *moms, cos, *dense, *sqs])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="a tensor at an odd byte address: torch.frombuffer's host memory")
def test_a_matrix_whose_address_is_off_its_element_size_is_staged():
    """A matrix over foreign memory at an odd byte offset (``torch.frombuffer(..., offset=1)``)
    beside an ordinary one: the table's offsets count whole elements from the first matrix,
    so it was read and written a byte off (garbage in the product, the weight never stepped
    and the bytes around it overwritten); it is staged and written back like a strided one."""
    from adapprox_kernels.kernels.apply_update import apply_update
    from adapprox_kernels.kernels.v_matmul import v_matmul

    def odd(like):
        t = torch.frombuffer(bytearray(4 * like.numel() + 1), dtype=torch.float32, offset=1, count=like.numel())
        assert t.data_ptr() % 4 != 0
        return t.view(like.shape).copy_(like)

    grads, q, u, _, _ = _inputs(2, 6, 5, 1, torch.float32)
    x = torch.randn(2, 5, 3)
    assert torch.equal(v_matmul([grads[0], odd(grads[1])], q, u, x, BETA2)[0], v_matmul(grads, q, u, x, BETA2)[0])
    kw = dict(beta2=BETA2, eps=EPS, lr=0.1, beta1=0.0, weight_decay=0.0)
    params, want = [torch.zeros(6, 5), odd(torch.zeros(6, 5))], [torch.zeros(6, 5), torch.zeros(6, 5)]
    for ps in (params, want):
        apply_update(grads, q, u, ps, None, torch.ones(2), **kw)
    assert all(torch.equal(a, b) for a, b in zip(params, want))


def test_launcher_errors():
    from adapprox_kernels.kernels._launch import batch_chunks
    from adapprox_kernels.kernels.apply_update import apply_update
    from adapprox_kernels.kernels.update_cosine import update_cosine_sums
    from adapprox_kernels.kernels.v_matmul import v_matmul

    grads, q, u, _, _ = _inputs(2, 6, 5, 2, torch.float32)
    x = torch.randn(2, 5, 3, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        v_matmul([grads[0], torch.randn(5, 6, device=DEVICE)], q, u, x, BETA2)
    with pytest.raises(ValueError, match="not supported"):
        v_matmul([g.double() for g in grads], q, u, x, BETA2)
    with pytest.raises(ValueError, match="float32"):
        v_matmul(grads, q.double(), u, x, BETA2)
    with pytest.raises(ValueError, match="expected shape"):
        v_matmul(grads, q, u, x[:, :4], BETA2)
    with pytest.raises(ValueError, match="same number of columns"):
        v_matmul(grads, q, u[..., :1], x, BETA2)
    with pytest.raises(ValueError, match="at least one matrix"):
        v_matmul([], q, u, x, BETA2)
    with pytest.raises(ValueError, match="params"):
        apply_update(grads, q, u, [torch.randn(6, 5, device=DEVICE)], None, torch.ones(2, device=DEVICE),
                     beta2=BETA2, eps=EPS, lr=0.1, beta1=0.0, weight_decay=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="both"):
        apply_update(grads, q, u, [g.clone() for g in grads], None, torch.ones(2, device=DEVICE), q_new=q,
                     beta2=BETA2, eps=EPS, lr=0.1, beta1=0.0, weight_decay=0.0)  # fmt: skip
    # A narrower u was read past its rows by the update passes (v_matmul and v_norms checked it).
    with pytest.raises(ValueError, match="same number of columns"):
        apply_update(grads, q, u[..., :1], [g.clone() for g in grads], None, torch.ones(2, device=DEVICE),
                     beta2=BETA2, eps=EPS, lr=0.1, beta1=0.0, weight_decay=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="same number of columns"):
        update_cosine_sums(grads, q, u[..., :1], [g.clone() for g in grads], torch.ones(2, device=DEVICE),
                           beta2=BETA2, eps=EPS, beta1=0.9)  # fmt: skip
    # The checks no test reached: each guards a kernel against reading past a tensor.
    from adapprox_kernels.kernels.v_norms import v_norms

    with pytest.raises(ValueError, match="expected 2-D matrices"):
        v_matmul([g.flatten() for g in grads], q, u, x, BETA2)
    with pytest.raises(ValueError, match="x is on meta, the gradients on"):
        v_matmul(grads, q, u, x.to("meta"), BETA2)
    with pytest.raises(ValueError, match="at least one column"):
        v_matmul(grads, q, u, x[..., :0], BETA2)
    with pytest.raises(ValueError, match="q_new and u_new need the same, nonzero columns, got 2 and 1"):
        v_norms(grads, q, u, BETA2, EPS, q, u[..., :1])
    with pytest.raises(ValueError, match="nonzero columns, got 0 and 0"):
        v_norms(grads, q, u, BETA2, EPS, q[..., :0], u[..., :0])
    with pytest.raises(ValueError, match=r"clip: expected float32 \(2,\)"):
        apply_update(grads, q, u, [g.clone() for g in grads], None, torch.ones(3, device=DEVICE),
                     beta2=BETA2, eps=EPS, lr=0.1, beta1=0.0, weight_decay=0.0)  # fmt: skip
    with pytest.raises(ValueError, match=r"exp_avgs: need 2 matrices \(6, 5\)"):
        update_cosine_sums(grads, q, u, [g.t().clone() for g in grads], torch.ones(2, device=DEVICE),
                           beta2=BETA2, eps=EPS, beta1=0.9)  # fmt: skip
    assert batch_chunks(65_535) == [(0, 65_535)] and batch_chunks(65_536) == [(0, 65_535), (65_535, 1)]


def test_table_offsets_address_each_matrix():
    """``base + offsets[b]`` units of ``align`` elements is matrix ``b``'s address: fp32 views
    8 bytes off 16-byte alignment take 1-element units (in 16-byte units their offsets were
    floored, and the kernels read the wrong bytes), and a table over the same addresses in a
    dtype of another size gets its own cached offsets, not those of the other dtype's units."""
    from adapprox_kernels.kernels._launch import MatrixTable

    def addresses(table):
        unit = table.align * table.base.element_size()
        return [table.base.data_ptr() + o * unit for o in table.offsets.cpu().tolist()]

    buf = torch.zeros(64, device=DEVICE)
    assert buf.data_ptr() % 16 == 0
    eight_off = [buf[0:12].view(3, 4), buf[14:26].view(3, 4)]  # the second 56 bytes in
    fp32 = [buf[1:9].view(2, 4), buf[10:18].view(2, 4)]  # both 4 bytes off: 4-byte units
    bf16 = [t.view(torch.bfloat16) for t in fp32]  # the same addresses: 2-byte units
    for mats in (eight_off, fp32, bf16):
        table = MatrixTable(mats, "grads")
        assert addresses(table) == [t.data_ptr() for t in mats]


def test_launch_sizes_chosen_on_the_host(monkeypatch):
    """Host-side choices the interpreter runs with either way: tiles of at least ``MIN_DOT``
    (tl.dot's minimum on GPUs) and at most their cap, the rebuild by one dot up to
    ``MAX_DOT_RANK`` inclusive, tf32x3 dots from compute capability 8 (A100) on, and a live
    pointer in place of an empty factor (the GPU launcher rejects a null one)."""
    from adapprox_kernels.kernels import _launch

    assert [_launch.pow2_block(s, 64) for s in (0, 1, 16, 17, 64, 200)] == [16, 16, 16, 32, 64, 64]
    top = _launch.MAX_DOT_RANK
    assert [_launch.Blocks(dot_from=4).rank_dot(k) for k in (3, 4, top, top + 1)] == [0, 16, top, 0]
    assert _launch.dot_precision(torch.device("cpu")) == "ieee"
    if torch.version.hip is None:
        for major, want in ((7, "ieee"), (8, "tf32x3"), (9, "tf32x3")):
            monkeypatch.setattr(_launch, "_cuda_props", lambda index, major=major: (132, major))
            assert _launch.dot_precision(torch.device("cuda", 0)) == want
    fallback, factor = torch.zeros(1), torch.zeros(2, 3, 1)
    assert _launch.pointer_arg(torch.zeros(2, 3, 0), fallback) is fallback
    assert _launch.pointer_arg(factor, fallback) is factor


def test_a_step_of_hundreds_of_tables_builds_each_once(monkeypatch):
    """A table's offsets are copied to the device once, then found by their addresses: 300
    tables (a step of 75 dense buckets makes as many) built twice copy 300 times, not 600 (at
    256 entries the cache thrashed, a copy per table per step)."""
    from adapprox_kernels.kernels import _launch

    copies = []
    copy = _launch.to_device_nowait
    monkeypatch.setattr(_launch, "to_device_nowait", lambda t, device: copies.append(1) or copy(t, device))
    _launch._TABLES.clear()
    matrices = [[torch.randn(2, 3, device=DEVICE) for _ in range(2)] for _ in range(300)]
    for _ in range(2):
        for pair in matrices:
            _launch.MatrixTable(pair, "grads")
    assert len(copies) == 300


def test_the_table_cache_is_bounded_in_offsets():
    """Where the matrices with a gradient change every step (routed experts), so do the tables:
    4,096 of them for a 512-matrix bucket held 15 MiB of offsets on the device (and ~77 MiB of
    keys on the host), outside every state count and after the optimizer was deleted."""
    import random

    from adapprox_kernels.kernels import _launch

    _launch._TABLES.clear()
    experts, rng = [torch.randn(2, 2, device=DEVICE) for _ in range(512)], random.Random(0)
    for _ in range(1500):
        _launch.MatrixTable([e for e in experts if rng.random() < 0.95], "grads")
    held = sum(t.numel() for t in _launch._TABLES.values())
    assert held <= 1 << 19, f"{held * 8 / 2**20:.1f} MiB of offsets kept"


def test_operator_matches_reference_operator():
    """TritonSecondMoment through the LinearOperator protocol, as S-RSI sees it."""
    from adapprox_kernels.linear_operator import LinearOperator
    from adapprox_kernels.triton_backend import TritonBackend

    grads, q, u, g32, v = _inputs(2, 21, 17, 2, torch.bfloat16)
    op = TritonBackend.second_moment(grads, q, u, BETA2, eps=EPS)
    ref = reference.ReferenceSecondMoment(g32, q, u, BETA2)
    assert isinstance(op, LinearOperator) and op.shape == ref.shape and op.dtype == torch.float32
    torch.testing.assert_close(op.sq_norm(), ref.sq_norm(), rtol=1e-5, atol=0)  # reduction pass, no product yet
    # The same pass gives the update's RMS numerator Σ (G/(√V+ε))², which apply_step reads.
    want = (g32 / (v.sqrt() + EPS)).square().sum(dim=(1, 2))
    torch.testing.assert_close(op.update_sq_norm(), want, rtol=1e-5, atol=0)
    x, y = torch.randn(2, 17, 4, device=DEVICE), torch.randn(2, 21, 4, device=DEVICE)
    torch.testing.assert_close(op.matmul(x), ref.matmul(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op.rmatmul(y), ref.rmatmul(y), rtol=1e-5, atol=1e-5)
    qn, un = torch.randn(2, 21, 3, device=DEVICE), torch.randn(2, 17, 3, device=DEVICE)
    torch.testing.assert_close(op.residual_sq_norm(qn, un), ref.residual_sq_norm(qn, un), rtol=1e-5, atol=0)


def test_operator_reads_gradients_of_mixed_dtypes_in_fp32():
    """A backend caller's bf16 and fp32 gradients in one batch are staged in fp32, not cast to
    the first one's bf16 (which rounded the fp32 gradient by up to 2⁻⁹ relative)."""
    from adapprox_kernels.triton_backend import TritonBackend

    grads, q, u, _, _ = _inputs(2, 9, 5, 1, torch.float32)
    grads[0] = grads[0].to(torch.bfloat16)
    ref = reference.ReferenceSecondMoment(torch.stack([g.float() for g in grads]), q, u, BETA2)
    op = TritonBackend.second_moment(grads, q, u, BETA2, eps=EPS)
    x = torch.randn(2, 5, 3, device=DEVICE)
    torch.testing.assert_close(op.matmul(x), ref.matmul(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op.sq_norm(), ref.sq_norm(), rtol=1e-5, atol=0)


def test_apply_step_guards_and_cosine_without_momentum():
    """A direct caller of ``TritonBackend.apply_step``: an ``eps`` other than the operator's,
    or ``reduce`` (a row-sharded step) with a non-Triton operator, raise before any write;
    cosine guidance without momentum (``exp_avgs=None``) is off, as on the reference, rather
    than a cosine pass over no momenta."""
    from adapprox_kernels.backends import ReferenceBackend
    from adapprox_kernels.triton_backend import TritonBackend

    grads, q, u, _, _ = _inputs(2, 9, 5, 1, torch.float32)
    kw = dict(clip_threshold=1.0, lr=0.1, beta1=0.0, weight_decay=0.0)
    params = [torch.zeros(9, 5, device=DEVICE) for _ in range(2)]
    op = TritonBackend.second_moment(grads, q, u, BETA2, eps=EPS)
    with pytest.raises(ValueError, match="the operator was built with eps"):
        TritonBackend.apply_step(op, params, None, eps=2 * EPS, cosine_max_scale=None, **kw)
    ref_op = ReferenceBackend.second_moment(grads, q, u, BETA2)
    with pytest.raises(TypeError, match="row-sharded step needs the Triton operator"):
        TritonBackend.apply_step(ref_op, params, None, eps=EPS, cosine_max_scale=None, reduce=lambda t: t, **kw)
    assert all(torch.equal(p, torch.zeros_like(p)) for p in params)
    runs = []
    for cosine_max_scale in (None, 2.0):
        params = [torch.zeros(9, 5, device=DEVICE) for _ in range(2)]
        op = TritonBackend.second_moment(grads, q, u, BETA2, eps=EPS)
        TritonBackend.apply_step(op, params, None, eps=EPS, cosine_max_scale=cosine_max_scale, **kw)
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_opcheck_custom_ops():
    """Schemas, fake (meta) implementations and mutation declarations of every entry point."""
    from adapprox_kernels import triton_backend as tb

    grads, q, u, _, _ = _inputs(2, 5, 7, 2, torch.bfloat16)
    x, y = torch.randn(2, 7, 3, device=DEVICE), torch.randn(2, 5, 3, device=DEVICE)
    qn, un = torch.randn(2, 5, 2, device=DEVICE), torch.randn(2, 7, 2, device=DEVICE)
    params = [torch.randn(5, 7, device=DEVICE).to(torch.bfloat16) for _ in range(2)]
    moms = [torch.randn(5, 7, device=DEVICE) for _ in range(2)]
    clip, scale = torch.ones(2, device=DEVICE), torch.full((2,), 1.5, device=DEVICE)
    keys = torch.tensor([12345, 2**32 - 1], dtype=torch.int64, device=DEVICE)  # bf16 params: stochastic rounding
    scalars = torch.tensor([0.1, 0.99, 0.9, 0.1], device=DEVICE)  # α, 1 − α·λ, β1, 1 − β1 (a traced step's)
    cases = [
        (tb.v_matmul_op, (grads, q, u, x, BETA2, EPS, True)),
        (tb.v_matmul_op, (grads, q, u, x, BETA2, EPS, False)),
        (tb.v_rmatmul_op, (grads, q, u, y, BETA2)),
        (tb.v_norms_op, (grads, q, u, qn, un, BETA2, EPS)),
        (tb.v_norms_op, (grads, q, u, None, None, BETA2, EPS)),
        (tb.update_cosine_sums_op, (grads, q, u, moms, clip, BETA2, EPS, 0.9)),
        (tb.apply_update_op, (grads, q, u, params, moms, clip, scale, qn, un, BETA2, EPS, 0.1, 0.9, 0.1)),
        (tb.apply_update_op, (grads, q, u, params, [], clip, scale, None, None, BETA2, EPS, 0.1, 0.0, 0.0)),
        (tb.apply_update_op, (grads, q, u, params, [], clip, scale, None, None, BETA2, EPS, 0.1, 0.0, 0.0, keys)),
        (
            tb.apply_update_op,
            (grads, q, u, params, moms, clip, scale, qn, un, BETA2, EPS, 0.0, 0.0, 0.0, keys, scalars),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_backend_resolution():
    """Backend ``"auto"`` picks Triton for CUDA tensors only (never the interpreter on CPU); "triton" by
    name runs wherever the kernels can."""
    from adapprox_kernels.triton_backend import TritonBackend

    assert resolve_backend("triton", DEVICE) is TritonBackend
    expected = TritonBackend if DEVICE.type == "cuda" else resolve_backend("reference", DEVICE)
    assert resolve_backend("auto", DEVICE) is expected
    assert TritonBackend.available(torch.device("meta")) is not None


def test_auto_takes_the_backends_in_their_registered_order(monkeypatch):
    """Triton registers ahead of the reference, so "auto" takes it for CUDA tensors where it can
    run (its availability faked here); registering a backend again moves it (``prefer=False``:
    behind the others, not also still ahead); an unknown name is a ValueError."""
    from adapprox_kernels import backends
    from adapprox_kernels.triton_backend import TritonBackend

    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    monkeypatch.setattr(backends, "_PREFERENCE", list(backends._PREFERENCE))
    monkeypatch.setattr(TritonBackend, "available", staticmethod(lambda device: None))
    cuda = torch.device("cuda", 0)
    assert backends.resolve_backend("auto", cuda) is TritonBackend
    backends.register_backend(TritonBackend, prefer=False)
    assert backends.resolve_backend("auto", cuda) is backends.ReferenceBackend
    with pytest.raises(ValueError, match="unknown backend 'fused'"):
        backends.resolve_backend("fused", cuda)


def _run_python(code: str, **env: str) -> None:
    """``code`` in a fresh interpreter (this one's path, one thread, ``env`` added) exits 0."""
    env = {"PYTHONPATH": ":".join(sys.path), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("value", ["true", "ON", "yes"])
def test_interpreter_switch_read_as_triton_reads_it(value):
    """Triton takes TRITON_INTERPRET=true (yes, on) as 1; the backend used to refuse CPU tensors
    then, asking for the variable already set (until the kernels had been imported)."""
    code = (
        "import torch\n"
        "from adapprox_kernels.backends import availability\n"
        "why = availability(torch.device('cpu'))['triton']\n"
        "assert why is None, why\n"
    )
    _run_python(code, TRITON_INTERPRET=value)


def test_interpreter_needs_the_variable_before_triton_is_imported():
    """triton.language's own jitted functions (``tl.sum``) are decorated when triton is first
    imported: set later, TRITON_INTERPRET does not make the kernels run on CPU, and the
    backend says so rather than failing inside a kernel. And importing the package (AdaMeM
    included) imports neither triton nor torch._dynamo, so the variable may still be set after
    it, and the import stays quick."""
    code = (
        "import os, sys, torch\n"
        "import adapprox_kernels\n"
        "assert 'triton' not in sys.modules and 'torch._dynamo' not in sys.modules, 'imported at import'\n"
        "import triton.language\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from adapprox_kernels.backends import availability\n"
        "why = availability(torch.device('cpu'))['triton']\n"
        "assert why is not None and 'before triton is first imported' in why, why\n"
    )
    _run_python(code)


def test_kernels_decorated_without_the_interpreter_refuse_cpu_tensors():
    """The variable set when triton was imported (``tl.sum`` interpreted) but unset when the
    kernels were: they are compiled kernels, which cannot take CPU tensors, and the backend
    says so rather than failing inside a kernel."""
    code = (
        "import os, torch\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import triton.language\n"
        "del os.environ['TRITON_INTERPRET']\n"
        "import adapprox_kernels.kernels.v_matmul\n"
        "from adapprox_kernels.backends import availability\n"
        "why = availability(torch.device('cpu'))['triton']\n"
        "assert why is not None and 'Triton interpreter' in why, why\n"
    )
    _run_python(code)


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, adapprox_kernels\n"
        "from adapprox_kernels.backends import availability, resolve_backend\n"
        "why = availability(torch.device('cuda'))['triton']\n"
        "assert why is not None and 'triton' in why, why\n"
        "assert resolve_backend('auto', torch.device('cuda')).name == 'reference'\n"
        "p = torch.nn.Parameter(torch.randn(12, 10)); p.grad = torch.randn(12, 10)\n"
        "adapprox_kernels.Adapprox([p], k_max=2, oversample=1).step()\n"
    )
    _run_python(code)


_HOPPER_PTX = """
import json, re
from bench.kernel_resources import compile_sm90
from adapprox_kernels.kernels.v_matmul import _v_matmul_kernel as fn

out = {}
for precision, round_tf32 in (("tf32x3", False), ("tf32", False), ("tf32", True)):
    consts = dict(G_ALIGN=4, BLOCK_M=64, BLOCK_N=64, BLOCK_R=16, HAS_LOWRANK=True, WITH_NORMS=True,
                  PRECISION=precision, ROUND_TF32=round_tf32, K_UNROLL=0, K_DOT=0, REBUILD_TF32X3=True)
    ptx = compile_sm90(fn, consts).asm["ptx"]
    out[precision + ("_rn" if round_tf32 else "")] = dict(
        rna=len(re.findall(r"cvt\\.rna\\.tf32", ptx)), wgmma=len(re.findall(r"wgmma[^\\n]*tf32", ptx)),
        times_zero=len(re.findall(r"(?:mul|fma)[^\\n]*0f00000000", ptx)),
    )
# V's tiles rebuilt by a tf32x3 dot of 16 factor columns (Blocks.dot_from) at rank 8
consts.update(PRECISION="tf32x3", ROUND_TF32=False, K_DOT=16)
kernel = compile_sm90(fn, consts)
out["rebuild_by_dot"] = dict(
    wgmma=len(re.findall(r"wgmma[^\\n]*tf32", kernel.asm["ptx"])),
    async_copies=kernel.asm["ttgir"].count("async_copy_global_to_local"),
)
# The widest dot rebuild at the default tiles (sketch blocks of 64): the shared memory it needs
from adapprox_kernels.kernels._launch import FIRST_PASS_BLOCKS, MAX_DOT_RANK, PRODUCT_BLOCKS
for name, blocks, norms in (("first_pass", FIRST_PASS_BLOCKS, True), ("product", PRODUCT_BLOCKS, False)):
    blocks = blocks._replace(dot_from=1)
    consts.update(BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_R=blocks.r, WITH_NORMS=norms,
                  K_DOT=blocks.rank_dot(MAX_DOT_RANK))
    out["widest_dot_shared_" + name] = compile_sm90(
        fn, consts, warps=blocks.warps, stages=blocks.stages
    ).metadata.shared
print(json.dumps(out))
"""


def _compile_for_hopper(script: str) -> dict:
    """Runs ``script`` (which compiles kernels for sm_90 and prints a JSON line last) outside
    the interpreter, in a process of its own; skips when triton has no ptxas."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/ imports from there
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, cwd=root)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_no_jitted_helper_has_a_string_default():
    """Triton 3.6 (the GPU machine's) fails to compile a call that leaves out a string-typed
    constexpr default, which the interpreter and 3.8 accept: every default of a jitted function
    in the kernels is a number or a bool (flags as ints)."""
    import inspect

    import triton
    from triton.runtime.interpreter import InterpretedFunction

    from adapprox_kernels import kernels

    # Before Triton 3.6 an interpreted function is no KernelInterface.
    jitted = (triton.runtime.jit.KernelInterface, InterpretedFunction)
    found = 0
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"adapprox_kernels.kernels.{info.name}")
        for name, fn in vars(module).items():
            if isinstance(fn, jitted):  # compiled or interpreted
                found += 1
                for param in inspect.signature(fn.fn).parameters.values():
                    assert not isinstance(param.default, str), f"{info.name}.{name}({param.name}={param.default!r})"
    assert found >= 10


def test_product_kernel_compiles_for_hopper_and_tf32_truncates():
    """The product kernel compiled for sm_90 (no GPU needed: triton's own ptxas), which the
    interpreter cannot show: every precision compiles, and plain tf32 feeds the fp32 operands to
    wgmma unconverted (the hardware then drops their low 13 bits), while tf32x3 rounds
    (cvt.rna) and uses three times the wgmma. ``tf32_rn`` exists because of the former."""
    ptx = _compile_for_hopper(_HOPPER_PTX)
    assert ptx["tf32"]["rna"] == 0 and ptx["tf32_rn"]["rna"] == 0
    assert ptx["tf32x3"]["rna"] > 0 and ptx["tf32x3"]["wgmma"] == 3 * ptx["tf32"]["wgmma"] > 0
    assert ptx["tf32_rn"]["wgmma"] == ptx["tf32"]["wgmma"]
    # The first pass's sums keep raw_update's V·0 (the gradient limit's flag), not folded to 0.
    assert ptx["tf32x3"]["times_zero"] > 0, ptx
    # The dot rebuild adds tf32x3 wgmma for its 16 columns to the product's for the tile's 64
    # (BLOCK_N), and the main loop is pipelined.
    assert ptx["rebuild_by_dot"]["wgmma"] == ptx["tf32x3"]["wgmma"] * (64 + 16) // 64, ptx
    assert ptx["rebuild_by_dot"]["async_copies"] > 0, ptx
    # Blocks.rank_dot stops at MAX_DOT_RANK: one power of two more overflows an H100 block's
    # shared memory (the largest a block can opt in to: 227 KiB)
    assert 0 < ptx["widest_dot_shared_first_pass"] <= 227 * 1024, ptx
    assert 0 < ptx["widest_dot_shared_product"] <= 227 * 1024, ptx


_HOPPER_RANK_ONE = """
import json
from bench.kernel_resources import UNIT_STRIDES, _code, compile_sm90
from adapprox_kernels.kernels._launch import PRODUCT_BLOCKS
from adapprox_kernels.kernels.v_matmul import _v_matmul_kernel as fn

consts = dict(G_ALIGN=4, BLOCK_M=PRODUCT_BLOCKS.m, BLOCK_N=PRODUCT_BLOCKS.n, BLOCK_R=16, HAS_LOWRANK=True,
              WITH_NORMS=False, PRECISION="tf32x3", ROUND_TF32=False, K_UNROLL=0, K_DOT=0, REBUILD_TF32X3=True)
out = {}
# rank k > 1: K an argument; rank 1: the JIT passes an int argument equal to 1 as a constant,
# and so are q's row stride and u's (q: (B, m, 1), u: (B, n, 1))
for name, unit in (("k", UNIT_STRIDES), ("one", UNIT_STRIDES | {"K", "stride_qm", "stride_un"})):
    kernels = [compile_sm90(fn, consts, stages=s, unit=unit) for s in (2, 3)]
    out[name] = dict(
        stages_change_code=_code(kernels[0].asm["ptx"]) != _code(kernels[1].asm["ptx"]),
        async_copies=kernels[0].asm["ttgir"].count("async_copy_global_to_local"),
    )
print(json.dumps(out))
"""


def test_rank_one_products_are_pipelined():
    """Compiled for sm_90: with the rank loop inside the main loop (k > 1) the products are not
    software-pipelined and the stage count does not change their code; at rank 1 the JIT makes
    K a constant, no loop is left, the main loop is pipelined and the stage count does change
    the code (so bench/tune_blocks.py sweeps it there, and its same-code pairs exclude k = 1)."""
    got = _compile_for_hopper(_HOPPER_RANK_ONE)
    assert got["k"] == dict(stages_change_code=False, async_copies=0), got
    assert got["one"]["stages_change_code"] and got["one"]["async_copies"] > 0, got


_HOPPER_ELEMENTWISE = """
import json, re
from bench.kernel_resources import compile_sm90
from adapprox_kernels.kernels import apply_update, dense_moment, update_cosine, v_norms

# the round-to-dtype stores; the stochastic-rounding key (unread unless STOCHASTIC)
HALF = {"g_ptr": "*bf16", "w_ptr": "*bf16", "mom_ptr": "*fp16", "key_ptr": "*i64"}


def ptx(fn, consts):
    return compile_sm90(fn, consts, pointers=HALF).asm["ptx"]


tiles = dict(BLOCK_M=32, BLOCK_N=128, HAS_LOWRANK=True, G_ALIGN=8)
out = {}
for mom in (True, False):
    for sr in (False, True):
        flat = dict(G_ALIGN=8, V_ALIGN=4, W_ALIGN=8, MOM_ALIGN=8, BLOCK=4096, HAS_MOMENTUM=mom, STOCHASTIC=sr)
        code = ptx(dense_moment._dense_apply_kernel, flat)
        out[f"dense_apply_{mom}" + ("_sr" if sr else "")] = dict(
            ld_v4=len(re.findall(r"ld\\.global[^\\n]*\\.v4", code)), ld=len(re.findall(r"ld\\.global", code)),
            st_v=len(re.findall(r"st\\.global[^\\n]*\\.v", code)), st=len(re.findall(r"st\\.global", code)),
        )
        consts = dict(tiles, W_ALIGN=8, MOM_ALIGN=8, HAS_MOMENTUM=mom, WITH_RESIDUAL=True, STOCHASTIC=sr)
        ptx(apply_update._apply_update_kernel, consts)
code = ptx(dense_moment._dense_sums_kernel, dict(G_ALIGN=8, V_ALIGN=4, BLOCK=4096))
out["dense_sums_times_zero"] = len(re.findall(r"(?:mul|fma)[^\\n]*0f00000000", code))
ptx(update_cosine._update_cosine_kernel, dict(tiles, MOM_ALIGN=8))
ptx(v_norms._v_norms_kernel, dict(tiles, WITH_RESIDUAL=True))
print(json.dumps(out))
"""


def test_elementwise_kernels_compile_for_hopper():
    """The update, reduction and dense kernels compiled for sm_90 (bf16 weights, fp16 momenta):
    the interpreter accepts code the compiler does not. The dense update, reading flat blocks,
    loads and stores 16 bytes at a time; its only scalar loads are the table offsets (G, V, W
    and M, or no M), the clip divisor, [α, 1 − αλ] and, with M, [β1, 1 − β1]. The sums pass
    keeps raw_update's ``V·0`` (NaN where V overflowed: the gradient limit's flag), not folded
    to 0. The stochastic-rounding variants (bf16 W) compile too, adding one scalar load (the
    key) and keeping the wide stores."""
    counts = _compile_for_hopper(_HOPPER_ELEMENTWISE)
    assert counts["dense_sums_times_zero"] > 0, counts
    for mom, scalars in ((True, 9), (False, 6)):
        for suffix, extra in (("", 0), ("_sr", 1)):
            c = counts[f"dense_apply_{mom}{suffix}"]
            assert c["ld"] - c["ld_v4"] == scalars + extra and c["ld_v4"] > 0, c
            assert c["st"] == c["st_v"] > 0, c


_HOPPER_RANK_LOOP = """
import collections, json
from bench import kernel_resources as kr, sass_mix

out = {}
for launch in kr.launches("tf32x3"):
    if launch.label != "cosine-guidance sums":
        continue
    b = launch.blocks
    for grad in launch.grads:
        kernel = kr.compile_sm90(launch.fn, launch.consts, pointers={"g_ptr": grad}, warps=b.warps, stages=b.stages,
                                 unit=launch.unit)
        code = sass_mix.parse(sass_mix.sass(kernel))
        (first, last), = sass_mix.loops(code)  # the rank loop, the kernel's only loop
        loads = [args.split(",")[0] for a, op, args in code if first <= a <= last and op.startswith("LDG")]
        out[grad] = dict(loads=len(loads), deepest=max(collections.Counter(loads).values()))
print(json.dumps(out))
"""


def test_cosine_sums_rank_loop_keeps_its_loads_in_flight():
    """The cosine sums' rank loop compiled for sm_90 (fp32 and bf16 G, the default launch):
    each of its factor loads goes to a register of its own, so that an iteration waits for
    one memory latency, not a chain of them. With G's tile loaded before the loop, ptxas
    chained the 18 loads through 7 registers (Triton 3.6; 14 with 3.8): up to 5 loads an
    iteration waited on one another. The H100 ran the 345M MLP group's pass at 60-62% of copy
    where it had 83-84% before bc1af98, the commit that chained them (docs/benchmarks.md)."""
    got = _compile_for_hopper(_HOPPER_RANK_LOOP)
    assert set(got) == {"*fp32", "*bf16"}, got
    for grad, loop in got.items():
        assert loop["loads"] >= 2 and loop["deepest"] == 1, (grad, got)


def test_on_device_switches_to_the_tables_gpu_only_where_it_is_not_current(monkeypatch):
    """Triton launches on the current CUDA device whatever its tensors' device: a launcher
    switches to the matrices' GPU where it is another (a model spread over GPUs, or
    ``model.to("cuda:1")`` without ``torch.cuda.set_device``), and costs nothing elsewhere."""
    import contextlib

    from adapprox_kernels.kernels._launch import on_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    other = on_device(torch.device("cuda", 1))
    assert isinstance(other, torch.cuda.device) and other.idx == 1
    for device in (torch.device("cuda", 0), torch.device("cpu")):
        assert isinstance(on_device(device), contextlib.nullcontext)


def test_every_launch_is_on_the_matrices_device_with_fp_fusion_set(monkeypatch):
    """Each pass launches its kernels inside ``on_device(table.device)`` (see the test above), and
    sets ``enable_fp_fusion`` rather than take Triton's default (which 3.10 turns off, and 3.9
    warns about where a launch leaves it unset)."""
    import contextlib

    from adapprox_kernels.kernels import apply_update, dense_moment, jacobi_eigh, update_cosine, v_matmul, v_norms

    active, launched, fusion = [], [], []

    @contextlib.contextmanager
    def recording_device(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    for module in (apply_update, dense_moment, jacobi_eigh, update_cosine, v_matmul, v_norms):
        monkeypatch.setattr(module, "on_device", recording_device)
    from triton.runtime import interpreter

    # Every launch: JITFunction.run compiled; under the interpreter, GridExecutor.__call__ (triton
    # 3.4's InterpretedFunction has no run method on the class: kernel[grid] makes the executor).
    launcher, name = type(v_matmul._v_matmul_kernel), "run"
    if launcher is interpreter.InterpretedFunction:
        launcher, name = interpreter.GridExecutor, "__call__"
    run = getattr(launcher, name)

    def recording_run(self, *args, **kwargs):
        launched.append(active[-1] if active else None)
        fusion.append(kwargs.get("enable_fp_fusion"))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(launcher, name, recording_run)
    grads, q, u, g32, v = _inputs(2, 5, 7, 2, torch.float32)
    x, y = torch.randn(2, 7, 3, device=DEVICE), torch.randn(2, 5, 3, device=DEVICE)
    clip, flat = _clip(g32, v, 0.5), [g.flatten() for g in grads]
    kw = dict(beta2=BETA2, eps=EPS, lr=0.1, beta1=0.8, weight_decay=0.0)
    v_matmul.v_matmul(grads, q, u, x, BETA2, eps=EPS)
    v_matmul.v_rmatmul(grads, q, u, y, BETA2)
    v_norms.v_norms(grads, q, u, BETA2, EPS)
    update_cosine.update_cosine_sums(grads, q, u, [g.clone() for g in grads], clip, beta2=BETA2, eps=EPS, beta1=0.8)
    apply_update.apply_update(grads, q, u, [g.clone() for g in grads], None, clip, **kw)
    sqs = [g.square() for g in flat]
    dense_moment.dense_sums(flat, sqs, BETA2, EPS)
    dense_moment.dense_apply(flat, sqs, [g.clone() for g in flat], None, clip, **kw)
    jacobi_eigh.jacobi_eigh(x.mT @ x)
    assert launched == [grads[0].device] * 8, launched
    assert fusion == [True] * 8, fusion


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_passes_on_another_gpu_than_the_current_one():
    """Matrices on cuda:1 while cuda:0 is current: the same results as with cuda:1 current
    (before, Triton launched them on cuda:0: refused, or unordered with cuda:1's stream)."""
    from adapprox_kernels.kernels.apply_update import apply_update

    grads, q, u, g32, v = _inputs(2, 37, 129, 3, torch.float32)
    one = torch.device("cuda", 1)
    grads, q, u = [g.to(one) for g in grads], q.to(one), u.to(one)
    clip = _clip(g32, v, 0.5).to(one)
    kw = dict(beta2=BETA2, eps=EPS, lr=0.1, beta1=0.8, weight_decay=0.1)
    results = []
    for current in (1, 0):
        torch.cuda.set_device(current)
        params, moms = [g.clone() for g in grads], [g.clone() for g in grads]
        apply_update(grads, q, u, params, moms, clip, **kw)
        results.append(torch.stack(params + moms))
    torch.cuda.set_device(0)
    assert torch.equal(results[0], results[1])
