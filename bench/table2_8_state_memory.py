"""Tables 2/8 of the paper: optimizer-state memory for GPT-2 124M, 345M and 1.1B parameter shapes,
Adapprox at k ∈ {1, 8, 16, 32, 64, 128, 256} with β1 = 0.9 and β1 = 0, next to AdamW, torch
Adafactor, CAME and GaLore.

Every number is counted on real optimizer state: the model is built on the meta device (shapes
only), and for each kind of parameter (type, shape) one real fp32 parameter is given a random
gradient, the optimizer takes one step, and the bytes of its state are multiplied by the number
of such parameters (exact, because each of these optimizers keeps per-parameter state that
depends only on the shape). Adapprox runs that step with one subspace iteration (the state's
size does not depend on it) and every instantiated count is checked against the closed form
``4·k·(m+n)`` per factored matrix + dense second moments + first moment. To keep the CPU run to
a few minutes, Adapprox is instantiated at every k for gpt2-124m and at k = 1 and 256 for the
larger shapes; their other k come from the closed form (marked; ``--all-real`` instantiates all).

With ``--device cuda`` it also measures the GPU peak memory of one training step of the full
model (forward, backward, optimizer step) for each optimizer; on CPU those rows say "not measured".

    python -m bench.table2_8_state_memory
"""

from __future__ import annotations

import math

import torch

from adapprox_kernels import Adapprox
from adapprox_kernels.adapprox import matrix_shape

from . import common, peers

NAME = "table2_8_state_memory"
RANKS = (1, 8, 16, 32, 64, 128, 256)
BETA1 = (0.9, 0.0)
MIB = 2**20
# The paper's Table 8 (MB; its AdamW column is 8 bytes × parameters / 2²⁰, so MiB).
PAPER_TABLE8 = {
    "gpt2-124m": (475.93, 481.27, 487.39, 499.61, 524.06, 572.95, 670.74, 949.40),
    "gpt2-345m": (1356.47, 1368.40, 1382.02, 1409.28, 1463.79, 1572.81, 1790.85, 2707.09),
    "gpt2-1.1b": (3550.78, 3573.88, 3600.29, 3653.09, 3758.69, 3969.90, 4392.31, 7089.92),
}


def configs() -> list[dict]:
    """Every (optimizer, β1, k) row of the table."""
    out = [dict(optimizer="adafactor", beta1=None, k=None), dict(optimizer="adafactor-m", beta1=0.9, k=None)]
    for beta1 in BETA1:
        out += [dict(optimizer=name, beta1=beta1, k=None) for name in ("adamw", "came", "galore", "adamem")]
        out += [dict(optimizer="adapprox", beta1=beta1, k=k) for k in RANKS]
    return out


def adapprox_formula(shape: tuple[int, ...], k: int, beta1: float) -> int:
    """Closed-form Adapprox state bytes of one fp32 parameter at rank ``k``, classified (factored
    or dense) by the optimizer's own rule."""
    numel = math.prod(shape)
    ms = matrix_shape(torch.empty(shape, device="meta"))
    defaults = Adapprox([torch.nn.Parameter(torch.empty(1))], k_init=k, k_min=k, k_max=k).defaults
    if ms is not None and not Adapprox._is_dense_matrix(ms, defaults):
        second = 4 * min(k, *ms) * (ms[0] + ms[1])
    else:
        second = 4 * numel
    return second + (4 * numel if beta1 > 0 else 0)


