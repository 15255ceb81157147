"""S-RSI / AS-RSI against the truncated SVD and on degenerate matrices."""

import pytest
import torch

from adapprox_kernels import DenseOperator, as_rsi, error_ratio, srsi
from adapprox_kernels.rank_policy import next_rank_step, rank_moment, sigmoid_increment, step_rank_delta
from adapprox_kernels.srsi import gaussian_sketch, rayleigh_ritz, subspace_iteration, truncate_columns


def svd_error(a: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(a.double())
    return (s[k:].square().sum().sqrt() / s.square().sum().sqrt()).item()


def low_rank_plus_noise(m, n, rank, noise, gen=None):
    spectrum = torch.logspace(0, -1, rank)
    a = torch.randn(m, rank, generator=gen) @ torch.diag(spectrum) @ torch.randn(rank, n, generator=gen)
    return a + noise * torch.randn(m, n, generator=gen) * a.std()


@pytest.mark.parametrize("m,n,k", [(96, 80, 8), (64, 150, 4), (200, 40, 16)])
def test_srsi_near_truncated_svd(m, n, k):
    a = low_rank_plus_noise(m, n, rank=k, noise=0.02)
    q, u = srsi(DenseOperator(a), k, oversample=5, iters=5, generator=torch.Generator().manual_seed(1))
    assert q.shape == (1, m, k) and u.shape == (1, n, k)
    torch.testing.assert_close(q[0].T @ q[0], torch.eye(k), atol=1e-5, rtol=0)
    err = error_ratio(DenseOperator(a), q, u).item()
    best = svd_error(a, k)
    assert best * (1 - 1e-6) <= err <= best * 1.03, (err, best)  # fp32 ξ may round just below


def test_error_ratio_matches_explicit_norms():
    a = torch.randn(3, 20, 30)
    q, u = torch.randn(3, 20, 4), torch.randn(3, 30, 4)
    want = torch.linalg.matrix_norm(a - q @ u.transpose(1, 2)) / torch.linalg.matrix_norm(a)
    torch.testing.assert_close(error_ratio(DenseOperator(a), q, u), want)


def test_zero_matrix_never_nan():
    op = DenseOperator(torch.zeros(2, 17, 9))
    q, u, xi, k_next = as_rsi(op, [3, 5], k_min=1, k_max=8, xi_thresh=1e-3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(q).all() and torch.isfinite(u).all()
    assert torch.equal(xi, torch.zeros(2))
    assert k_next == [2, 4]  # ξ = 0 <= threshold: shrink


@pytest.mark.parametrize("shape", [(1, 40), (40, 1), (37, 129), (5, 5)])
def test_rank_one_and_thin_shapes(shape):
    m, n = shape
    a = torch.rand(m, 1) @ torch.rand(1, n)  # exactly rank 1, like an idealized second moment
    q, u = srsi(DenseOperator(a), 4, oversample=5, iters=2, generator=torch.Generator().manual_seed(0))
    assert q.shape[-1] == min(4, m, n)
    assert torch.isfinite(q).all() and torch.isfinite(u).all()
    assert error_ratio(DenseOperator(a), q, u).item() < 1e-5


def test_full_width_is_exact():
    a = torch.randn(12, 30).double()
    q, u = srsi(DenseOperator(a), 12, oversample=5, iters=1)
    torch.testing.assert_close(q[0] @ u[0].T, a)


def test_batched_equals_one_by_one():
    a = torch.randn(4, 33, 21)
    op = DenseOperator(a)
    sketch = gaussian_sketch(op, 6, torch.Generator().manual_seed(3))
    q, u = subspace_iteration(op, sketch, 3)
    for b in range(4):
        qb, ub = subspace_iteration(DenseOperator(a[b]), sketch[b : b + 1], 3)
        torch.testing.assert_close(q[b] @ u[b].T, qb[0] @ ub[0].T, atol=1e-4, rtol=1e-4)


class _RoundedRange(DenseOperator):
    """Products rounded to 8 mantissa bits (bfloat16), except ``project``: S-RSI must use the
    exact one for its last product only."""

    def matmul(self, x):
        return super().matmul(x).bfloat16().float()

    def rmatmul(self, y):
        return super().rmatmul(y).bfloat16().float()

    def project(self, y):
        return super().rmatmul(y)


@pytest.mark.parametrize("iters", [1, 3])
def test_last_product_is_the_operators_projection(iters):
    a = torch.randn(2, 40, 30)
    sketch = torch.randn(2, 30, 6)
    q, u = subspace_iteration(_RoundedRange(a), sketch, iters)
    torch.testing.assert_close(u, DenseOperator(a).rmatmul(q), rtol=0, atol=0)
    q_exact, _ = subspace_iteration(DenseOperator(a), sketch, iters)
    assert (q - q_exact).abs().max() > 0  # the range finder did round


def test_as_rsi_per_matrix_ranks():
    """Matrices of one batch keep their own ranks; ξ of each is measured at its own rank."""
    a = torch.stack([low_rank_plus_noise(40, 50, 2, 0.0), torch.randn(40, 50)])
    op = DenseOperator(a)
    q, u, xi, k_next = as_rsi(op, [2, 6], k_min=1, k_max=20, xi_thresh=1e-3, generator=torch.Generator().manual_seed(0))
    assert q.shape == (2, 40, 11)
    assert xi[0] < 1e-4 < 0.5 < xi[1]
    assert k_next == [1, 7]
    want = error_ratio(DenseOperator(a[1]), q[1:, :, :6], u[1:, :, :6])
    torch.testing.assert_close(xi[1:], want)
    assert truncate_columns(q, [2, 6])[0, :, 2:].abs().max() == 0


def test_as_rsi_caps_the_next_rank_at_the_matrix_size():
    """k_max = 256 on a 10×12 matrix: the rank grows by Δk of min(k_max, m, n) = 10, i.e. 1, to
    9 (it proposed 8 + Δk(256) = 14, more than the matrix has), as the optimizer does."""
    gen = torch.Generator().manual_seed(0)
    op = DenseOperator(torch.randn(1, 10, 12, generator=gen))
    *_, k_next = as_rsi(op, [8], k_min=1, k_max=256, xi_thresh=1e-6, generator=gen)
    assert k_next == [9]


def test_a_nan_xi_keeps_the_rank():
    """Nothing measured: no step of the rule, no sigmoid growth (it raised on int(NaN))."""
    assert next_rank_step(10, float("nan"), 1e-3, 1, 256) == 10
    assert next_rank_step(300, float("nan"), 1e-3, 1, 256) == 256  # still clamped
    assert sigmoid_increment(float("nan"), 8.0, 10.0, 0.5, 0.0) == 0.0


def test_as_rsi_validates():
    with pytest.raises(ValueError, match="one rank per matrix"):
        as_rsi(DenseOperator(torch.randn(2, 5, 5)), [1], k_min=1, k_max=4, xi_thresh=0.1)
    with pytest.raises(ValueError, match="rank must be"):
        srsi(DenseOperator(torch.randn(5, 5)), 0)
    with pytest.raises(ValueError, match="oversample must be >= 0, got -3"):  # returned 1 column for rank 2
        srsi(DenseOperator(torch.randn(6, 5)), 2, oversample=-3)
    with pytest.raises(ValueError, match="oversample must be >= 0, got -3"):
        as_rsi(DenseOperator(torch.randn(6, 5)), [2], k_min=1, k_max=4, xi_thresh=0.1, oversample=-3)
    with pytest.raises(ValueError, match=r"\(B, m, n\) or \(m, n\) tensor, got shape \(5,\)"):
        DenseOperator(torch.randn(5))


def test_step_rule_and_moment():
    assert step_rank_delta(256) == 6 and step_rank_delta(10) == 1
    assert next_rank_step(10, 0.5, 1e-3, 1, 256) == 16
    assert next_rank_step(10, 1e-4, 1e-3, 1, 256) == 4
    assert next_rank_step(10, 1e-3, 1e-3, 1, 256) == 4  # ξ at the threshold is not above it
    assert next_rank_step(3, 1e-4, 1e-3, 1, 256) == 1  # clamped at k_min
    assert next_rank_step(255, 0.5, 1e-3, 1, 256) == 256  # clamped at k_max
    assert rank_moment(100.0, 94, 0.9) == pytest.approx(99.4)


def test_sigmoid_increment_bounded_and_monotone():
    values = [sigmoid_increment(x, 8.0, 10.0, 0.5, 0.0) for x in (0.0, 0.01, 0.3, 0.5, 0.9, 1.0, 5.0)]
    assert values == sorted(values)
    assert max(values) <= 8 and min(values) >= 0
    assert sigmoid_increment(-1e6, 8.0, 10.0, 0.5, 0.0) == 0  # no overflow far below
    assert sigmoid_increment(1.0, 8.0, 10.0, 0.5, 3.0) == 5  # offset φ
    assert sigmoid_increment(1.0, 8.0, 10.0, 0.5, 0.5) == 7.5  # the rank is a float: φ is not truncated


def test_the_column_mask_cache_is_bounded_in_bytes():
    """A mask is B·width bytes and, while a bucket's ranks move, nearly every step adds one:
    the cache (module-wide, outliving the optimizer) held 1,024 of them whatever their size,
    62 MiB of GPU memory after 500 steps of a 512-matrix bucket at k_max = 256."""
    import weakref

    from adapprox_kernels.srsi import column_mask

    b, width, cpu = 2048, 64, torch.device("cpu")
    kept = []
    for k in range(1, 300):  # 299 distinct rank vectors, 128 KiB each: 37 MiB in all
        mask = column_mask((k % width,) * (b - 1) + (k,), width, cpu)
        assert mask[-1, 0].sum() == min(k, width) and mask[0, 0].sum() == k % width
        kept.append(weakref.ref(mask))
    del mask
    held = sum(m.numel() for m in (ref() for ref in kept) if m is not None)
    assert held <= 16 << 20, f"{held / 2**20:.1f} MiB of column masks kept"


def test_the_constant_caches_serve_two_threads():
    """The device-constant caches (matrix tables, column masks) are shared by every optimizer
    of the process. Two threads stepping optimizers of their own: one evicted the entry that
    the other's lookup had just found, before the lookup marked it used (KeyError), and
    their updates of the element count were lost. Made deterministic here: the other thread
    may run at the moment between the two."""
    import threading
    from collections import OrderedDict

    from adapprox_kernels.transfer import ConstantCache

    inside, evicted = threading.Event(), threading.Event()

    class Pausing(OrderedDict):
        def get(self, key, default=None):
            value = super().get(key, default)
            inside.set()
            evicted.wait(timeout=0.5)  # with the lock the other thread cannot evict before the lookup ends
            return value

    cache = ConstantCache(max_entries=1, max_elements=1 << 20)
    cache.put("first", torch.zeros(3))
    cache._values = Pausing(cache._values)
    errors = []

    def evict():
        inside.wait(timeout=5)
        try:
            cache.put("other", torch.zeros(5))
        except Exception as err:  # noqa: BLE001 - the test asserts there is none, whatever it is
            errors.append(err)
        evicted.set()

    thread = threading.Thread(target=evict)
    thread.start()
    try:
        found = cache.get("first")
    finally:
        inside.set()
        thread.join()
    assert not errors and found is not None and found.numel() == 3
    assert len(cache) == 1 and cache._elements == 5 == sum(v.numel() for v in cache.values())
    cache.put("other", torch.zeros(2))  # made again meanwhile by another thread: counted once
    assert len(cache) == 1 and cache._elements == 2


def test_the_constant_cache_drops_the_least_recently_used_within_its_bounds():
    """A lookup makes an entry the most recently used; a put evicts the least recently used
    while the count or the elements exceed their bounds (reaching them is allowed), but never
    the entry it just put, however large (it would be made again at every call)."""
    from adapprox_kernels.transfer import ConstantCache

    cache = ConstantCache(max_entries=2, max_elements=4)
    cache.put("a", torch.zeros(2))
    cache.put("b", torch.zeros(2))  # 4 elements: at the bound, both stay
    assert sorted(cache._values) == ["a", "b"]
    assert cache.get("a") is not None
    cache.put("c", torch.zeros(1))  # three entries: b, the least recently used, goes
    assert sorted(cache._values) == ["a", "c"]
    cache.put("big", torch.zeros(9))  # over both bounds alone: kept, the others go
    assert list(cache._values) == ["big"] and cache.get("big") is not None


@pytest.mark.parametrize("iters", [1, 2])
def test_rayleigh_ritz_truncation_is_the_best_rank_k_part_of_the_sketch(iters):
    """On the same sketch, the Rayleigh–Ritz factors are the SVD oracle's: the best rank-k
    approximation of Q Qᵀ A (an SVD of Qᵀ A); Q stays orthonormal, Q Uᵀ is unchanged at full
    width, and ξ is never above the first-k-QR-columns one (measurably below it here, where one
    iteration leaves the leading QR columns short of the top singular vectors)."""
    gen = torch.Generator().manual_seed(3)
    a = torch.stack([low_rank_plus_noise(120, 90, rank=24, noise=0.05, gen=gen) for _ in range(3)])
    op, k = DenseOperator(a), 6
    q, u = subspace_iteration(op, gaussian_sketch(op, k + 5, torch.Generator().manual_seed(0)), iters)
    q2, u2 = rayleigh_ritz(q, u)
    torch.testing.assert_close(q2.mT @ q2, torch.eye(k + 5).expand(3, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(q2 @ u2.mT, q @ u.mT, atol=1e-4 * a.abs().max().item(), rtol=0)
    # the oracle, in float64: the top-k left singular vectors of Qᵀ A within range(Q)
    qd = q.double()
    svd = torch.linalg.svd(qd.mT @ a.double(), full_matrices=False)
    qo = qd @ svd.U[..., :k]
    oracle = qo @ (qo.mT @ a.double())
    torch.testing.assert_close(
        (q2[..., :k] @ u2[..., :k].mT).double(), oracle, atol=1e-4 * a.abs().max().item(), rtol=0
    )
    xi_qr = error_ratio(op, q[..., :k], u[..., :k])
    xi_rr = error_ratio(op, q2[..., :k], u2[..., :k])
    best = torch.tensor([svd_error(x, k) for x in a])
    assert (xi_rr <= xi_qr * (1 + 1e-5)).all(), (xi_rr, xi_qr)
    assert (xi_rr >= best * (1 - 1e-5)).all()
    if iters == 1:
        assert (xi_rr < 0.97 * xi_qr).all(), (xi_rr, xi_qr)


def test_rayleigh_ritz_multiplies_in_float64_not_in_an_fp32_matmul():
    """Rayleigh–Ritz's products (the Gram, and the rotation of the fp32 factors by Z) run in
    float64: an fp32 matmul on a GPU runs in tf32 wherever the training script allows it
    (``torch.backends.cuda.matmul.allow_tf32 = True``, ``set_float32_matmul_precision("high")``),
    with which the rotated Q was orthonormal to ~6e-4 only and ξ read >= ~3e-4 (the default
    ``xi_thresh`` is 1e-3). Checked on the ops dispatched, with the Jacobi kernel's fp32 vectors too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "bmm", "matmul", "addmm", "baddbmm"):
                self.dtypes.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 30, 4, generator=gen) @ torch.randn(2, 4, 20, generator=gen)
    op = DenseOperator(a)
    q, u = subspace_iteration(op, gaussian_sketch(op, 6, gen), 2)

    def fp32_eigh(gram):  # as the Jacobi kernel answers: fp32 vectors
        w, z = torch.linalg.eigh(gram.double())
        return w.flip(-1).float(), z.flip(-1).float()

    for eigh in (None, fp32_eigh):
        with Matmuls() as seen:
            q2, u2 = rayleigh_ritz(q, u, eigh)
        assert seen.dtypes and all(d == torch.float64 for d in seen.dtypes), (eigh, seen.dtypes)
        assert q2.dtype == u2.dtype == torch.float32


def test_rayleigh_ritz_leaves_non_finite_and_zero_sketches_alone():
    """A non-finite Gram (an overflowed V) keeps Q and U as they are (ξ is NaN, which the
    optimizer handles) instead of raising from eigh; an all-zero V keeps an orthonormal Q."""
    q = torch.linalg.qr(torch.randn(2, 20, 5)).Q
    u = torch.randn(2, 30, 5)
    u[0, 3, 1] = float("inf")
    q2, u2 = rayleigh_ritz(q, u)
    assert torch.equal(q2[0], q[0]) and torch.equal(u2[0], u[0])
    torch.testing.assert_close(q2[1] @ u2[1].T, q[1] @ u[1].T, atol=1e-5, rtol=0)
    q3, u3 = rayleigh_ritz(q, torch.zeros(2, 30, 5))
    torch.testing.assert_close(q3.mT @ q3, torch.eye(5).expand(2, -1, -1), atol=1e-5, rtol=0)
    assert not u3.any()


def test_srsi_and_as_rsi_take_a_truncation():
    a = low_rank_plus_noise(80, 60, rank=20, noise=0.05, gen=torch.Generator().manual_seed(5))
    op = DenseOperator(a)
    xis = {}
    for truncation in ("qr", "rayleigh_ritz"):
        q, u = srsi(op, 4, iters=1, generator=torch.Generator().manual_seed(0), truncation=truncation)
        xis[truncation] = error_ratio(op, q, u).item()
        _, _, xi, _ = as_rsi(op, [4], k_min=1, k_max=8, xi_thresh=1e-3, iters=1,
                             generator=torch.Generator().manual_seed(0), truncation=truncation)  # fmt: skip
        assert xi.item() == pytest.approx(xis[truncation], rel=1e-5)
    assert xis["rayleigh_ritz"] < xis["qr"]
    with pytest.raises(ValueError, match="truncation"):
        srsi(op, 4, truncation="svd")
