"""Does tf32 in the S-RSI products change what Adapprox decides? A shadow-optimizer study.

One model (the main job's byte-level GPT) trains with Adapprox at the default product precision
(fp32; ``tf32x3`` on a GPU). At every step shadow Adapprox instances, identical but for one
thing, step their own copies of the parameters with the *same* gradients: no feedback, so each
differs from the reference by that one thing alone. The shadows:

* ``fp32_seed1``, the control: default precision, another sketch seed. It shows how far the
  algorithm's own randomness moves a run, which is what the other gaps must be read against.
* on a GPU, ``product_precision`` = each of ``--precisions`` (Triton backend);
* on CPU, tf32 emulated on the reference backend: ``V`` and the thin input of a product are cut
  to tf32's 10 mantissa bits, by truncation (``trunc``: what the tensor cores do to fp32
  operands) or to nearest (``nearest``), and multiplied in fp32; in every product (``_all``) or
  in all but S-RSI's last ``U = Vᵀ Q`` (``_range``). On a GPU, ``"tf32"`` is ``trunc_all``,
  ``"tf32_range"`` is ``trunc_range`` and ``"tf32_rn"`` is ``nearest_all``.

Recorded per step: ξ and the rank of every factored matrix, and the parameter gap
``‖W_shadow − W_ref‖ / ‖W_ref − W_0‖``; summed up: mean ξ (from ``--summary-from``), rank
decisions that differ from the reference, final gap.

``python bench/product_precision.py [--size S] [--steps 120] [--k-max 8] [--warm]
[--precisions tf32 tf32_range tf32_rn]`` writes
``bench/results/product_precision_<cold|warm>_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapprox_kernels import Adapprox
from adapprox_kernels.backends import ReferenceBackend, register_backend
from adapprox_kernels.reference import ReferenceSecondMoment, tf32_rounded
from adapprox_kernels.train.data import ByteBatches, read_corpus
from adapprox_kernels.train.model import GPT, SIZES
from adapprox_kernels.train.runner import warmup_cosine
from bench.common import metadata


class EmulatedTF32Moment(ReferenceSecondMoment):
    """The reference operator with tf32 products (:class:`ExactProjection` also offers the exact
    ``project`` that S-RSI uses for its last product)."""

    def __init__(self, grad, q, u, beta2, rounding: str):
        super().__init__(grad, q, u, beta2)
        self.rounding = rounding
        self.a_tf32 = tf32_rounded(self.a, rounding)

    def matmul(self, x):
        return torch.bmm(self.a_tf32, tf32_rounded(x, self.rounding))

    def rmatmul(self, y):
        return torch.bmm(tf32_rounded(y, self.rounding).transpose(1, 2), self.a_tf32).transpose(1, 2)


class ExactProjection(EmulatedTF32Moment):
    def project(self, y):
        return ReferenceSecondMoment.rmatmul(self, y)


def emulated_backend(rounding: str, exact_projection: bool) -> str:
    """Register a reference backend with emulated tf32 products; returns its name."""
    moment = ExactProjection if exact_projection else EmulatedTF32Moment

    class Backend(ReferenceBackend):
        name = f"tf32emu-{rounding}-{'range' if exact_projection else 'all'}"

        @staticmethod
        def second_moment(grads, q, u, beta2, *, eps=None):
            return moment(torch.stack([x.to(q.dtype) for x in grads]), q, u, beta2, rounding)

    register_backend(Backend, prefer=False)
    return Backend.name


def shadow_options(device: str, precisions: list[str]) -> dict[str, dict]:
    """label -> the options by which a shadow differs from the reference."""
    out = {"fp32_seed1": dict(seed=1)}
    if device == "cuda":
        return out | {p: dict(product_precision=p) for p in precisions}
    return out | {
        f"{rounding}_{'range' if exact else 'all'}": dict(backend=emulated_backend(rounding, exact))
        for rounding in ("trunc", "nearest")
        for exact in (False, True)
    }


def factored_states(opt: Adapprox, params) -> list[dict]:
    return [opt.state[p] for p in params if "Q" in opt.state.get(p, {})]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default=None, choices=sorted(SIZES), help="default: gpt2-124m on a GPU, small on CPU")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--warm", action="store_true", help="warm-start S-RSI (l = 1) in all")
    ap.add_argument("--precisions", nargs="+", default=["tf32", "tf32_range", "tf32_rn"], help="GPU shadows")
    ap.add_argument("--summary-from", type=int, default=20, help="first step of the mean ξ")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not 1 <= args.summary_from <= args.steps:  # before training, not a StatisticsError after it
        ap.error(f"--summary-from {args.summary_from} must be within the run's steps, 1 to --steps {args.steps}")
    return args


def train(args: argparse.Namespace, device: str, cfg) -> tuple[list[dict], list[str], list[str]]:
    """The reference run and its shadows: ``(rows, shadow labels, factored matrices' names)``."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    start = [p.detach().clone() for p in model.parameters()]
    common = dict(lr=2e-3, k_init=args.k_max, k_max=args.k_max, seed=0, warm_start=args.warm,
                  backend="triton" if device == "cuda" else "reference")  # fmt: skip
    ref = Adapprox(model.parameters(), **common)
    shadows = {}
    for label, options in shadow_options(device, args.precisions).items():
        params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        shadows[label] = (params, Adapprox(params, **(common | options)))
    opts = [ref] + [opt for _, opt in shadows.values()]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(20, args.steps)) for o in opts]
    data = ByteBatches(read_corpus(None, 8_000_000), cfg.seq_len, args.batch_size, seed=0)
    rows = []
    for step in range(1, args.steps + 1):
        loss = model.loss(data.train_batch().to(device))
        ref.zero_grad(set_to_none=True)
        loss.backward()
        for params, _ in shadows.values():
            for p, s in zip(model.parameters(), params):
                s.grad = p.grad
        for opt in opts:
            opt.step()
        for sched in scheds:
            sched.step()
        row = record(step, loss.item(), list(model.parameters()), ref, start, shadows)
        rows.append(row)
        if step % 20 == 0 or step == 1:
            parts = "  ".join(f"{label} {statistics.mean(row[label]['xi']):.2e}" for label in shadows)
            print(f"step {step:4d}  loss {row['loss']:.3f}  mean ξ: ref {statistics.mean(row['xi']):.2e}  {parts}",
                  flush=True)  # fmt: skip
    names = [n for n, p in model.named_parameters() if "Q" in ref.state.get(p, {})]
    return rows, list(shadows), names


