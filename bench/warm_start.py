"""Warm start and Rayleigh–Ritz vs the cold S-RSI default: ξ and passes over G per step (CPU is enough).

The same recorded gradient stream (a small MLP learning a random teacher with AdamW, or with
``--gradients tiny-gpt`` the README main job's tiny GPT) is fed to Adapprox instances that
differ only in how S-RSI starts and truncates: cold Gaussian sketch with l = 5 (the paper's
default), 2 or 1, warm start from last step's U with l = 1 or 2, and the first k QR columns
(the paper) or a Rayleigh–Ritz truncation (R-R). V_t depends only on
the gradients and the optimizer's own factors (lr = 0 keeps the dummy parameters fixed), so ξ
is comparable step by step. Each V_t is materialized by the counting reference backend, which
also gives the optimal rank-k error (SVD) for context and counts the operator calls; those map
to passes over G of the Triton backend, checked against the Triton backend's own count
(``TritonSecondMoment.g_passes``) on a small problem. Per matrix and step (after the first
``--skip``), ξ over the optimum: its mean, its max and how many matrix-steps were above 1.5×.

Run: ``python bench/warm_start.py`` (also part of ``bench/bench_step.py``); e.g.
``python bench/warm_start.py --gradients tiny-gpt --rank 4 8 16 --steps 300 --out FILE.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# As a script without a GPU the Triton pass count runs under the interpreter, which must be on
# before anything imports triton: triton.language's own jit functions (tl.cdiv, ...) take the
# mode in force when they are decorated. bench_step.py sets it before importing this module.
if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from adapprox_kernels import Adapprox
from adapprox_kernels.backends import ReferenceBackend, register_backend
from adapprox_kernels.train.data import ByteBatches, read_corpus
from adapprox_kernels.train.model import GPT, SIZES, GPTConfig
from adapprox_kernels.train.optimizers import build_optimizer, default_lrs
from adapprox_kernels.train.runner import warmup_cosine

RANK = 8
OVERSAMPLE = 5
ABOVE = 1.5  # a matrix-step with ξ above this many times the optimum is counted
CONFIGS = {
    "cold l=5 (default)": dict(power_iters=5),
    "cold l=1": dict(power_iters=1),
    "warm l=1": dict(warm_start=True, warm_power_iters=1),
    "warm l=2": dict(warm_start=True, warm_power_iters=2),
    "cold l=2": dict(power_iters=2),
    "cold l=2, R-R": dict(power_iters=2, truncation="rayleigh_ritz"),
    "warm l=1, R-R": dict(warm_start=True, warm_power_iters=1, truncation="rayleigh_ritz"),
}


class _CountingOp:
    """Delegates to the reference operator, counting the calls that read G."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = Counter()
        self.shape, self.dtype, self.device = inner.shape, inner.dtype, inner.device

    def matmul(self, x):
        self.calls["matmul"] += 1
        self.width = x.shape[-1]
        return self.inner.matmul(x)

    def rmatmul(self, y):
        self.calls["rmatmul"] += 1
        return self.inner.rmatmul(y)

    def sq_norm(self):
        self.calls["sq_norm"] += 1
        return self.inner.sq_norm()

    def residual_sq_norm(self, q, u):
        self.calls["residual"] += 1
        return self.inner.residual_sq_norm(q, u)


class CountingReference(ReferenceBackend):
    """The reference backend, recording every step's operator (and V's optimal rank-k error)."""

    name = "counting-reference"
    ops: list[_CountingOp] = []

    @staticmethod
    def second_moment(grads, q, u, beta2, *, eps=None):
        op = _CountingOp(ReferenceBackend.second_moment(grads, q, u, beta2, eps=eps))
        CountingReference.ops.append(op)
        return op

    @staticmethod
    def apply_step(op, params, exp_avgs, **kwargs):
        op.calls["apply"] += 1
        op.params, op.sv = params, torch.linalg.svdvals(op.inner.a.double())
        return ReferenceBackend.apply_step(op.inner, params, exp_avgs, **kwargs)


def optimal_xi(rank: int) -> dict[int, float]:
    """id(parameter) -> the rank-``rank`` SVD's ξ of its V, for the operators of the last step."""
    out = {}
    for op in CountingReference.ops:
        tail = op.sv[:, rank:].square().sum(dim=1)
        xi = (tail / op.sv.square().sum(dim=1).clamp_min(1e-300)).sqrt().tolist()
        out |= {id(p): x for p, x in zip(op.params, xi)}
    return out


register_backend(CountingReference, prefer=False)


