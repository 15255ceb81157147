"""Figure 2 of the paper: approximation error and time against rank on REAL second moments,
for S-RSI (p = l = 5), the truncated SVD (the optimum; time of a full SVD) and Adafactor's
rank-1 row/column factorization.

The matrices are AdamW's ``exp_avg_sq`` captured while training the main job's model
(:mod:`bench.second_moments`). Adafactor's factors are taken from ``torch.optim.Adafactor``
itself: after one step on a gradient ``G = √V`` its state holds ``row_var`` = row means and
``col_var`` = column means of ``V`` (its first-step β2 is 0), and its estimate is
``row_var @ col_var / mean(row_var)``; the time shown is that of computing the two means.

    python -m bench.fig2_rank_sweep
"""

from __future__ import annotations

import torch

from adapprox_kernels.linear_operator import DenseOperator
from adapprox_kernels.srsi import error_ratio, srsi
from adapprox_kernels.train.model import SIZES

from . import common
from .second_moments import capture

NAME = "fig2_rank_sweep"
RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 192, 256)  # those ≥ min(m, n) are skipped


def adafactor_factors(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_var (m, 1), col_var (1, n))`` as torch.optim.Adafactor stores them after one step
    on ``G = √V``."""
    p = torch.nn.Parameter(torch.zeros_like(v))
    p.grad = v.sqrt()
    opt = torch.optim.Adafactor([p], lr=0.0)
    opt.step()
    return opt.state[p]["row_var"], opt.state[p]["col_var"]


def adafactor_estimate(row_var: torch.Tensor, col_var: torch.Tensor) -> torch.Tensor:
    """torch.optim.Adafactor's variance estimate from its factors: ``(m, n)``."""
    return row_var @ col_var / row_var.mean()