@torch.no_grad()
def record(step: int, loss: float, weights: list, ref: Adapprox, start: list, shadows: dict) -> dict:
    """One step's row: ξ and rank of the reference's factored matrices and, per shadow, those
    and its parameter gap ``‖W_shadow − W_ref‖ / ‖W_ref − W_0‖``."""
    ref_states = factored_states(ref, weights)
    row = dict(step=step, loss=loss, xi=[s["xi"] for s in ref_states], rank=[s["rank"] for s in ref_states])
    moved = sum((p - w0).square().sum() for p, w0 in zip(weights, start)).sqrt()
    for label, (params, opt) in shadows.items():
        gap = sum((s - p).square().sum() for p, s in zip(weights, params)).sqrt()
        states = factored_states(opt, params)
        row[label] = dict(param_gap=(gap / moved).item(), xi=[s["xi"] for s in states],
                          rank=[s["rank"] for s in states])  # fmt: skip
    return row


def summarize(rows: list[dict], labels: list[str], summary_from: int) -> dict:
    """Mean ξ from step ``summary_from`` on, rank decisions that differ, final parameter gap."""
    tail = [r for r in rows if r["step"] >= summary_from]
    summary = {"reference": dict(mean_xi=statistics.mean(x for r in tail for x in r["xi"]))}
    for label in labels:
        summary[label] = dict(
            mean_xi=statistics.mean(x for r in tail for x in r[label]["xi"]),
            rank_decisions_that_differ=sum(
                round(a) != round(b) for r in rows for a, b in zip(r["rank"], r[label]["rank"])
            ),
            final_param_gap=rows[-1][label]["param_gap"],
        )
    summary["rank_decisions"] = len(rows) * len(rows[0]["rank"])
    return summary


def main() -> None:
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = SIZES[args.size or ("gpt2-124m" if device == "cuda" else "small")]
    rows, labels, names = train(args, device, cfg)
    summary = summarize(rows, labels, args.summary_from)
    print(json.dumps(summary, indent=1))
    meta = metadata(device, args=vars(args), size=cfg.__dict__, matrices=names)
    device_name = torch.cuda.get_device_name().lower().replace(" ", "-") if device == "cuda" else "cpu"
    out = Path(args.out) / f"product_precision_{'warm' if args.warm else 'cold'}_{device_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
