"""Adapprox (reference backend) and AdaMeM against independent dense implementations written
line by line from the papers' pseudo-code (Adapprox Alg. 1-3, ICLR; AdaMeM Alg. 1-4), in fp64,
below full rank, with the rank moving. The oracle draws its S-RSI sketch from a generator seeded
as the optimizer's, so the two must agree to rounding."""

import math

import pytest
import torch

from adapprox_kernels import AdaMeM, Adapprox

DT = torch.float64


def _adapprox_oracle(w, grads, *, lr=1e-3, b1=0.9, b2=0.999, b3=0.9, eps=1e-8, d=1.0, wd=0.1, k0, k_max, k_min=1,
                     p=5, l=5, xi_th=1e-3, seed, cos_scale=None):  # fmt: skip  # noqa: E741 (l: the paper's name)
    m, n = w.shape
    cap = min(k_max, m, n)
    gen = torch.Generator().manual_seed(seed)
    k, q, u, mom, ranks = (
        float(min(k0, cap)),
        torch.zeros(m, 0, dtype=DT),
        torch.zeros(n, 0, dtype=DT),
        torch.zeros_like(w),
        [],
    )
    for g in grads:
        v = b2 * (q @ u.T).clamp_min(0) + (1 - b2) * g * g  # line 341
        k_in = min(math.floor(k + 0.5), cap)
        width = min(k_in + p, m, n)
        uu = torch.randn(1, n, width, generator=gen, dtype=DT)[0]
        for _ in range(l):  # Algorithm 1
            qq = torch.linalg.qr(v @ uu).Q
            uu = v.T @ qq
        xi = (torch.linalg.norm(v - qq[:, :k_in] @ uu[:, :k_in].T) / torch.linalg.norm(v)).item()  # Alg. 2
        dk = max(math.ceil(0.02 * cap), 1)
        k_next = min(max(k_in + dk if xi > xi_th else k_in - dk, k_min), cap)
        k = b3 * k + (1 - b3) * k_next  # line 343
        keep = min(math.floor(k + 0.5), width)  # docs/algorithm.md: round(k_t) columns (paper: k_in)
        q, u = qq[:, :keep], uu[:, :keep]
        upd = g / (v.sqrt() + eps)  # 344
        upd = upd / max(1.0, upd.norm().item() / math.sqrt(m * n) / d)  # 345
        mom = b1 * mom + (1 - b1) * upd  # 347
        step = mom
        if cos_scale is not None:
            c = ((upd * mom).sum() / (upd.norm() * mom.norm())).item()
            step = mom / max(1 - c, 1 / cos_scale)
        w = w - lr * (step + wd * w)  # 349
        ranks.append(k)
    return w, ranks


@pytest.mark.parametrize(
    "kw",
    [
        dict(k_max=8, betas=(0.9, 0.999, 0.5), xi_thresh=0.05),  # rank falls, then rises
        dict(k_max=6, k_init=2, betas=(0.9, 0.99, 0.5), xi_thresh=0.05),  # rank rises
        dict(k_max=8, cosine_guidance=True, cosine_max_scale=3.0),
    ],
)
def test_low_rank_adapprox_follows_algorithm_3_line_by_line(kw):
    gen = torch.Generator().manual_seed(1)
    m, n = 48, 64
    w0 = torch.randn(m, n, generator=gen, dtype=DT)
    grads = [torch.randn(m, 3, generator=gen, dtype=DT) @ torch.randn(3, n, generator=gen, dtype=DT) / 3
             + 0.01 * torch.randn(m, n, generator=gen, dtype=DT) for _ in range(20)]  # fmt: skip
    p = torch.nn.Parameter(w0.clone())
    opt = Adapprox([p], backend="reference", seed=123, exact_small_matrices=False, **kw)
    ranks = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        ranks.append(opt.state[p]["rank"])
    b1, b2, b3 = kw.get("betas", (0.9, 0.999, 0.9))
    w, oracle_ranks = _adapprox_oracle(
        w0, grads, b1=b1, b2=b2, b3=b3, k0=kw.get("k_init", kw["k_max"]), k_max=kw["k_max"],
        xi_th=kw.get("xi_thresh", 1e-3), seed=123,
        cos_scale=kw.get("cosine_max_scale") if kw.get("cosine_guidance") else None,
    )  # fmt: skip
    assert ranks == pytest.approx(oracle_ranks, abs=1e-12)
    assert len(set(ranks)) > 1 or "cosine_guidance" in kw  # the rank moment did move the rank
    torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-12)


def _adamem_oracle(w, grads, *, lr=1e-3, b1=0.9, b2=0.95, r, T, eps=1e-8):
    wt = w.shape[0] > w.shape[1]
    w = w.T if wt else w
    m, n = w.shape
    mom, rs, cs, os_ = (
        torch.zeros(r, n, dtype=DT),
        torch.zeros(r, dtype=DT),
        torch.zeros(n, dtype=DT),
        torch.zeros(n, dtype=DT),
    )
    for t, g in enumerate(grads, 1):
        g = g.T if wt else g
        if (t - 1) % T == 0:  # Algorithm 2 (refresh on steps 1, T+1, ...; docs/adamem.md)
            pu = torch.linalg.svd(g, full_matrices=False).U[:, :r]
            proj = pu * torch.sign(pu[pu.abs().argmax(dim=0), torch.arange(r)])
        rr = proj.T @ g
        s = g - proj @ rr
        mom = b1 * mom + (1 - b1) * rr
        mh = mom / (1 - b1**t)
        rs = b2 * rs + (1 - b2) * (mh * mh).sum(dim=1)  # Algorithm 3, with sums
        cs = b2 * cs + (1 - b2) * (mh * mh).sum(dim=0)
        n1 = mh / ((torch.outer(rs, cs) / rs.sum() / (1 - b2**t)).sqrt() + eps)
        os_ = b2 * os_ + (1 - b2) * (s * s).sum(dim=0)  # Algorithm 4, column statistic
        n2 = s / ((os_ / m / (1 - b2**t)).sqrt() + eps)
        w = w - lr * (proj @ n1 + n2)
    return w.T if wt else w


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_adamem_follows_algorithms_1_to_4_with_refreshes(shape):
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(*shape, generator=gen, dtype=DT)
    grads = [torch.randn(*shape, generator=gen, dtype=DT) * (1 + 0.3 * t) for t in range(12)]
    p = torch.nn.Parameter(w0.clone())
    opt = AdaMeM([p], rank=4, update_proj_gap=5, projection="svd", seed=0)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), _adamem_oracle(w0, grads, r=4, T=5), rtol=0, atol=1e-13)