def count_state(size: str, cfg: dict, instantiate: bool = True) -> dict:
    """State bytes of the whole model for one optimizer configuration: instantiated for real,
    or (Adapprox only, ``instantiate=False``) from the closed form."""
    held = logical = formula = 0
    for (kind, shape), count in peers.param_kinds(size).items():
        if cfg["optimizer"] == "adapprox":
            formula += count * adapprox_formula(shape, cfg["k"], cfg["beta1"])
        if not instantiate:
            continue
        # Values do not change the state's size; uniform noise is cheaper to draw than normal.
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.empty(shape).uniform_(-1e-3, 1e-3)
        name = f"blocks.0.{kind}.weight" if kind != "vector" else "vector"
        opt = peers.build(cfg["optimizer"], [(name, p)], beta1=cfg["beta1"] or 0.0, k=cfg["k"],
                          galore_rank=peers.GALORE_RANK[size], backend="reference")  # fmt: skip
        if cfg["optimizer"] == "adapprox":
            for group in opt.param_groups:
                group["power_iters"] = 1  # the state's size does not depend on it
        opt.step()
        h, lg = peers.state_bytes(opt)
        held += count * h
        logical += count * lg
        del opt, p
    if not instantiate:
        return dict(state_bytes=formula, logical_bytes=formula, formula_bytes=formula, counted="closed form")
    row = dict(state_bytes=held, logical_bytes=logical, counted="instantiated")
    if cfg["optimizer"] == "adapprox":
        if formula != logical:
            raise RuntimeError(f"{size} {cfg}: instantiated state {logical} B != closed form {formula} B")
        row["formula_bytes"] = formula
    return row


def gpu_peak(size: str, cfg: dict, device: torch.device) -> dict:
    """Peak GPU memory of one training step of the full model (batch 1 × 1,024 tokens), after
    a first step has created the optimizer state."""
    torch.manual_seed(0)
    model = peers.GPT(peers.GPT2[size]).to(device)
    opt = peers.build(cfg["optimizer"], list(model.named_parameters()), beta1=cfg["beta1"] or 0.0, k=cfg["k"],
                      galore_rank=peers.GALORE_RANK[size])  # fmt: skip
    batch = torch.randint(0, peers.GPT2[size].vocab_size, (1, 1025), device=device)

    def step(model, opt) -> None:  # arguments, not a closure: both are deleted below
        opt.zero_grad(set_to_none=True)
        model.loss(batch).backward()
        opt.step()

    step(model, opt)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(model, opt)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del model, opt
    torch.cuda.empty_cache()
    return dict(gpu_peak_step_bytes=peak)


def label(cfg: dict) -> str:
    if cfg["optimizer"] == "adapprox":
        return f"adapprox k={cfg['k']}"
    return cfg["optimizer"]


def markdown(rows: list[dict]) -> str:
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    parts = []
    for beta1 in BETA1:
        lines = []
        for r0 in (r for r in rows if r["size"] == sizes[0] and r["beta1"] in (beta1, None)):
            cells = []
            for size in sizes:
                r = next(x for x in rows if (x["size"], x["label"], x["beta1"]) == (size, r0["label"], r0["beta1"]))
                extra = f" (logical {r['logical_bytes'] / MIB:,.2f})" if r["logical_bytes"] != r["state_bytes"] else ""
                mark = "†" if r["counted"] == "closed form" else ""
                cells.append(f"{r['state_bytes'] / MIB:,.2f}{mark}{extra} ({100 * r['vs_adamw']:.1f}%)")
            lines.append((r0["label"], *cells))
        if beta1 > 0:
            for i, k in enumerate(RANKS):
                lines.append((f"paper: adapprox k={k}", *(f"{PAPER_TABLE8[s][i]:,.2f}" for s in sizes)))
            lines.append(("paper: adamw", *(f"{PAPER_TABLE8[s][-1]:,.2f}" for s in sizes)))
        head = [f"β1 = {beta1}: state MiB (% of AdamW β1=0.9)", *(f"{s} ({r['params'] / 1e6:.1f}M params)" for s, r in
                ((s, next(x for x in rows if x["size"] == s)) for s in sizes))]  # fmt: skip
        parts.append(common.markdown_table(head, lines))
    parts.append(
        "† closed form (the instantiated rows match it exactly); every other cell is counted on real "
        'optimizer state. "logical": numel × element size where the state keeps a larger buffer alive.'
    )
    gpu = [r for r in rows if "gpu_peak_step_bytes" in r]
    if gpu:
        lines = [(f"{r['size']}", r["label"], r["beta1"], f"{r['gpu_peak_step_bytes'] / MIB:,.0f}") for r in gpu]
        parts.append(common.markdown_table(["size", "optimizer", "β1", "GPU peak MiB, one step"], lines))
    else:
        reason = next(r["gpu_peak_reason"] for r in rows)
        parts.append(f"GPU peak memory of one step: not measured ({reason}).")
    return "\n\n".join(parts)


