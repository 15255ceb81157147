"""Table 1 of the paper: time of one S-RSI (p = l = 5) of an m×m matrix, k ∈ {8, 64, 256}.

Variants, each timed as median [p20, p80]:

* ``dense``: S-RSI of a matrix already held in memory (the paper's setting);
* ``<backend>``: S-RSI of the Adapprox second moment ``V_t = β2·relu(Q Uᵀ) + (1−β2)·G²``,
  given ``G`` and last step's ``(Q, U)``, through a registered backend
  (:data:`adapprox_kernels.backends.BACKENDS`). ``reference`` materializes ``V_t``; an implicit
  backend (the fused Triton one) rebuilds it tile by tile inside the products;
* ``<backend> batched ×B``: ``B`` same-shaped matrices in one batched call (the optimizer's
  bucketing), reported per matrix.

A backend that cannot run on the device, or that is expected but not registered in this build,
gets rows marked "not measured" with the reason. On CPU only m ≤ 2048 is timed by default.

    python -m bench.table1_srsi_time                 # CPU: m ∈ {1024, 2048}
    python -m bench.table1_srsi_time --device cuda   # every m of the paper
"""

from __future__ import annotations

import importlib

import torch

from adapprox_kernels.backends import BACKENDS
from adapprox_kernels.linear_operator import DenseOperator
from adapprox_kernels.srsi import srsi

from . import common

NAME = "table1_srsi_time"
SIZES = (1024, 2048, 4096, 5120, 8192)
CPU_SIZES = (1024, 2048)
RANKS = (8, 64, 256)
BETA2 = 0.999
# Backends this table is meant to show, and the module that registers each when imported.
EXPECTED_BACKENDS = {"triton": "adapprox_kernels.triton_backend"}
# The paper's Table 1 (NVIDIA A100, seconds), for the plot and docs/benchmarks.md.
PAPER_A100 = {
    8: (7.6e-4, 7.5e-4, 7.8e-4, 7.8e-4, 8.2e-4),
    64: (8.8e-4, 9.5e-4, 7.7e-4, 7.7e-4, 7.9e-4),
    256: (1.5e-3, 1.4e-3, 2.1e-3, 2.1e-3, 2.0e-3),
}


def load_backends() -> dict[str, str | None]:
    """Import the modules of the expected backends; ``{name: None or why it is missing}``."""
    missing = {}
    for name, module in EXPECTED_BACKENDS.items():
        if name in BACKENDS:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing[name] = f"backend not in this build ({module}: {exc})"
            continue
        if name not in BACKENDS:
            missing[name] = f"{module} did not register a backend named {name!r}"
    return missing