def sweep_matrix(entry: dict, ranks: tuple[int, ...], seeds: int, device: torch.device) -> list[dict]:
    v = entry["v"].to(device)
    m, n = v.shape
    base = dict(matrix=entry["name"], type=entry["type"], step=entry["step"], m=m, n=n)
    op = DenseOperator(v)
    rows = []
    # Truncated SVD: the best rank-k error from the singular values; one full SVD serves all k.
    sigma = torch.linalg.svdvals(v.double())
    tail = sigma.square().flip(0).cumsum(0).flip(0)  # tail[j] = Σ_{i ≥ j} σ_i²
    t_svd = common.time_call(lambda: torch.linalg.svd(v, full_matrices=False), device, reps=3)
    # Adafactor's rank-1 factorization, checked against the peer's own state.
    row_var, col_var = adafactor_factors(v)
    mine = (v.mean(dim=1, keepdim=True), v.mean(dim=0, keepdim=True))
    if not (torch.allclose(mine[0], row_var, rtol=1e-4) and torch.allclose(mine[1], col_var, rtol=1e-4)):
        raise RuntimeError(f"{entry['name']}: row/column means differ from torch.optim.Adafactor's state")
    est = adafactor_estimate(row_var, col_var)
    ada_err = ((v - est).norm() / v.norm()).item()
    t_ada = common.time_call(lambda: (v.mean(dim=1, keepdim=True), v.mean(dim=0, keepdim=True)), device)
    rows.append({**base, "method": "adafactor (rank 1)", "rank": 1, "error": ada_err, **t_ada})
    for k in ranks:
        if k >= min(m, n):  # full rank: every method is exact
            continue
        svd_err = (tail[k] / tail[0]).sqrt().item()
        rows.append({**base, "method": "truncated SVD", "rank": k, "error": svd_err, **t_svd})
        errs = []
        for s in range(seeds):
            q, u = srsi(op, k, 5, 5, generator=torch.Generator(device=device).manual_seed(s))
            errs.append(error_ratio(op, q, u).item())
        gen = torch.Generator(device=device).manual_seed(seeds)
        t = common.time_call(lambda: srsi(op, k, 5, 5, generator=gen), device)
        rows.append({**base, "method": "S-RSI", "rank": k, "error": sum(errs) / seeds, "error_max": max(errs), **t})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean error and median time per (method, rank) over all matrices, as the paper plots."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for k in sorted({r["rank"] for r in rows if r["method"] == method}):
            rs = [r for r in rows if r["method"] == method and r["rank"] == k]
            errors = [r["error"] for r in rs]
            times = sorted(r["median_s"] for r in rs)
            out.append(dict(method=method, rank=k, matrices=len(rs), mean_error=sum(errors) / len(rs),
                            min_error=min(errors), max_error=max(errors),
                            median_time_s=times[len(times) // 2]))  # fmt: skip
    return out


def plot(summary: list[dict], device: torch.device, out) -> None:
    plt = common.pyplot()
    fig, (ax_err, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in summary):
        rs = [r for r in summary if r["method"] == method]
        ks = [r["rank"] for r in rs]
        if len(rs) == 1:  # Adafactor: fixed rank 1, drawn across as in the paper
            ax_err.axhline(rs[0]["mean_error"], ls="--", color="gray", label=method)
            ax_time.axhline(rs[0]["median_time_s"], ls="--", color="gray", label=method)
            continue
        err = [r["mean_error"] for r in rs]
        ax_err.plot(ks, err, marker="o", ms=3, label=method)
        ax_err.fill_between(ks, [r["min_error"] for r in rs], [r["max_error"] for r in rs], alpha=0.15)
        ax_time.plot(ks, [r["median_time_s"] for r in rs], marker="o", ms=3, label=method)
    ax_err.set(xscale="log", yscale="log", xlabel="rank k", ylabel="‖V − V̂‖_F / ‖V‖_F  (band: min–max)",
               title="(a) approximation error")  # fmt: skip
    ax_time.set(xscale="log", yscale="log", xlabel="rank k", ylabel="seconds (median over matrices)",
                title=f"(b) time, {common.device_name(device)[:28]}")  # fmt: skip
    for ax in (ax_err, ax_time):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    common.save_figure(fig, NAME, device, out)


def markdown(summary: list[dict]) -> str:
    by = {(r["method"], r["rank"]): r for r in summary}
    ranks = sorted({r["rank"] for r in summary if r["method"] == "S-RSI"})
    ada = next(r for r in summary if r["method"].startswith("adafactor"))
    lines = [
        (k, f"{by[('truncated SVD', k)]['mean_error']:.4f}", f"{by[('S-RSI', k)]['mean_error']:.4f}",
         common.fmt_seconds(by[("S-RSI", k)]["median_time_s"]),
         common.fmt_seconds(by[("truncated SVD", k)]["median_time_s"]))
        for k in ranks
    ]  # fmt: skip
    head = ["rank k", "truncated SVD error", "S-RSI error", "S-RSI time", "full SVD time"]
    table = common.markdown_table(head, lines)
    return (
        f"{table}\n\nAdafactor rank-1 factorization: mean error {ada['mean_error']:.4f} "
        f"(min {ada['min_error']:.4f}, max {ada['max_error']:.4f}), time of its factors "
        f"{common.fmt_seconds(ada['median_time_s'])} (median). Errors are means over {ada['matrices']} matrices."
    )


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=sorted(SIZES), help="main job model size to train with AdamW")
    ap.add_argument("--capture-steps", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--seeds", type=int, default=3, help="S-RSI sketches averaged per error")
    ap.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    args = ap.parse_args(argv)
    device = common.setup(args)
    captured = capture(args.size, tuple(args.capture_steps))
    rows = []
    for entry in captured["matrices"]:
        rows += sweep_matrix(entry, tuple(args.ranks), args.seeds, device)
        print(f"  {entry['name']:22s} step {entry['step']:4d} {tuple(entry['shape'])}")
    summary = summarize(rows)
    meta = common.metadata(device, capture=captured["meta"], seeds=args.seeds, p=5, l=5, summary=summary)
    path = common.write_results(NAME, device, rows, meta, args.out)
    common.write_markdown(NAME, device, markdown(summary), args.out)
    plot(summary, device, args.out)
    print(markdown(summary))
    print(f"wrote {path} (+ .csv, .md, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
