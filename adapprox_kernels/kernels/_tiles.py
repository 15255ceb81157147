"""``@triton.jit`` building blocks shared by the kernels: masked tile loads, the rebuilt tile of
V, the clipped-update elements, the weight (and momentum) write, a round-to-nearest-even
store conversion and the optional stochastic rounding of bf16 weights (a counter-based hash:
the same bits as :func:`adapprox_kernels.reference.stochastic_round_bf16`).

Every load of floating-point data is cast to fp32 right after it (the Triton interpreter reads
bf16 wrongly otherwise, and all arithmetic is fp32 anyway). Offsets are int64 so that matrices
with more than 2³¹ elements index correctly.
"""

import triton
import triton.language as tl


@triton.jit
def tile_ptrs(base, rows, cols, stride_r, stride_c):
    """The pointers to ``base[rows, cols]`` (int64 offsets)."""
    return base + rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c


@triton.jit
def inside(rows, cols, n_rows, n_cols):
    """Which entries of the ``rows × cols`` tile lie in an ``n_rows × n_cols`` matrix."""
    return (rows[:, None] < n_rows) & (cols[None, :] < n_cols)


@triton.jit
def load_tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """``base[rows, cols]`` as fp32, zeros outside ``n_rows × n_cols``."""
    ptrs = tile_ptrs(base, rows, cols, stride_r, stride_c)
    return tl.load(ptrs, mask=inside(rows, cols, n_rows, n_cols), other=0.0).to(tl.float32)


@triton.jit
def _add_outer(acc, a_ptrs, b_ptrs, kk, a_mask, b_mask, stride_ak, stride_bk):
    """``acc + A[:, kk] B[:, kk]ᵀ`` (fp32), entries outside the masks read as 0."""
    a = tl.load(a_ptrs + kk * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptrs + kk * stride_bk, mask=b_mask, other=0.0).to(tl.float32)
    return acc + a[:, None] * b[None, :]


@triton.jit
def lowrank_tile(
    a_base, b_base, rows, cols, n_rows, n_cols, K,
    stride_ar, stride_ak, stride_br, stride_bk,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, K_UNROLL: tl.constexpr = 0,
    K_DOT: tl.constexpr = 0, DOT_TF32X3: tl.constexpr = 0,
):  # fmt: skip
    """``(A Bᵀ)[rows, cols]`` for ``A: (n_rows, K)``, ``B: (n_cols, K)`` (fp32), by default one
    outer product per column pair: K FMAs per entry, exact fp32. A plain tf32 dot would round
    every rebuilt entry of V (~1e-3 relative, as large as the default ξ threshold), an error no
    later sum averages out.

    ``K_UNROLL``: 0 loops over K at run time; a power of two ``>= K`` unrolls the loop at
    compile time (columns from K on masked off). A loop left inside the products' main loop
    keeps Triton from software-pipelining that loop (``bench/kernel_resources.py``).

    ``K_DOT``: a power of two ``>= max(K, 16)`` makes the tile one ``tl.dot`` of the
    ``BLOCK_R × K_DOT`` and ``K_DOT × BLOCK_C`` factor tiles (columns from K on read as 0), in
    ``tf32x3`` when ``DOT_TF32X3`` (tensor cores, close to fp32), else ``ieee``: the rebuild no
    longer costs K FMAs per entry, and no loop is left inside the caller's. Overrides
    ``K_UNROLL``. (Flags are ints: Triton 3.6 rejects a string constexpr's default.)"""
    if K_DOT > 0:
        ks = tl.arange(0, K_DOT)
        a = tl.load(
            a_base + rows[:, None].to(tl.int64) * stride_ar + ks[None, :] * stride_ak,
            mask=(rows[:, None] < n_rows) & (ks[None, :] < K), other=0.0,
        ).to(tl.float32)  # fmt: skip
        b_t = tl.load(
            b_base + ks[:, None] * stride_bk + cols[None, :].to(tl.int64) * stride_br,
            mask=(ks[:, None] < K) & (cols[None, :] < n_cols), other=0.0,
        ).to(tl.float32)  # fmt: skip
        if DOT_TF32X3:
            return tl.dot(a, b_t, input_precision="tf32x3")
        return tl.dot(a, b_t, input_precision="ieee")
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    a_ptrs = a_base + rows.to(tl.int64) * stride_ar
    b_ptrs = b_base + cols.to(tl.int64) * stride_br
    a_in, b_in = rows < n_rows, cols < n_cols
    if K_UNROLL > 0:
        for kk in tl.static_range(K_UNROLL):
            # tl.where, not `a_in & (kk < K)`: Triton's interpreter broadcasts the scalar test as
            # int32 data, a mask its 3.9 refuses to load with. sm_90: the same instructions,
            # registers and spills (bench/kernel_resources.py, Triton 3.8 and 3.9).
            a_mask, b_mask = tl.where(kk < K, a_in, False), tl.where(kk < K, b_in, False)
            acc = _add_outer(acc, a_ptrs, b_ptrs, kk, a_mask, b_mask, stride_ak, stride_bk)
    else:
        for kk in range(0, K):
            acc = _add_outer(acc, a_ptrs, b_ptrs, kk, a_in, b_in, stride_ak, stride_bk)
    return acc


