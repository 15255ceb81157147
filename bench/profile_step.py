"""Where an Adapprox step spends its time: torch.profiler over a few steps on GPT-2 shapes.

``python bench/profile_step.py [--size 345m] [--backend triton] [--warm]`` prints the top
operators by device time and by host time, and the number of host syncs per step. GPU only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapprox_kernels import Adapprox  # noqa: E402
from bench.bench_step import MODELS, gpt2_shapes, make_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="gpt2-345M", choices=sorted(MODELS))
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--warm", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda")
    params = make_params(gpt2_shapes(*MODELS[args.size]), device)
    k = dict(k_init=args.rank, k_min=args.rank, k_max=args.rank)
    opt = Adapprox(params, **k, backend=args.backend, warm_start=args.warm, seed=0)
    for _ in range(3):  # warm-up: kernel compilation, lazy state, handle creation
        opt.step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            opt.step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=25))
    print(table.table(sort_by="self_cpu_time_total", row_limit=25))
    syncs = sum(e.count for e in table if "Synchronize" in e.key or e.key == "aten::_local_scalar_dense")
    print(f"host syncs per step: {syncs / args.steps:.1f}")


if __name__ == "__main__":
    main()