def triton_passes(op: _CountingOp, cosine: bool = False, block_r: int = 64) -> int:
    """Passes over G the Triton backend makes for the same calls: one per product and column
    block of the sketch (the first product also yields ‖V‖² and the RMS), one update pass (which
    also yields ξ's numerator), one more for cosine guidance."""
    blocks = -(-op.width // block_r)
    return (op.calls["matmul"] + op.calls["rmatmul"]) * blocks + 1 + int(cosine)


def record_gradients(steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Weight-matrix gradients of a 3-layer MLP learning a random teacher (AdamW, lr 2e-3)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.Tanh(), torch.nn.Linear(96, 32))
    student = torch.nn.Sequential(
        torch.nn.Linear(48, 160), torch.nn.GELU(), torch.nn.Linear(160, 160), torch.nn.GELU(), torch.nn.Linear(160, 32)
    )
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3)
    weights = [m.weight for m in student if isinstance(m, torch.nn.Linear)]
    stream = []
    for _ in range(steps):
        x = torch.randn(64, 48, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        loss = torch.nn.functional.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        stream.append([w.grad.detach().clone() for w in weights])
        opt.step()
    return stream


def record_gpt_gradients(
    steps: int, seed: int = 0, cfg: GPTConfig = SIZES["tiny"], batch_size: int = 16, max_bytes: int = 8_000_000
) -> list[list[torch.Tensor]]:
    """Gradients of the 2-D parameters (the matrices Adapprox factors) of the README main job's
    model, as that job trains it with AdamW for ``steps`` steps: the tiny byte-level GPT of
    ``adapprox_kernels.train``, batches of its default corpus, its AdamW, lr and schedule."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    opt = build_optimizer("adamw", model, default_lrs()["adamw"], "cpu", k_max=3, seed=seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(50, steps))  # the job's default warmup
    data = ByteBatches(read_corpus(None, max_bytes), cfg.seq_len, batch_size, seed=seed)
    matrices = [p for p in model.parameters() if p.dim() == 2]
    stream = []
    for _ in range(steps):
        loss = model.loss(data.train_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        stream.append([p.grad.detach().clone() for p in matrices])
        opt.step()
        sched.step()
    return stream


GRADIENTS = {
    "mlp": (record_gradients, "3-layer MLP (48-160-160-32) learning a random teacher, AdamW lr 2e-3, batch 64"),
    "tiny-gpt": (
        record_gpt_gradients,
        (
            "the README main job's tiny GPT (adapprox_kernels.train, size 'tiny': 4 layers, d_model 128, 16 x 128 "
            "bytes of the default corpus per step), AdamW lr 2e-3 with the job's warmup and cosine over the steps; "
            "every 2-D parameter"
        ),
    ),
}


def xi_trace(stream, options, rank: int = RANK) -> dict:
    """Feed ``stream`` to Adapprox at a fixed rank; ξ, ξ over the SVD optimum (per step, the mean
    over the matrices, and per matrix) and passes per step."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in stream[0]]
    opt = Adapprox(
        params, lr=0.0, weight_decay=0.0, k_init=rank, k_max=rank, k_min=rank, oversample=OVERSAMPLE,
        backend="counting-reference", seed=0, **options,
    )  # fmt: skip
    xis, ratios, per_matrix, passes = [], [], [], []
    for grads in stream:
        CountingReference.ops.clear()
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        step_xi = [opt.state[p]["xi"] for p in params]
        optimum = optimal_xi(rank)  # by parameter: a bucket holds all matrices of one shape
        per_matrix.append([x / optimum[id(p)] for p, x in zip(params, step_xi) if optimum[id(p)] > 0])
        xis.append(statistics.fmean(step_xi))
        ratios.append(statistics.fmean(per_matrix[-1]))
        passes.append(max(triton_passes(op) for op in CountingReference.ops))
    return {"xi": xis, "xi_over_svd_optimum": ratios, "per_matrix": per_matrix, "triton_passes_per_step": passes}


def measured_triton_passes(options, device: torch.device, rank: int = RANK) -> int | None:
    """The Triton backend's own count for one warm (second) step on a small matrix, or None
    when the kernels cannot run here (no GPU and no TRITON_INTERPRET=1)."""
    from adapprox_kernels.triton_backend import TritonBackend

    if TritonBackend.available(device) is not None:
        return None
    ops = []
    build = TritonBackend.second_moment
    try:
        TritonBackend.second_moment = staticmethod(lambda *a, **k: ops.append(build(*a, **k)) or ops[-1])
        p = torch.nn.Parameter(torch.zeros(40, 24, device=device))
        opt = Adapprox([p], k_init=rank, k_max=rank, oversample=OVERSAMPLE, backend="triton", seed=0, **options)
        for _ in range(2):
            p.grad = torch.randn(40, 24, device=device)
            opt.step()
    finally:
        TritonBackend.second_moment = staticmethod(build)
    return ops[-1].g_passes


def run(steps: int = 60, skip: int = 5, rank: int = RANK, gradients: str = "mlp", stream=None) -> dict:
    """ξ (mean over matrices, then over steps ``skip..``), ξ over the SVD optimum per matrix-step
    and passes per step for each config; ``stream``: ``gradients``' recorded stream of ``steps``
    steps (recorded here if None; pass one to share it between ranks)."""
    record, description = GRADIENTS[gradients]
    stream = record(steps) if stream is None else stream
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {
        "setup": {
            "gradients": description,
            "shapes": [list(g.shape) for g in stream[0]],
            "rank": rank, "oversample": OVERSAMPLE, "steps": len(stream), "summary_from_step": skip,
            "beta2": 0.999, "backend": "reference (V materialized to measure ξ and the SVD optimum)",
        },
        "configs": {},
    }  # fmt: skip
    for name, options in CONFIGS.items():
        trace = xi_trace(stream, options, rank)
        tail = slice(skip, None)
        ratios = [r for step in trace["per_matrix"][tail] for r in step]
        above = sum(r > ABOVE for r in ratios)
        out["configs"][name] = {
            "options": options,
            "xi_mean": statistics.fmean(trace["xi"][tail]),
            "xi_max": max(trace["xi"][tail]),
            "xi_over_svd_optimum_mean": statistics.fmean(trace["xi_over_svd_optimum"][tail]),
            "xi_over_svd_optimum_max": max(trace["xi_over_svd_optimum"][tail]),
            "triton_passes_per_step": trace["triton_passes_per_step"][-1],
            "triton_passes_measured": measured_triton_passes(options, device, rank),
            "matrix_steps": {
                "count": len(ratios), "xi_over_svd_optimum_mean": statistics.fmean(ratios),
                "xi_over_svd_optimum_max": max(ratios),
                f"above_{ABOVE}x": above, f"fraction_above_{ABOVE}x": above / len(ratios),
            },
            "xi_per_step": trace["xi"],
        }  # fmt: skip
    return out


def summary(result: dict) -> str:
    lines = [
        (
            f"{'S-RSI start':<20} {'mean ξ':>10} {'max ξ':>10} {'ξ/ξ_svd':>9} {'max':>6} "
            f"{'passes/step':>12} {'(measured)':>11}"
        )
    ]
    for name, r in result["configs"].items():
        measured = "n/a" if r["triton_passes_measured"] is None else str(r["triton_passes_measured"])
        lines.append(
            f"{name:<20} {r['xi_mean']:>10.3e} {r['xi_max']:>10.3e} {r['xi_over_svd_optimum_mean']:>9.3f} "
            f"{r['xi_over_svd_optimum_max']:>6.2f} "
            f"{r['triton_passes_per_step']:>12} {measured:>11}"
        )
    return "\n".join(lines)


def matrix_step_summary(results: list[dict]) -> str:
    """ξ over the SVD optimum per matrix-step, one line per config and rank of ``results``."""
    lines = [f"{'S-RSI start':<20} {'rank':>4} {'ξ/ξ_svd mean':>12} {'max':>6} {f'> {ABOVE}x (of matrix-steps)':>24}"]
    for res in results:
        for name, r in res["configs"].items():
            s = r["matrix_steps"]
            above = f"{s[f'above_{ABOVE}x']} of {s['count']} ({100 * s[f'fraction_above_{ABOVE}x']:.2f}%)"
            lines.append(
                f"{name:<20} {res['setup']['rank']:>4} {s['xi_over_svd_optimum_mean']:>12.4f} "
                f"{s['xi_over_svd_optimum_max']:>6.2f} {above:>24}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    from common import metadata, write_json

    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--gradients", choices=GRADIENTS, default="mlp", help="whose gradient stream (default mlp)")
    ap.add_argument("--rank", type=int, nargs="+", default=[RANK], help=f"fixed ranks (default {RANK})")
    ap.add_argument("--steps", type=int, default=60, help="recorded steps (default 60)")
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the summaries (default 5)")
    ap.add_argument("--out", type=Path, help="also write the results, with the run's metadata, to this JSON file")
    args = ap.parse_args()
    if not 0 <= args.skip < args.steps or min(args.rank) < 1:
        ap.error("expected --rank >= 1 and 0 <= --skip < --steps")
    torch.set_num_threads(1)
    stream = GRADIENTS[args.gradients][0](args.steps)
    results = [run(args.steps, args.skip, rank, args.gradients, stream) for rank in args.rank]
    for res in results:
        print(summary(res) if len(results) == 1 else f"rank {res['setup']['rank']}:\n{summary(res)}")
    print(matrix_step_summary(results))
    for res in results:  # the per-step ξ series stay out of the printout and the file
        for r in res["configs"].values():
            del r["xi_per_step"]
    if args.out:
        meta = metadata("cpu", script="bench/warm_start.py", args=dict(vars(args), out=str(args.out)))
        write_json({"meta": meta, "results": results}, args.out.parent, args.out.name)
    else:
        print("\n".join(json.dumps(res["configs"]) for res in results))