@triton.jit
def v_tile(
    g_base, q_base, u_base, rows, cols, M, N, K,
    stride_gm, stride_gn, stride_qm, stride_qk, stride_un, stride_uk,
    beta2, one_minus_beta2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LOWRANK: tl.constexpr, K_UNROLL: tl.constexpr = 0,
    K_DOT: tl.constexpr = 0, DOT_TF32X3: tl.constexpr = 0, G_AFTER_FACTORS: tl.constexpr = 0,
):  # fmt: skip
    """The gradient tile and ``V = β2·relu(Q Uᵀ) + (1−β2)·G²`` on ``rows × cols`` (fp32).

    Out-of-range entries come back as ``G = V = 0``. ``HAS_LOWRANK=False`` (first step,
    ``K = 0``) skips the factors entirely; ``K_UNROLL``, ``K_DOT`` and ``DOT_TF32X3`` as in
    :func:`lowrank_tile`.

    ``G_AFTER_FACTORS``: G's tile is loaded after the rank loop, not before it (the same bits;
    nothing changes without ``HAS_LOWRANK``). With G's tile held across the loop, ptxas may
    chain the loop's factor loads through a few registers to save some: in the cosine sums
    (sm_90, the 345M MLP group's launch) an iteration's loads went through fewer registers
    than loads, several waiting on one another, where all were in flight until bc1af98 changed
    the code after the loop (a static finding, compiled with Triton 3.6 and 3.8: the H100
    measured that pass at 83% of copy at 41e7fb3, before that commit,
    bench/results/bench_step_nvidia-h100-80gb-hbm3_20261122-164823.json, and 62-63% at
    ddf708f, after it, bench/results/ab_passes_h100/, timed only across a range of commits);
    loaded after the loop, all are in flight with both
    (``test_cosine_sums_rank_loop_keeps_its_loads_in_flight``)."""
    if G_AFTER_FACTORS and HAS_LOWRANK:
        qu = lowrank_tile(
            q_base, u_base, rows, cols, M, N, K, stride_qm, stride_qk, stride_un, stride_uk,
            BLOCK_M, BLOCK_N, K_UNROLL, K_DOT, DOT_TF32X3,
        )  # fmt: skip
        g = load_tile(g_base, rows, cols, stride_gm, stride_gn, M, N)
        return g, beta2 * tl.maximum(qu, 0.0) + one_minus_beta2 * (g * g)
    g = load_tile(g_base, rows, cols, stride_gm, stride_gn, M, N)
    v = one_minus_beta2 * (g * g)
    if HAS_LOWRANK:
        qu = lowrank_tile(
            q_base, u_base, rows, cols, M, N, K, stride_qm, stride_qk, stride_un, stride_uk,
            BLOCK_M, BLOCK_N, K_UNROLL, K_DOT, DOT_TF32X3,
        )  # fmt: skip
        v = beta2 * tl.maximum(qu, 0.0) + v
    return g, v