def plot(rows: list[dict], device, out) -> None:
    plt = common.pyplot()
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4), squeeze=False)
    axes = axes[0]
    for ax, size in zip(axes, sizes):
        adamw = next(r for r in rows if r["size"] == size and r["optimizer"] == "adamw" and r["beta1"] == 0.9)
        for beta1, marker in zip(BETA1, ("o", "s")):
            rs = [r for r in rows if r["size"] == size and r["optimizer"] == "adapprox" and r["beta1"] == beta1]
            ax.plot([r["k"] for r in rs], [r["state_bytes"] / MIB for r in rs], marker=marker, ms=3,
                    label=f"adapprox β1={beta1}")  # fmt: skip
        ax.plot(RANKS, PAPER_TABLE8[size][:-1], "k--", marker="x", ms=4, label="paper, adapprox")
        for r in rows:
            if r["size"] == size and r["optimizer"] != "adapprox" and r["beta1"] in (0.9, None):
                ax.axhline(r["state_bytes"] / MIB, ls=":", lw=1, color=f"C{2 + peers.PEERS.index(r['optimizer'])}",
                           label=r["optimizer"])  # fmt: skip
        title = f"{size} (AdamW {adamw['state_bytes'] / MIB:,.0f} MiB)"
        ax.set(xscale="log", yscale="log", xlabel="rank k", title=title)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("optimizer state, MiB")
    axes[0].legend(fontsize=7)
    common.save_figure(fig, NAME, device, out)


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(peers.GPT2), choices=list(peers.GPT2))
    ap.add_argument("--all-real", action="store_true",
                    help="instantiate Adapprox at every k for every size (default: every k for gpt2-124m, "
                         "k = 1 and 256 for the others, the closed form checked on those for the rest)")  # fmt: skip
    args = ap.parse_args(argv)
    device = common.setup(args)
    rows = []
    for size in args.sizes:
        params = sum(p.numel() for p in peers.meta_model(size).parameters())
        size_rows = []
        for cfg in configs():
            real = args.all_real or size == "gpt2-124m" or cfg["k"] in (None, RANKS[0], RANKS[-1])
            row = dict(size=size, params=params, label=label(cfg), **cfg, **count_state(size, cfg, real))
            if device.type == "cuda" and (cfg["beta1"] in (0.9, None)) and cfg["k"] in (None, 1, 256):
                row.update(gpu_peak(size, cfg, device))
            else:
                why = "needs a CUDA device; none in this session" if device.type != "cuda" else "not in the GPU subset"
                row["gpu_peak_reason"] = why
            size_rows.append(row)
            mib = row["state_bytes"] / MIB
            print(f"  {size:10s} {row['label']:16s} β1={cfg['beta1']} {mib:10,.2f} MiB ({row['counted']})")
        adamw = next(r for r in size_rows if r["optimizer"] == "adamw" and r["beta1"] == 0.9)["state_bytes"]
        for r in size_rows:
            r["vs_adamw"] = r["state_bytes"] / adamw
        rows += size_rows
    meta = common.metadata(device, galore_rank=peers.GALORE_RANK, paper_table8_mib=PAPER_TABLE8)
    path = common.write_results(NAME, device, rows, meta, args.out)
    common.write_markdown(NAME, device, markdown(rows), args.out)
    plot(rows, device, args.out)
    print(markdown(rows))
    print(f"wrote {path} (+ .csv, .md, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
