"""Table 4 of the paper: optimizer step time on GPT-2 124M / 345M shapes, Adapprox next to fused
AdamW, torch Adafactor, CAME and GaLore, plus the end-to-end iteration time of the main job.

Scopes: ``block`` (one transformer block's parameters: the CPU default, small enough for a
shared CPU) or ``model`` (every parameter: the GPU default). Gradients are random and fixed; the
first step (state creation, GaLore's first SVD) is outside the timing. Adapprox runs at a fixed
rank ``k`` (``k_min = k_max = k``): k = 1 is near where the paper's GPT-2 ranks settle, k = 256
is its k_max; it is timed with every registered backend that can run on the device.
The same cases run under pytest-benchmark in ``bench/test_step_time.py``.

    python -m bench.table4_step_time                      # CPU, one block
    python -m bench.table4_step_time --device cuda --scope model
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adapprox_kernels.backends import BACKENDS

from . import common, peers
from .table1_srsi_time import load_backends

NAME = "table4_step_time"
SIZES = ("gpt2-124m", "gpt2-345m")
ADAPPROX_RANKS = (1, 256)
PEER_CASES = ("adamw", "adafactor", "came", "galore", "adamem", "adafactor-m")
# The paper's Table 4: GPT-2 117M, seconds per training iteration (8 V100, Megatron-LM).
PAPER_ITERATION_S = {"adamw": 1.81, "adafactor": 1.84, "came": 1.85, "adapprox": 1.92}
# The main job's own results, else the ones bench.fig3_4_training recorded.
MAIN_RESULTS = (Path("runs/main/results.json"), common.RESULTS / "fig3_4_training_cuda.json",
                common.RESULTS / "fig3_4_training_cpu.json")  # fmt: skip


def cases(device: torch.device, missing: dict[str, str | None]) -> list[dict]:
    """``{"label", "optimizer", "k", "backend", "reason"}`` for every row; ``reason`` is set
    when the case cannot run here."""
    out = [dict(label=name, optimizer=name, k=None, backend=None, reason=None) for name in PEER_CASES]
    for k in ADAPPROX_RANKS:
        for name, backend in BACKENDS.items():
            out.append(dict(label=f"adapprox k={k} [{name}]", optimizer="adapprox", k=k, backend=name,
                            reason=backend.available(device)))  # fmt: skip
        for name, why in missing.items():
            out.append(dict(label=f"adapprox k={k} [{name}]", optimizer="adapprox", k=k, backend=name, reason=why))
    return out


def build_case(case: dict, named, size: str) -> torch.optim.Optimizer:
    return peers.build(case["optimizer"], named, k=case["k"], galore_rank=peers.GALORE_RANK[size],
                       backend=case["backend"] or "auto")  # fmt: skip


def time_case(case: dict, size: str, scope: str, device: torch.device) -> dict:
    named = peers.block_params(size, device) if scope == "block" else peers.model_params(size, device)
    opt = build_case(case, named, size)
    opt.step()  # creates the state; GaLore's first projection (an SVD) happens here
    return common.time_call(opt.step, device, warmup=1, reps=5)


def end_to_end_rows(paths) -> list[dict]:
    """The main job's median iteration time per optimizer, from its results.json, if any."""
    for path in paths:
        if Path(path).exists():
            data = json.loads(Path(path).read_text())
            meta = data["meta"].get("main_job", data["meta"])
            size = meta.get("args", {}).get("size", "?")
            rows = []
            for r in data["runs"]:  # a run that raised in the main job has an error and no times
                row = dict(size=f"main job ({size})", scope="end-to-end iteration", label=r["name"],
                           optimizer=r["name"], device=meta.get("device"), source=common.rel(path))  # fmt: skip
                if "error" in r:
                    rows.append({**row, **common.not_measured(f"the run failed: {r['error']}")})
                else:
                    rows.append({**row, "median_s": r["step_time_s"], "optimizer_step_s": r["opt_time_s"],
                                 **common.measured()})  # fmt: skip
            return rows
    why = "no main-job results.json found (run python -m adapprox_kernels.train, or bench.fig3_4_training)"
    return [dict(size="main job", scope="end-to-end iteration", label="-", **common.not_measured(why))]


