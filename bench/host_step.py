"""Host time of a CUDA-graphed Adapprox step, measured on a CPU with the replays stubbed.

On a GPU a warm graphed step is host-bound (the device busy 29–70% of it:
bench/results/profile_step_cuda_h100_warm_graphs_*.txt): the Python around the graph
launches, not the kernels, sets its time. This script measures that Python where there is no
GPU. Each graphed call runs for real (Triton interpreter) until its key would be captured; the
"capture" runs it once more, on buffers of its own, and a "replay" then loads the call's inputs
into those buffers and returns that run's outputs, through CallGraphs' own lookups and loads.
The step's own work (sketches, keys, the gate, the reads, the rank decisions and the narrowing
copies) runs as usual, on CPU tensors.

    TRITON_INTERPRET=1 python bench/host_step.py [--layers 12] [--width 32] [--steps 200]
        [--schedule onecycle] [--out DIR]

Prints and writes (``host_step_*.json``) the median host time per step, split at the step's
device reads: before the first (the preamble, S-RSI and the launched updates) and after the
last (the rank decisions and new factors: on a GPU, time it stands idle). The GPT-2 layout of
``bench_step.py`` at a small width, vocabulary 96 and context 64; warm start, k = 1.
``--schedule onecycle`` steps a ``OneCycleLR`` after each step, which writes a new α and β1
into the groups every step; ``eager_calls`` counts the graphable calls per step that ran
without a graph (each one runs its kernels in the interpreter here, so ``ms`` then measures
the interpreter too, not the host alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_step import gpt2_shapes, make_params  # noqa: E402
from common import metadata, write_json  # noqa: E402

import adapprox_kernels.adapprox as adapprox_module  # noqa: E402
import adapprox_kernels.optim_base as base_module  # noqa: E402
from adapprox_kernels import Adapprox  # noqa: E402
from adapprox_kernels.cuda_graphs import CallGraphs, _Captured  # noqa: E402


class _NoGraph:
    """Stands in for a captured ``torch.cuda.CUDAGraph``: its replay launches nothing, and
    counts the ``calls`` it holds in ``counts["calls replayed"]`` (a batch holds several)."""

    def __init__(self, counts: Counter, calls: int):
        self.counts, self.calls = counts, calls

    def replay(self) -> None:
        self.counts["calls replayed"] += self.calls


class StubGraphs(CallGraphs):
    """Captures by running the call once on buffers of its own and storing a graph whose replay
    does nothing; everything else (keys, lookups, the input loads before a replay, the
    outputs handed back) is CallGraphs' own: a replay without the kernels."""

    def _capture(self, key, fn, inputs, calls):
        static = [t.clone() for t in inputs]
        outputs = fn(*static)
        self._store(key, _Captured(_NoGraph(self.counts, calls), static, outputs, []), calls)
        self.counts["captured"] += 1
        return outputs


def measure(layers: int, width: int, steps: int, schedule: str = "none") -> dict:
    """``{"ms", "before_first_read_ms", "after_last_read_ms", "reads", "graph_calls",
    "graphed_calls", "eager_calls"}``: medians (the calls: means) per step over ``steps`` steps
    after 10 warm-up steps. ``graph_calls`` counts the graphs replayed, ``graphed_calls`` the
    calls they held: the graphs a step would replay without batching."""
    params = make_params(gpt2_shapes(width, layers, vocab=96, ctx=64), torch.device("cpu"))
    decay = [p for p in params if p.dim() >= 2]
    groups = [{"params": decay}, {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = Adapprox(groups, k_max=1, warm_start=True, cuda_graphs=True, seed=0, backend="triton")
    opt._graphs = StubGraphs()
    warmup = 10
    scheduler = None
    if schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=warmup + steps + 1)
    # The graph path on CPU tensors: only its CUDA check stands in the way.
    graphable = Adapprox._graphable
    Adapprox._graphable = staticmethod(lambda group, *args: group["cuda_graphs"])
    reads: list[tuple[float, float]] = []
    to_host = base_module.to_host

    def timed_to_host(values):
        start = time.perf_counter()
        out = to_host(values)
        if any(torch.is_tensor(v) for v in values):
            reads.append((start, time.perf_counter()))
        return out

    base_module.to_host = adapprox_module.to_host = timed_to_host
    try:
        for _ in range(warmup):
            opt.step()
            if scheduler is not None:
                scheduler.step()
        counts_before = opt._graphs.counts.copy()
        totals, befores, afters, n_reads = [], [], [], []
        for _ in range(steps):
            reads.clear()
            start = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            totals.append(end - start)
            befores.append(reads[0][0] - start)
            afters.append(end - reads[-1][1])
            n_reads.append(len(reads))
            if scheduler is not None:
                scheduler.step()
        counts = opt._graphs.counts - counts_before
    finally:
        Adapprox._graphable = graphable
        base_module.to_host = adapprox_module.to_host = to_host

    def ms(seconds: list[float]) -> float:
        return round(statistics.median(seconds) * 1e3, 4)

    return {
        "ms": ms(totals), "before_first_read_ms": ms(befores), "after_last_read_ms": ms(afters),
        "reads": statistics.median(n_reads), "graph_calls": counts["replayed"] / steps,
        "graphed_calls": counts["calls replayed"] / steps, "eager_calls": counts["eager"] / steps,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--schedule", choices=("none", "onecycle"), default="none")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(args.layers, args.width, args.steps, args.schedule)
    record = {
        "meta": metadata("cpu"), "layers": args.layers, "width": args.width, "steps": args.steps,
        "schedule": args.schedule, **result,
    }  # fmt: skip
    print(
        f"host time per step {result['ms']:.3f} ms: {result['before_first_read_ms']:.3f} before the first device "
        f"read, {result['after_last_read_ms']:.3f} after the last; {result['reads']:g} reads, "
        f"{result['graph_calls']:g} graph calls (holding {result['graphed_calls']:g} calls) and "
        f"{result['eager_calls']:g} eager ones per step"
    )
    schedule = "" if args.schedule == "none" else f"_{args.schedule}"
    write_json(
        record, args.out, f"host_step_{args.layers}x{args.width}{schedule}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    )


if __name__ == "__main__":
    main()
