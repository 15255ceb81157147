"""Step time of this checkout against another one, measured in turns on the same machine.

Step times move by a millisecond or more between GPU leases, and between runs on one lease,
while the host-side changes they should judge are worth about as much (``compare_step_*`` in
bench/results/). So the comparison runs both checkouts, and fused AdamW as a yardstick, in
alternating child processes, several rounds, and reports the median of each:

    python bench/compare_step.py --baseline ../old-checkout [--size gpt2-345M] [--rank 1]
        [--rounds 4] [--steps 50] [--out bench/results]

Each child builds the GPT-2 parameter shapes of ``bench_step.py`` with random gradients and
runs Adapprox with warm start (l = 1) and CUDA graphs at a fixed rank: 10 steps to capture the
graphs, then ``--steps`` back-to-back steps, timed by the wall clock up to a final sync (a step
ends with a host sync anyway). The baseline checkout needs its extension built (or copied in).
GPU only (elsewhere it says so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a child puts its own tree before this one


def child(tree: str, optimizer: str, size: str, rank: int, steps: int) -> None:
    """Prints ``{"ms": per step, "package": where adapprox_kernels came from}`` as JSON."""
    sys.path.insert(0, tree)
    import torch

    import adapprox_kernels  # first, so that bench_step's own import finds this tree's package

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_step import MODELS, gpt2_shapes, make_params

    params = make_params(gpt2_shapes(*MODELS[size]), torch.device("cuda"))
    if optimizer == "adamw_fused":
        opt = torch.optim.AdamW(params, fused=True)
    else:
        opt = adapprox_kernels.Adapprox(
            params, k_init=rank, k_min=rank, k_max=rank, warm_start=True, warm_power_iters=1, cuda_graphs=True, seed=0
        )
    for _ in range(10):
        opt.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / steps * 1e3
    print(json.dumps({"ms": ms, "package": str(Path(adapprox_kernels.__file__).parent)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="root of the checkout to compare against (required)")
    ap.add_argument("--baseline-label", default="", help="what the baseline is (its commit), for the result file")
    ap.add_argument("--size", default="gpt2-124M", choices=["gpt2-124M", "gpt2-345M"])
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", type=Path, help="write the raw numbers here as compare_step_<size>_k<rank>_<time>.json")
    ap.add_argument("--child", nargs=2, metavar=("TREE", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.size, args.rank, args.steps)
        return
    if args.baseline is None:
        ap.error("--baseline is required")
    import torch

    if not torch.cuda.is_available():  # the children would end in a CUDA error
        print("NOT MEASURED: bench/compare_step.py needs a CUDA device")
        return
    runs = {"baseline": (str(Path(args.baseline).resolve()), "adapprox"), "current": (str(ROOT), "adapprox"),
            "adamw_fused": (str(ROOT), "adamw_fused")}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # neither side always goes first
        for name in order:
            tree, optimizer = runs[name]
            cmd = [sys.executable, __file__, "--child", tree, optimizer, "--size", args.size,
                   "--rank", str(args.rank), "--steps", str(args.steps)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            result = json.loads(out)
            times[name].append(result["ms"])
            print(f"round {r + 1} {name:12s} {result['ms']:7.2f} ms/step  ({result['package']})", flush=True)
    medians = {name: statistics.median(ms) for name, ms in times.items()}
    for name, ms in medians.items():
        print(f"median {name:12s} {ms:7.2f} ms/step  ({ms / medians['adamw_fused']:.2f}x fused AdamW)")
    if args.out:
        from bench.common import metadata

        record = {"meta": metadata(torch.device("cuda"), baseline=args.baseline_label),
                  "args": {k: str(v) for k, v in vars(args).items() if k != "child"},
                  "ms_per_step": times, "median_ms": medians}  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"compare_step_{args.size}_k{args.rank}_{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
