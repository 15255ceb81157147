"""Warm start and Rayleigh–Ritz vs the cold S-RSI default: ξ and passes over G per step (CPU is enough).

The same recorded gradient stream (a small MLP learning a random teacher with AdamW) is fed to
Adapprox instances that differ only in how S-RSI starts and truncates: cold Gaussian sketch with
l = 5 (the paper's default), 2 or 1, warm start from last step's U with l = 1 or 2, and the first
k QR columns (the paper) or a Rayleigh–Ritz truncation (R-R). V_t depends only on
the gradients and the optimizer's own factors (lr = 0 keeps the dummy parameters fixed), so ξ
is comparable step by step. Each V_t is materialized by the counting reference backend, which
also gives the optimal rank-k error (SVD) for context and counts the operator calls; those map
to passes over G of the Triton backend, checked against the Triton backend's own count
(``TritonSecondMoment.g_passes``) on a small problem.

Run: ``python bench/warm_start.py`` (also part of ``bench/bench_step.py``).
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

from adapprox_kernels import Adapprox  # noqa: E402
from adapprox_kernels.backends import ReferenceBackend, register_backend  # noqa: E402

RANK = 8
OVERSAMPLE = 5
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
        sv = torch.linalg.svdvals(op.inner.a.double())
        tail = sv[:, RANK:].square().sum(dim=1)
        op.xi_svd = (tail / sv.square().sum(dim=1).clamp_min(1e-300)).sqrt().tolist()
        return ReferenceBackend.apply_step(op.inner, params, exp_avgs, **kwargs)


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


def xi_trace(stream, options) -> dict:
    """Feed ``stream`` to Adapprox at a fixed rank; ξ, optimal ξ and calls per step."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in stream[0]]
    opt = Adapprox(
        params, lr=0.0, weight_decay=0.0, k_init=RANK, k_max=RANK, k_min=RANK, oversample=OVERSAMPLE,
        backend="counting-reference", seed=0, **options,
    )  # fmt: skip
    xis, ratios, passes = [], [], []
    for grads in stream:
        CountingReference.ops.clear()
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        step_xi = [opt.state[p]["xi"] for p in params]
        optimum = [x for op in CountingReference.ops for x in op.xi_svd]  # one op per shape, in order
        xis.append(statistics.fmean(step_xi))
        ratios.append(statistics.fmean(x / o for x, o in zip(step_xi, optimum) if o > 0))
        passes.append(max(triton_passes(op) for op in CountingReference.ops))
    return {"xi": xis, "xi_over_svd_optimum": ratios, "triton_passes_per_step": passes}


def measured_triton_passes(options, device: torch.device) -> int | None:
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
        opt = Adapprox([p], k_init=RANK, k_max=RANK, oversample=OVERSAMPLE, backend="triton", seed=0, **options)
        for _ in range(2):
            p.grad = torch.randn(40, 24, device=device)
            opt.step()
    finally:
        TritonBackend.second_moment = staticmethod(build)
    return ops[-1].g_passes


def run(steps: int = 60, skip: int = 5) -> dict:
    """ξ (mean over matrices, then over steps ``skip..``) and passes per step for each config."""
    stream = record_gradients(steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {
        "setup": {
            "gradients": "3-layer MLP (48-160-160-32) learning a random teacher, AdamW lr 2e-3, batch 64",
            "shapes": [list(g.shape) for g in stream[0]],
            "rank": RANK, "oversample": OVERSAMPLE, "steps": steps, "summary_from_step": skip,
            "beta2": 0.999, "backend": "reference (V materialized to measure ξ and the SVD optimum)",
        },  # fmt: skip
        "configs": {},
    }
    for name, options in CONFIGS.items():
        trace = xi_trace(stream, options)
        tail = slice(skip, None)
        out["configs"][name] = {
            "options": options,
            "xi_mean": statistics.fmean(trace["xi"][tail]),
            "xi_max": max(trace["xi"][tail]),
            "xi_over_svd_optimum_mean": statistics.fmean(trace["xi_over_svd_optimum"][tail]),
            "xi_over_svd_optimum_max": max(trace["xi_over_svd_optimum"][tail]),
            "triton_passes_per_step": trace["triton_passes_per_step"][-1],
            "triton_passes_measured": measured_triton_passes(options, device),
            "xi_per_step": trace["xi"],
        }
    return out


def summary(result: dict) -> str:
    lines = [
        f"{'S-RSI start':<20} {'mean ξ':>10} {'max ξ':>10} {'ξ/ξ_svd':>9} {'max':>6} {'passes/step':>12} {'(measured)':>11}"
    ]
    for name, r in result["configs"].items():
        measured = "n/a" if r["triton_passes_measured"] is None else str(r["triton_passes_measured"])
        lines.append(
            f"{name:<20} {r['xi_mean']:>10.3e} {r['xi_max']:>10.3e} {r['xi_over_svd_optimum_mean']:>9.3f} "
            f"{r['xi_over_svd_optimum_max']:>6.2f} "
            f"{r['triton_passes_per_step']:>12} {measured:>11}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.strip().splitlines()[0]).parse_args()  # --help; no options
    torch.set_num_threads(1)
    res = run()
    print(summary(res))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "xi_per_step"} for k, v in res["configs"].items()}))