@triton.jit
def program_v_tile(
    g_ptr, g_off_ptr, q_ptr, u_ptr, M, N, K, FIRST,
    stride_gm, stride_gn, stride_qb, stride_qm, stride_qk, stride_ub, stride_un, stride_uk,
    beta2, one_minus_beta2,
    G_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LOWRANK: tl.constexpr,
    G_AFTER_FACTORS: tl.constexpr = 0,
):  # fmt: skip
    """The tile that program ``(tile, b − FIRST)`` of an elementwise pass owns (``FIRST``: the
    launch's first matrix, see ``_launch.batch_chunks``): tile ``tile`` (row-major over
    ``BLOCK_M × BLOCK_N`` tiles) of matrix ``b`` of a table (G at ``g_ptr + offsets[b]·
    G_ALIGN``) and of its stacked factors ``q: (B, M, K)``, ``u: (B, N, K)``.

    Returns ``(tile, tiles, b, rows, cols, G, V)``: ``tiles`` per matrix, ``b`` as int64, G and
    V as in :func:`v_tile` (``G_AFTER_FACTORS`` too)."""
    tile, tiles = tl.program_id(0), tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64) + FIRST
    num_n = tl.cdiv(N, BLOCK_N)
    rows = (tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    g, v = v_tile(
        g_ptr + tl.load(g_off_ptr + b) * G_ALIGN, q_ptr + b * stride_qb, u_ptr + b * stride_ub,
        rows, cols, M, N, K, stride_gm, stride_gn, stride_qm, stride_qk, stride_un, stride_uk,
        beta2, one_minus_beta2, BLOCK_M, BLOCK_N, HAS_LOWRANK, G_AFTER_FACTORS=G_AFTER_FACTORS,
    )  # fmt: skip
    return tile, tiles, b, rows, cols, g, v


@triton.jit
def tile_sum(x):
    """The sum of a 2-D tile, as an fp32 scalar."""
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def residual_sq(
    v, qn_ptr, un_ptr, b, rows, cols, M, N, K_NEW,
    stride_qnb, stride_qnm, stride_qnk, stride_unb, stride_unn, stride_unk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``Σ (V − Q_new U_newᵀ)²`` over a tile of matrix ``b`` (ξ's numerator), for the new factors
    ``qn: (B, M, K_NEW)``, ``un: (B, N, K_NEW)``; V is 0 outside the matrix, and so is the
    product."""
    approx = lowrank_tile(
        qn_ptr + b * stride_qnb, un_ptr + b * stride_unb, rows, cols, M, N, K_NEW,
        stride_qnm, stride_qnk, stride_unn, stride_unk, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    diff = v - approx
    return tile_sum(diff * diff)


@triton.jit
def raw_update(g, v, mask, eps):
    """``G / (√V + ε)`` where ``mask`` holds, 0 elsewhere (so that ε = 0 gives no 0/0 on
    padding). NaN where V overflowed, i.e. G² did (entries above √(fp32 max) ≈ 1.8e19), not
    0: the update's RMS sum then flags the gradient as the optimizer's max-norm check would.
    Any block shape: the helpers from here on serve the 2-D tiles of the factored kernels and
    the flat blocks of the dense ones."""
    return tl.where(mask, g / (tl.sqrt(v) + eps) + v * 0.0, 0.0)  # inf·0 is NaN


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 -> ``DTYPE`` with round-to-nearest-even, also under the interpreter (which
    truncates fp32 -> bf16); the integer form is what PyTorch does, so results match bitwise."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        # NaN payloads could round to inf in the integer form; keep them NaN.
        out = tl.where(x != x, x.to(tl.bfloat16), rounded)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def round_to_tf32(x):
    """fp32 ``x`` rounded to tf32's 10 mantissa bits (nearest, ties to even), kept as fp32, so
    that a tf32 tensor-core dot reads it exactly: on its own the hardware truncates fp32
    operands, a bias of up to 2⁻¹⁰ with one sign over a tile of V ≥ 0. Inf and NaN pass."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0xFFF + ((bits >> 13) & 1)) >> 13) << 13
    return tl.where(tl.abs(x) < float("inf"), bits.to(tl.float32, bitcast=True), x)


@triton.jit
def gated(mask, clip):
    """``mask`` where a matrix's clip divisor is finite, else all false: its update pass writes
    nothing. The divisor (capped at fp32's largest value) is not finite exactly where the
    update's RMS sum is NaN, i.e. where the gradient holds inf or NaN (or entries whose squares
    overflow V: :func:`raw_update`); the optimizer also makes it NaN for every matrix of a step that
    found such a gradient anywhere, so that step's launched updates write nothing."""
    return tl.where(clip * 0.0 == 0.0, mask, False)  # inf·0 and NaN·0 are NaN


@triton.jit
def update_and_average(g, v, mask, eps, clip, mom_ptrs, scalars_ptr, HAS_MOMENTUM: tl.constexpr):
    """The clipped update ``G/(√V+ε) / clip`` and the new momentum of updates
    ``β1·M + (1−β1)·Upd`` (M read at ``mom_ptrs``; the update itself when there is no
    momentum), both fp32, 0 outside ``mask``. β1 and ``1 − β1`` are read from the device
    (``scalars_ptr + 2``, ``+ 3``; see ``transfer.update_scalars``)."""
    upd = raw_update(g, v, mask, eps) / clip
    if HAS_MOMENTUM:
        mom = tl.load(mom_ptrs, mask=mask, other=0.0).to(tl.float32)
        avg = tl.load(scalars_ptr + 2) * mom + tl.load(scalars_ptr + 3) * upd
    else:
        avg = upd
    return upd, avg


@triton.jit
def hash32(x):
    """``reference.hash32`` on a uint32 tensor (Wellons' lowbias32): every product wraps mod
    2³². Both multipliers are below 2³¹, so Triton types them int32 and ``uint32 · int32``
    stays uint32 (a literal of 2³¹ or more would be uint32 too, 2³² or more int64); ``>>`` on
    uint32 is a logical shift."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def matrix_seed(key_ptr, b, STOCHASTIC: tl.constexpr):
    """The stochastic-rounding seed of matrix ``b`` of a launch: ``hash32(key_b)`` (uint32),
    ``key_b`` the int64 at ``key_ptr + b``, each matrix's own key (read from the device, so
    that a captured CUDA graph replays with new ones); 0, ``key_ptr`` unread, unless
    ``STOCHASTIC``."""
    seed = tl.full((), 0, tl.uint32)
    if STOCHASTIC:
        seed = hash32(tl.load(key_ptr + b).to(tl.uint32))
    return seed


@triton.jit
def stochastic_round_bf16(x, noise):
    """fp32 ``x`` rounded to a bfloat16 value at random, still fp32 (low 16 bits zero):
    ``bits(x) + noise``, ``noise`` uint32 in ``[0, 2¹⁶)``, with the low 16 bits cleared; inf and
    NaN unchanged. ``|x|`` rounds away from 0 with probability equal to the part of the gap it
    has covered (the largest finite values may go to inf, as in the reference)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + noise) >> 16) << 16
    return tl.where(tl.abs(x) < float("inf"), bits.to(tl.float32, bitcast=True), x)