def markdown(rows: list[dict], scope: str) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows if r["scope"] == scope))
    sizes = list(dict.fromkeys(r["size"] for r in rows if r["scope"] == scope))
    cell = {(r["label"], r["size"]): r for r in rows if r["scope"] == scope}
    reasons: dict[str, int] = {}
    lines = []
    for label in labels:
        cells = []
        for size in sizes:
            r = cell[(label, size)]
            if r["status"] == "measured":
                ratio = r["median_s"] / cell[("adamw", size)]["median_s"]
                cells.append(f"{common.fmt_time(r)} ({ratio:.1f}× AdamW)")
            else:
                cells.append(f"not measured ({reasons.setdefault(r['reason'], len(reasons) + 1)})")
        lines.append((label, *cells))
    parts = [common.markdown_table([f"optimizer step, {scope}", *sizes], lines)]
    parts += [f"({i}) {why}" for why, i in reasons.items()]
    e2e = [r for r in rows if r["scope"] == "end-to-end iteration"]
    if "source" in e2e[0]:  # a main job's results.json was found
        paper = {name: f"{t:.2f} s" for name, t in PAPER_ITERATION_S.items()}
        lines = [(r["label"], common.fmt_seconds(r["median_s"]), common.fmt_seconds(r["optimizer_step_s"]),
                  paper.get(r["label"], "—")) if r["status"] == "measured" else
                 (r["label"], r["reason"], "—", paper.get(r["label"], "—")) for r in e2e]  # fmt: skip
        head = [f"{e2e[0]['size']} on {e2e[0]['device']}", "iteration (median)", "of which optimizer step",
                "paper, GPT-2 117M iteration"]  # fmt: skip
        parts += ["", common.markdown_table(head, lines), f"source: `{e2e[0]['source']}`"]
    else:
        parts += ["", f"End-to-end iteration time: not measured ({e2e[0]['reason']})."]
    return "\n".join(parts)


def plot(rows: list[dict], scope: str, device, out) -> None:
    plt = common.pyplot()
    done = [r for r in rows if r["scope"] == scope and r["status"] == "measured"]
    sizes = list(dict.fromkeys(r["size"] for r in done))
    labels = list(dict.fromkeys(r["label"] for r in done))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(sizes), 1)
    for i, size in enumerate(sizes):
        rs = {r["label"]: r for r in done if r["size"] == size}
        xs = [j + i * width for j, lab in enumerate(labels) if lab in rs]
        med = [rs[lab]["median_s"] for lab in labels if lab in rs]
        err = [[rs[lab]["median_s"] - rs[lab]["p20_s"] for lab in labels if lab in rs],
               [rs[lab]["p80_s"] - rs[lab]["median_s"] for lab in labels if lab in rs]]  # fmt: skip
        ax.bar(xs, med, width, yerr=err, capsize=2, label=size)
    ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(labels))], labels, rotation=25, ha="right",
                  fontsize=8)  # fmt: skip
    ax.set(yscale="log", ylabel="seconds per optimizer step (median, p20–p80)",
           title=f"Optimizer step, {scope}, {common.device_name(device)[:30]}")  # fmt: skip
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend()
    common.save_figure(fig, NAME, device, out)


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__.split("\n\n")[0])
    ap.add_argument("--scope", choices=("block", "model"), default=None, help="default: block on CPU, model on GPU")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(peers.GPT2))
    ap.add_argument("--main-results", type=Path, default=None, help="main job results.json for end-to-end times")
    args = ap.parse_args(argv)
    device = common.setup(args)
    scope = args.scope or ("model" if device.type == "cuda" else "block")
    missing = load_backends()
    rows = []
    for size in args.sizes:
        for case in cases(device, missing):
            base = dict(size=size, scope=scope, label=case["label"], optimizer=case["optimizer"], k=case["k"],
                        backend=case["backend"])  # fmt: skip
            if case["reason"] is not None:
                rows.append({**base, **common.not_measured(case["reason"])})
            else:
                rows.append({**base, **common.measured(), **time_case(case, size, scope, device)})
            print(f"  {size:10s} {case['label']:26s} {common.fmt_time(rows[-1])}")
    if device.type != "cuda":
        why = "needs a CUDA device (do_bench); none in this session"
        rows += [dict(size=size, scope="model", label=c["label"], optimizer=c["optimizer"], k=c["k"],
                      backend=c["backend"], **common.not_measured(why))
                 for size in args.sizes for c in cases(device, missing)]  # fmt: skip
    rows += end_to_end_rows([args.main_results] if args.main_results else MAIN_RESULTS)
    meta = common.metadata(device, scope=scope, paper_iteration_s=PAPER_ITERATION_S)
    path = common.write_results(NAME, device, rows, meta, args.out)
    common.write_markdown(NAME, device, markdown(rows, scope), args.out)
    plot(rows, scope, device, args.out)
    print(markdown(rows, scope))
    print(f"wrote {path} (+ .csv, .md, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
