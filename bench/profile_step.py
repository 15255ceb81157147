"""Where an Adapprox step spends its time: torch.profiler over a few steps on GPT-2 shapes.

``python bench/profile_step.py [--size gpt2-124M] [--backend triton] [--warm] [--graphs] [--python]
[--trace FILE]`` prints the top operators by device time and by host time, how much of each step
the device is busy (the rest is waiting for the host), how much of a step the host spends
waiting at the step's syncs (measured without the profiler), the number of host syncs per step and
where they come from, with ``--python`` the Python functions that take the most host time, and
with ``--trace`` writes a Chrome trace of the profiled steps. GPU only (elsewhere it says so).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapprox_kernels import Adapprox
from bench.bench_step import MODELS, gpt2_shapes, make_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="gpt2-345M", choices=sorted(MODELS))
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--warm", action="store_true")
    ap.add_argument("--graphs", action="store_true", help="cuda_graphs=True (the profiled steps are replays)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--python", action="store_true", help="also print the Python functions by own host time")
    ap.add_argument("--trace", help="write a Chrome trace (JSON) of the profiled steps here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("NOT MEASURED: bench/profile_step.py needs a CUDA device")
        return
    device = torch.device("cuda")
    params = make_params(gpt2_shapes(*MODELS[args.size]), device)
    k = dict(k_init=args.rank, k_min=args.rank, k_max=args.rank)
    opt = Adapprox(params, **k, backend=args.backend, warm_start=args.warm, cuda_graphs=args.graphs, seed=0)
    for _ in range(5):  # warm-up: kernel compilation, lazy state, handles, graph capture
        opt.step()
    torch.cuda.synchronize()
    step_ms, wait_ms = host_split(opt, steps=50)
    print(
        f"step {step_ms:.2f} ms without the profiler, of which the host waits {wait_ms:.2f} ms at syncs "
        f"and works {step_ms - wait_ms:.2f} ms"
    )
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            opt.step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = args.trace or os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        busy, span = device_busy(trace)
    print(
        f"device busy {busy / args.steps / 1e3:.2f} ms of {span / args.steps / 1e3:.2f} ms per step "
        f"({busy / span:.0%}); the rest the device waits for the host"
    )
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=25))
    print(table.table(sort_by="self_cpu_time_total", row_limit=25))
    syncs = sum(e.count for e in table if "Synchronize" in e.key or e.key == "aten::_local_scalar_dense")
    print(f"host syncs per step: {syncs / args.steps:.1f}")
    print("where the syncs come from (operator chain, calls per step):")
    for chain, count in sync_sources(prof).most_common():
        print(f"  {count / args.steps:6.1f}  {chain}")
    # torch's own sync check names the Python line of each sync it sees (not those inside
    # cuBLAS/cuSOLVER, which only the profiler chain above shows).
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    torch.cuda.set_sync_debug_mode("default")
    lines = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    print("syncs torch reports in one step, by Python line:", dict(lines.most_common()))
    if args.python:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [opt.step() for _ in range(args.steps)])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats("adapprox_kernels", 40)


def host_split(opt: Adapprox, steps: int) -> tuple[float, float]:
    """(ms per step, ms of it the host spends in ``to_host``, i.e. waiting at the step's syncs),
    over ``steps`` back-to-back steps."""
    from adapprox_kernels import adapprox, optim_base

    waited = [0.0]
    original = optim_base.to_host

    def timed(tensors):
        start = time.perf_counter()
        try:
            return original(tensors)
        finally:
            waited[0] += time.perf_counter() - start

    adapprox.to_host = optim_base.to_host = timed
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
        total = time.perf_counter() - start
    finally:
        adapprox.to_host = optim_base.to_host = original
    return total / steps * 1e3, waited[0] / steps * 1e3


def device_busy(trace: str) -> tuple[float, float]:
    """From a Chrome trace: (µs with at least one kernel, copy or memset running, µs from the
    first of them to the last). The trace, not ``prof.events()``: those also hold the device-side
    step annotations, which span whole steps."""
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    spans = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )  # fmt: skip
    busy, end = 0.0, float("-inf")
    for start, stop in spans:  # union of intervals
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy, spans[-1][1] - spans[0][0]


def sync_sources(prof: torch.profiler.profile) -> Counter:
    """Count host syncs by the chain of operators that issued them (outermost step left out)."""
    sources: Counter = Counter()
    for event in prof.events():
        if "Synchronize" not in event.name and event.name != "aten::_local_scalar_dense":
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None and not parent.name.startswith("Optimizer.step"):
            chain.append(parent.name)
            parent = parent.cpu_parent
        sources[" > ".join([*reversed(chain), event.name])] += 1
    return sources


if __name__ == "__main__":
    main()