@triton.jit
def store_step(
    avg, mask, w_ptrs, mom_ptrs, scalars_ptr, scale, seed, idx,
    HAS_MOMENTUM: tl.constexpr, STOCHASTIC: tl.constexpr = 0,
):  # fmt: skip
    """Writes the new momentum ``avg`` (when kept) and ``W ← W·(1 − α·λ) − α·scale·avg``, each
    rounded to its tensor's dtype. α and ``1 − α·λ`` are read from the device (``scalars_ptr``,
    ``+ 1``), so a captured CUDA graph replays with a new α.

    ``STOCHASTIC`` (set for bf16 weights only): the new fp32 weight is rounded to bf16 at
    random first (:func:`stochastic_round_bf16`, which the store then converts exactly), with
    noise the top 16 bits of ``hash32(seed + idx)`` (mod 2³²); ``seed`` from
    :func:`matrix_seed`, ``idx`` the elements' flat indices within their matrix (int64; any
    shape, as ``avg``). Both are unused otherwise."""
    if HAS_MOMENTUM:
        tl.store(mom_ptrs, round_to(avg, mom_ptrs.dtype.element_ty), mask=mask)
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    new_w = w * tl.load(scalars_ptr + 1) - tl.load(scalars_ptr) * (avg * scale)
    if STOCHASTIC:
        new_w = stochastic_round_bf16(new_w, hash32(seed + idx.to(tl.uint32)) >> 16)
    tl.store(w_ptrs, round_to(new_w, w_ptrs.dtype.element_ty), mask=mask)
