"""The fewest bytes an optimizer step moves, and the step time that allows against fused AdamW.

A step over a large model streams its tensors: fused AdamW reads W, G, M, V and writes W, M, V
(seven passes of the parameter's size) and runs near copy bandwidth on an H100 (2.6 TB/s,
bench/results/traffic_bound_cuda.md). Adapprox's fused Triton step (docs/kernels.md) reads G
once per pass over it (``2l + 1``: ``l`` times ``V @ U`` and ``Vᵀ Q``, then the update, which
also reduces ξ's numerator; one more with cosine guidance; a product re-reads G per 64 columns
of its sketch), and reads and writes W and M once, in the update pass. Its thin matrices
(factors, sketches: ``O((m + n)·r)``, 0.8–2% of G at these shapes: ``thin_MB`` in
bench/results/traffic_bound_cuda.md) are left out, so the bytes here are a lower bound. Dense
parameters (vectors, matrices too small to factor) read G and ``V_{t−1}`` in a sums pass, then
G, V, W, M in the update pass, which writes V, W and M.

At the bandwidth fused AdamW achieves, no Adapprox step can take less than ``its bytes /
AdamW's bytes`` times AdamW's step: the ``floor ×`` column. Issue 3 asks for ≤ 1.5× cold and
≤ 1.1× warm. Given a ``bench_step.py`` result file, each measured step is set next to its floor,
and the step's measured peak memory above the state next to the size of one fp32 set of the
batched thin matrices, ``Σ (m + n)·r`` over the factored parameters (issue 3: "at most the
batched thin sketches, no m × n fp32 temporary").

    python bench/traffic_bound.py [--results bench/results/bench_step_<gpu>_<time>.json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_step import MODELS, gpt2_shapes  # noqa: E402
from common import markdown_table, rel, write_markdown, write_results  # noqa: E402

from adapprox_kernels import Adapprox  # noqa: E402
from adapprox_kernels.adapprox import matrix_shape  # noqa: E402
from adapprox_kernels.kernels._launch import PRODUCT_BLOCKS  # noqa: E402
from adapprox_kernels.srsi import sketch_width  # noqa: E402


@dataclass(frozen=True)
class Step:
    """An Adapprox configuration as ``bench_step.py`` times it (fixed rank ``k``)."""

    name: str  # the bench_step.py row it matches (``adapprox_k{k}_{name}_graphs``)
    power_iters: int  # l: cold 5 (the paper), warm start 1
    k: int
    momentum: bool = True  # β1 > 0
    cosine: bool = False
    oversample: int = 5


def g_passes(step: Step, m: int, n: int) -> int:
    """Passes over G of a factored ``m × n`` matrix: ``2l`` products (each once per
    ``PRODUCT_BLOCKS.r`` columns of the sketch), the update, and the cosine sums when on."""
    width = sketch_width(step.k, step.oversample, m, n)
    return 2 * step.power_iters * math.ceil(width / PRODUCT_BLOCKS.r) + 1 + int(step.cosine)


def factored_shape(shape: tuple[int, ...], step: Step) -> tuple[int, int] | None:
    """``(m, n)`` where the optimizer factors a parameter of this shape (``exact_small_matrices``:
    dense when ``min(m, n) <= k_max + p``), None where it keeps a dense V."""
    mn = matrix_shape(torch.empty(shape, device="meta"))
    group = {"exact_small_matrices": True, "k_max": step.k, "oversample": step.oversample}
    return mn if mn is not None and not Adapprox._is_dense_matrix(mn, group) else None


def adamw_bytes(shapes: list[tuple[int, ...]], param: int = 4, grad: int = 4) -> int:
    """Fused AdamW: W, M, V read and written (in the parameter's dtype), G read."""
    return sum(math.prod(s) * (6 * param + grad) for s in shapes)


def adapprox_bytes(shapes: list[tuple[int, ...]], step: Step, param: int = 4, grad: int = 4) -> int:
    """Adapprox's fused step, thin matrices left out (:func:`factored_shape` says which
    parameters are factored)."""
    w_and_m = 2 * param * (2 if step.momentum else 1)
    total = 0
    for s in shapes:
        numel = math.prod(s)
        mn = factored_shape(s, step)
        if mn is not None:
            total += numel * (grad * g_passes(step, *mn) + w_and_m)
        else:  # sums pass: G, V; update pass: G, V read and written (fp32), W, M
            total += numel * (2 * grad + 3 * 4 + w_and_m)
    return total


def thin_bytes(shapes: list[tuple[int, ...]], step: Step) -> int:
    """One fp32 set of the thin matrices S-RSI works on (``(m, r)`` and ``(n, r)`` per factored
    parameter, ``r`` the sketch width)."""
    factored = [mn for mn in (factored_shape(s, step) for s in shapes) if mn is not None]
    return sum(4 * (m + n) * sketch_width(step.k, step.oversample, m, n) for m, n in factored)


STEPS = [
    Step("cold", power_iters=5, k=1),
    Step("warm", power_iters=1, k=1),
    Step("cold", power_iters=5, k=8),
    Step("warm", power_iters=1, k=8),
    Step("cold", power_iters=5, k=1, momentum=False),  # β1 = 0: not timed by bench_step.py
    Step("warm", power_iters=1, k=1, momentum=False),
]


def rows(measured: dict | None) -> list[dict]:
    """One row per (model, configuration); with ``measured`` (a bench_step.py result's ``gpu``
    part) also the measured step, AdamW's achieved bandwidth and the measured / floor ratio."""
    out = []
    for model, (width, layers) in MODELS.items():
        shapes = gpt2_shapes(width, layers)
        base = adamw_bytes(shapes)
        timed = (measured or {}).get(model, {}).get("step", {})
        adamw_ms = timed.get("adamw_fused", {}).get("median_ms")
        for step in STEPS:
            row = {
                "model": model,
                "config": f"k={step.k} {step.name} (l={step.power_iters}){'' if step.momentum else ', β1=0'}",
                "adamw_MB": round(base / 1e6, 1), "adapprox_MB": round(adapprox_bytes(shapes, step) / 1e6, 1),
            }  # fmt: skip
            row["floor_x_adamw"] = round(row["adapprox_MB"] / row["adamw_MB"], 3)
            row["thin_MB"] = round(thin_bytes(shapes, step) / 1e6, 2)
            name = f"adapprox_k{step.k}_{step.name}"
            entry = timed.get(f"{name}_graphs") if step.momentum else None
            if adamw_ms and entry:
                row["adamw_ms"] = round(adamw_ms, 3)
                row["adamw_TBps"] = round(base / adamw_ms / 1e9, 2)
                row["floor_ms"] = round(row["floor_x_adamw"] * adamw_ms, 3)
                row["measured_ms"] = round(entry["median_ms"], 3)
                row["measured_x_adamw"] = round(entry["median_ms"] / adamw_ms, 2)
                row["measured_over_floor"] = round(entry["median_ms"] / row["floor_ms"], 2)
                for label, timed_entry in (("eager", timed.get(name)), ("graphs", entry)):
                    if timed_entry and "step_peak_extra_bytes" in timed_entry:
                        extra = timed_entry["step_peak_extra_bytes"]
                        row[f"peak_extra_MB_{label}"] = round(extra / 1e6, 2)
                        row[f"peak_over_thin_{label}"] = round(extra / 1e6 / row["thin_MB"], 2)
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="a bench_step.py result file (GPU) to compare with")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    record = json.loads(args.results.read_text()) if args.results else {}
    if args.results and not isinstance(record.get("gpu"), dict):  # a CPU run's file: "NOT MEASURED: ..."
        raise SystemExit(f"{args.results} has no GPU measurements to compare with: {record.get('gpu')}")
    table = rows(record.get("gpu"))
    headers = list(dict.fromkeys(k for row in table for k in row))
    text = markdown_table(headers, [[row.get(h, "") for h in headers] for row in table])
    print(text)
    if args.results:  # derived from a GPU file: kept with its provenance
        meta = {**record["meta"], "source": rel(args.results)}
        path = write_results("traffic_bound", "cuda", table, meta, args.out)
        write_markdown(
            "traffic_bound", "cuda", f"Source: `{meta['source']}` (commit {meta.get('commit')})\n\n{text}", args.out
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
