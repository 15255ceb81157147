"""ξ in three cases where it is not the stored V's distance from the exact average of G².

The cases of docs/algorithm.md (the table's "gradients too small for float32 squares", and the
rank policies' weak block and least-squares layer), on small matrices: the CPU is enough.

* ``small``: ξ of the first step on a random 24×40 gradient scaled to 1e-6 … 1e-11 (k = 8,
  factored): from about 1e-10 the squares in ξ's sums leave float32's normal range
  (bench/results/xi_cases_cpu.json).
* ``weak_block``: a constant 30×40 gradient of a block of 1s and a block of 2s (V exactly rank
  2), 160 steps from k_max = 8: the rank ξ keeps, the weak block's stored ``Q Uᵀ`` at a step
  with one column next to the exact moving average of G², and the raw updates ``G/√V_t`` of
  both blocks on the step after it.
* ``least_squares``: a 48×64 linear layer fitting a random one from minibatches of 256,
  1,500 steps (k_max = 8, lr 1e-4): ξ next to the stored ``relu(Q Uᵀ)``'s relative distance
  from the exact moving average of G², and that of its best rank-8 approximation.

``python bench/xi_cases.py [--backends reference triton]`` writes
``bench/results/xi_cases_<device>.json`` and ``.csv``; ``triton`` takes the ``small`` case
only (under the interpreter here, set before triton is imported).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from adapprox_kernels import Adapprox, reference
from bench.common import measured, metadata, parser, setup, write_results

SCALES = (1e-6, 1e-9, 3e-10, 1e-10, 7e-11, 5e-11, 3e-11, 1e-11)
BETA2 = 0.999  # Adapprox's default


def small_rows(device: torch.device, backend: str, seeds: int, steps: int = 20) -> list[dict]:
    """Per scale: ξ of the first step and the rank after ``steps`` steps on the same gradient,
    over ``seeds`` gradients (mean, least, largest)."""
    rows = []
    for scale in SCALES:
        xis, ranks = [], []
        for seed in range(seeds):
            g = scale * torch.randn(24, 40, generator=torch.Generator().manual_seed(seed))
            w = torch.nn.Parameter(torch.zeros(24, 40, device=device))
            opt = Adapprox([w], k_max=8, exact_small_matrices=False, seed=0, backend=backend)
            for t in range(steps):
                w.grad = g.to(device)
                opt.step()
                if t == 0:
                    xis.append(opt.state[w]["xi"])
            ranks.append(opt.state[w]["rank"])
        rows.append(dict(
            case="small", backend=backend, scale=scale, seeds=seeds, steps=steps,
            xi_first_mean=round(sum(xis) / seeds, 4), xi_first_min=round(min(xis), 4), xi_first_max=round(max(xis), 4),
            rank_after_mean=round(sum(ranks) / seeds, 3), **measured(),
        ))  # fmt: skip
        print(rows[-1])
    return rows


def weak_block_rows(device: torch.device, seeds: int, steps: int = 160) -> list[dict]:
    """Per sketch seed: the rank over the last 10 steps, the stored factors' widths, and at the
    last step that stored one column, the weak block's ``Q Uᵀ`` and the raw updates after it."""
    g = torch.zeros(30, 40, device=device)
    g[:15, :20], g[15:, 20:] = 1.0, 2.0
    weak, strong = (slice(None, 15), slice(None, 20)), (slice(15, None), slice(20, None))
    rows = []
    for seed in range(seeds):
        w = torch.nn.Parameter(torch.zeros(30, 40, device=device))
        opt = Adapprox([w], lr=1e-4, k_max=8, seed=seed, backend="reference")
        ranks, widths, one_column = [], [], None
        for t in range(1, steps + 1):
            w.grad = g.clone()
            opt.step()
            state = opt.state[w]
            ranks.append(state["rank"])
            widths.append(state["Q"].shape[1])
            if widths[-1] == 1 and t < steps:
                one_column = t, state["Q"].clone(), state["U"].clone()
        t, q, u = one_column
        v_next = reference.second_moment(g[None], q[None], u[None], BETA2)[0]  # V_t of step t + 1
        raw = g / (v_next.sqrt() + 1e-8)
        rows.append(dict(
            case="weak_block", seed=seed, steps=steps, last_ranks=[round(r, 3) for r in ranks[-10:]],
            last_widths=widths[-10:], one_column_step=t,
            weak_qu_max=(q @ u.T)[weak].abs().max().item(), weak_exact_average=1 - BETA2**t,
            raw_update_weak=raw[weak].mean().item(), raw_update_strong=raw[strong].mean().item(),
            raw_update_exact=1 / (1 - BETA2 ** (t + 1)) ** 0.5, **measured(),
        ))  # fmt: skip
        print(rows[-1])
    return rows


def least_squares_rows(device: torch.device, seeds: int, steps: int = 1500) -> list[dict]:
    """Per seed (teacher, data and sketches): ξ and the two distances after ``steps`` steps."""
    rows = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        teacher = torch.randn(48, 64, generator=gen)
        layer = torch.nn.Linear(64, 48, bias=False, device=device)
        torch.nn.init.zeros_(layer.weight)
        opt = Adapprox(layer.parameters(), lr=1e-4, k_max=8, seed=seed, backend="reference")
        w, average = layer.weight, torch.zeros(48, 64, dtype=torch.float64, device=device)
        for _ in range(steps):
            x = torch.randn(256, 64, generator=gen)
            y = x @ teacher.T + 0.1 * torch.randn(256, 48, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(layer(x.to(device)), y.to(device)).backward()
            average.mul_(BETA2).add_(w.grad.double().square(), alpha=1 - BETA2)
            opt.step()
        state = opt.state[w]
        stored = (state["Q"] @ state["U"].T).clamp_min(0).double()
        sigma = torch.linalg.svdvals(average)
        rows.append(dict(
            case="least_squares", seed=seed, steps=steps, xi=state["xi"], rank=state["rank"],
            stored_from_average=((stored - average).norm() / average.norm()).item(),
            best_rank8_from_average=(sigma[8:].norm() / sigma.norm()).item(), **measured(),
        ))  # fmt: skip
        print(rows[-1])
    return rows


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["reference"], help="for the small case")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    device = setup(args)
    rows = [r for b in args.backends for r in small_rows(device, b, args.seeds)]
    rows += weak_block_rows(device, 3) + least_squares_rows(device, args.seeds)
    print(write_results("xi_cases", device, rows, metadata(device), args.out))


if __name__ == "__main__":
    main()
