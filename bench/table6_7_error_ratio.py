"""Tables 6/7 of the paper: S-RSI's error ratio ξ = ‖A − Q Uᵀ‖_F / ‖A‖_F against the number of
iterations l = 1..10 (p = 5) and the oversampling p = 1..10 (l = 5), next to the truncated-SVD
optimum ‖A − A_k‖_F / ‖A‖_F.

Matrices:

* ``gaussian``: 1024×1024 with N(0, 1) entries, k = 256 (the paper's setting). Its optimum is
  about 0.61 (bench/results/table6_7_error_ratio_cpu.md), so the paper's 0.08–0.15 cannot come
  from this matrix as stated;
* ``power-law``: 1024×1024 with singular values σ_j = 1/j and random singular vectors, k = 256,
  a decaying spectrum where S-RSI can get close to the optimum;
* ``AdamW second moment``: the real ``exp_avg_sq`` matrices of :mod:`bench.second_moments`
  (last captured step), k = min(m, n)/4, the paper's ratio 256/1024.

    python -m bench.table6_7_error_ratio
"""

from __future__ import annotations

import torch

from adapprox_kernels.linear_operator import DenseOperator
from adapprox_kernels.srsi import error_ratio, srsi
from adapprox_kernels.train.model import SIZES

from . import common
from .second_moments import capture

NAME = "table6_7_error_ratio"
SWEEP = tuple(range(1, 11))
# The paper's Tables 6 (ξ against l, p = 5) and 7 (ξ against p, l = 5), 1024×1024 "normal" matrix, k = 256.
PAPER_L = (0.1473, 0.0968, 0.0850, 0.0828, 0.0802, 0.0786, 0.0783, 0.0779, 0.0779, 0.0778)
PAPER_P = (0.0804, 0.0797, 0.0805, 0.0807, 0.0791, 0.0797, 0.0795, 0.0803, 0.0794, 0.0799)


def gaussian(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, n, generator=gen)


def power_law(n: int, gen: torch.Generator) -> torch.Tensor:
    """``U diag(1/j) Vᵀ`` with Haar-random orthogonal ``U, V`` (QR of Gaussian matrices)."""
    u = torch.linalg.qr(torch.randn(n, n, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=gen)).Q
    return (u / torch.arange(1, n + 1)) @ v.T


def svd_optimum(a: torch.Tensor, k: int) -> float:
    sigma = torch.linalg.svdvals(a.double())
    return (sigma[k:].square().sum() / sigma.square().sum()).sqrt().item()


def sweep(a: torch.Tensor, k: int, seeds: int) -> list[dict]:
    """ξ (mean and spread over ``seeds`` sketches) for every l (p = 5) and every p (l = 5)."""
    op = DenseOperator(a)
    rows = []
    for param, values in (("l", SWEEP), ("p", SWEEP)):
        for x in values:
            p, l = (5, x) if param == "l" else (x, 5)  # noqa: E741 (l: the paper's name)
            xis = []
            for s in range(seeds):
                q, u = srsi(op, k, p, l, generator=torch.Generator().manual_seed(s))
                xis.append(error_ratio(op, q, u).item())
            rows.append(dict(swept=param, p=p, l=l, k=k, xi_mean=sum(xis) / seeds, xi_min=min(xis), xi_max=max(xis)))
    return rows


def matrices(n: int, seed: int, size: str) -> list[tuple[str, str, torch.Tensor, int]]:
    """``(matrix kind, name, A, k)``."""
    gen = torch.Generator().manual_seed(seed)
    out = [("gaussian", "gaussian", gaussian(n, gen), n // 4), ("power-law", "power-law", power_law(n, gen), n // 4)]
    captured = capture(size)
    last = max(e["step"] for e in captured["matrices"])
    for e in captured["matrices"]:
        if e["step"] == last:
            out.append(("AdamW second moment", f"{e['name']} (step {last})", e["v"], min(e["v"].shape) // 4))
    return out


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean ξ per (kind, swept, value) over the matrices of a kind."""
    out = []
    keys = dict.fromkeys((r["kind"], r["swept"], r[r["swept"]]) for r in rows)
    for kind, swept, x in keys:
        rs = [r for r in rows if r["kind"] == kind and r["swept"] == swept and r[swept] == x]
        out.append(dict(kind=kind, swept=swept, value=x, matrices=len(rs), xi=sum(r["xi_mean"] for r in rs) / len(rs),
                        svd=sum(r["svd_optimum"] for r in rs) / len(rs)))  # fmt: skip
    return out


def markdown(agg: list[dict]) -> str:
    kinds = list(dict.fromkeys(r["kind"] for r in agg))
    parts = []
    for swept, paper, other in (("l", PAPER_L, "p = 5"), ("p", PAPER_P, "l = 5")):
        lines = [('paper ("normal" 1024², k = 256)', *(f"{x:.4f}" for x in paper), "—")]
        for kind in kinds:
            rs = sorted((r for r in agg if r["kind"] == kind and r["swept"] == swept), key=lambda r: r["value"])
            lines.append((kind, *(f"{r['xi']:.4f}" for r in rs), f"{rs[0]['svd']:.4f}"))
        table = common.markdown_table([f"ξ against {swept} ({other})", *map(str, SWEEP), "SVD optimum"], lines)
        parts.append(table)
    return "\n\n".join(parts)


def plot(agg: list[dict], device, out) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (swept, paper) in zip(axes, (("l", PAPER_L), ("p", PAPER_P))):
        for color, kind in zip(colors, dict.fromkeys(r["kind"] for r in agg)):
            rs = sorted((r for r in agg if r["kind"] == kind and r["swept"] == swept), key=lambda r: r["value"])
            xs, ys = [r["value"] for r in rs], [r["xi"] for r in rs]
            ax.plot(xs, ys, marker="o", ms=3, color=color, label=f"{kind}: S-RSI")
            ax.axhline(rs[0]["svd"], color=color, ls=":", label=f"{kind}: SVD optimum")
        ax.plot(SWEEP, paper, "k--", marker="x", label='paper ("normal" 1024²)')
        ax.set(xlabel=swept, yscale="log", title=f"ξ against {swept} ({'p' if swept == 'l' else 'l'} = 5)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("‖A − QUᵀ‖_F / ‖A‖_F")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    common.save_figure(fig, NAME, device, out)


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="size of the synthetic n×n matrices")
    ap.add_argument("--seeds", type=int, default=3, help="sketches averaged per ξ")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic matrices")
    ap.add_argument("--size", default="small", choices=sorted(SIZES),
                    help="main job model size for the captured second moments")  # fmt: skip
    args = ap.parse_args(argv)
    device = common.setup(args)
    rows = []
    for kind, name, a, k in matrices(args.n, args.seed, args.size):
        a = a.to(device)
        opt = svd_optimum(a, k)
        for r in sweep(a, k, args.seeds):
            rows.append(dict(kind=kind, matrix=name, m=a.shape[0], n=a.shape[1], svd_optimum=opt, **r))
        print(f"  {name:32s} k={k:4d} SVD optimum {opt:.4f}, ξ(l=5, p=5) {rows[-6]['xi_mean']:.4f}")
    agg = aggregate(rows)
    meta = common.metadata(device, seeds=args.seeds, seed=args.seed, n=args.n, aggregate=agg)
    path = common.write_results(NAME, device, rows, meta, args.out)
    common.write_markdown(NAME, device, markdown(agg), args.out)
    plot(agg, device, args.out)
    print(markdown(agg))
    print(f"wrote {path} (+ .csv, .md, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