def make_inputs(m: int, k: int, batch: int, device: torch.device, seed: int):
    """``B`` gradients ``(m, m)`` and last step's rank-``k`` factors ``Q, U: (B, m, k)``
    (from S-RSI of a previous second moment, as in the optimizer)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    grads = 1e-2 * torch.randn(batch, m, m, generator=gen, device=device)
    prev = 1e-2 * torch.randn(batch, m, m, generator=gen, device=device)
    q, u = srsi(DenseOperator(prev.square_()), k, generator=gen)
    return list(grads), q, u


def time_rows(m: int, k: int, batch: int, device: torch.device, seed: int, backends: dict[str, str | None]):
    grads, q, u = make_inputs(m, k, batch, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    rows = []

    def row(variant: str, backend: str, b: int, fn=None, reason: str | None = None) -> None:
        base = dict(m=m, k=k, p=5, l=5, variant=variant, backend=backend, batch=b)
        if reason is not None:
            rows.append({**base, **common.not_measured(reason)})
            return
        t = common.time_call(fn, device)
        per = {f"per_matrix_{key}": t[key] / b for key in ("median_s", "p20_s", "p80_s")}
        rows.append({**base, **common.measured(), **t, **per})
        print(f"  m={m:5d} k={k:3d} {variant:24s} {fmt_per_matrix(rows[-1])}" + (" per matrix" if b > 1 else ""))

    v_dense = BACKENDS["reference"].second_moment(grads[:1], q[:1], u[:1], BETA2)
    dense = DenseOperator(v_dense.a.clone())
    del v_dense
    row("dense", "-", 1, lambda: srsi(dense, k, 5, 5, generator=gen))
    for name, backend in BACKENDS.items():
        why = backends.get(name) or backend.available(device)
        for b in (1, batch):
            variant = name if b == 1 else f"{name} batched ×{b}"
            if why is not None:
                row(variant, name, b, reason=why)
                continue

            def run(backend=backend, b=b):
                op = backend.second_moment(grads[:b], q[:b], u[:b], BETA2)
                return srsi(op, k, 5, 5, generator=gen, orthonormalize=backend.orthonormalize)

            row(variant, name, b, run)
    for name, why in backends.items():
        if name not in BACKENDS:
            for b in (1, batch):
                row(name if b == 1 else f"{name} batched ×{b}", name, b, reason=why)
    return rows


def fmt_per_matrix(row: dict) -> str:
    """A measured row's time per matrix (a batched call's divided by B), as the console and the .md show it."""
    return common.fmt_time({key.removeprefix("per_matrix_"): v for key, v in row.items()})


def plot(rows: list[dict], device: torch.device, out) -> None:
    plt = common.pyplot()
    ranks = list(dict.fromkeys(r["k"] for r in rows))  # --ranks: the paper's by default, any others too
    fig, axes = plt.subplots(1, len(ranks), figsize=(4.2 * len(ranks), 3.8), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, k in zip(axes, ranks):
        done = [r for r in rows if r["k"] == k and r["status"] == "measured"]
        for variant in dict.fromkeys(r["variant"] for r in done):
            rs = sorted((r for r in done if r["variant"] == variant), key=lambda r: r["m"])
            ms = [r["m"] for r in rs]
            med = [r["per_matrix_median_s"] for r in rs]
            err = [[a - r["per_matrix_p20_s"] for a, r in zip(med, rs)],
                   [r["per_matrix_p80_s"] - a for a, r in zip(med, rs)]]  # fmt: skip
            ax.errorbar(ms, med, yerr=err, marker="o", ms=3, capsize=2, label=variant)
        if k in PAPER_A100:
            ax.plot(SIZES, PAPER_A100[k], "k--", marker="x", label="paper, A100")
        ax.set(xscale="log", yscale="log", xlabel="m = n", title=f"k = {k}")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"seconds per matrix ({common.device_name(device)[:30]})")
    axes[0].legend(fontsize=7)
    common.save_figure(fig, NAME, device, out)


def markdown(rows: list[dict]) -> str:
    """One line per (k, variant), one column per m: the per-matrix median [p20, p80]."""
    cell = {(r["k"], r["variant"], r["m"]): r for r in rows}
    lines, reasons = [], {}
    for k in dict.fromkeys(r["k"] for r in rows):
        if k in PAPER_A100:
            lines.append((k, "**paper, A100**", *(f"{t * 1e3:.2g} ms" for t in PAPER_A100[k])))
        for variant in dict.fromkeys(r["variant"] for r in rows if r["k"] == k):
            cells = []
            for m in SIZES:
                r = cell[(k, variant, m)]
                if r["status"] == "measured":
                    cells.append(fmt_per_matrix(r))
                else:
                    note = reasons.setdefault(r["reason"], len(reasons) + 1)
                    cells.append(f"not measured ({note})")
            lines.append((k, variant, *cells))
    table = common.markdown_table(["k", "variant", *(f"m = {m}" for m in SIZES)], lines)
    notes = "\n".join(f"({i}) {why}" for why, i in reasons.items())
    return f"{table}\n\nTimes are per matrix; batched rows divide the call by B.\n{notes}"


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None, choices=SIZES,
                    help="m values (default: all on GPU; CPU: 1024 2048)")  # fmt: skip
    ap.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    ap.add_argument("--batch", type=int, default=4, help="B of the batched variant")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = common.setup(args)
    sizes = args.sizes or (SIZES if device.type == "cuda" else CPU_SIZES)
    backends = load_backends()
    rows = []
    for m in SIZES:
        for k in args.ranks:
            if m in sizes:
                rows += time_rows(m, k, args.batch, device, args.seed, backends)
            else:
                why = f"not in this run's sizes (CPU default: {CPU_SIZES}; larger m are too slow on a shared CPU)"
                variants = ["dense", *BACKENDS, *backends]
                variants += [f"{v} batched ×{args.batch}" for v in variants[1:]]
                rows += [dict(m=m, k=k, p=5, l=5, variant=v, backend=v.split()[0], batch=args.batch if "×" in v else 1,
                              **common.not_measured(why)) for v in variants]  # fmt: skip
    meta = common.metadata(device, beta2=BETA2, batch=args.batch, seed=args.seed)
    path = common.write_results(NAME, device, rows, meta, args.out)
    common.write_markdown(NAME, device, markdown(rows), args.out)
    plot(rows, device, args.out)
    print(f"wrote {path} (+ .csv, .md, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
