"""``python -m adapprox_kernels.train``: train a small GPT with Adapprox and its peers.

Prints a table (validation loss, optimizer-state bytes and their ratio to AdamW, step time,
final mean rank), and writes ``results.json`` and ``comparison.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .data import ByteBatches, read_corpus
from .model import SIZES
from .optimizers import OPTIMIZERS, default_lrs
from .plot import plot_runs
from .runner import RunConfig, environment, train_one


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m adapprox_kernels.train", description=__doc__)
    ap.add_argument("--data", default=None, help="text file or folder (default: the Python standard library's sources)")
    ap.add_argument("--max-bytes", type=int, default=8_000_000, help="corpus size cap")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model size (gpt2-124m: for a GPU)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the model size's context")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma list of {list(OPTIMIZERS)}")
    ap.add_argument("--lr", default="", help="overrides, e.g. 'adamw=1e-3,adapprox=3e-3'")
    ap.add_argument("--k-max", type=int, default=3, help="Adapprox k_init = k_max (the paper's 256 needs ~10k+ steps to pay off)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/main", help="folder for results.json and comparison.png")
    return ap.parse_args(argv)


def print_table(runs: list[dict]) -> None:
    adamw = next((r["state_bytes"] for r in runs if r["name"] == "adamw"), None)
    head = f"{'optimizer':12s} {'lr':>8s} {'val loss':>9s} {'best val':>9s} {'state bytes':>12s} {'vs AdamW':>9s} {'step ms':>8s} {'opt ms':>7s} {'mean rank':>9s}"
    print(head)
    print("-" * len(head))
    for r in runs:
        ratio = f"{100 * r['state_bytes'] / adamw:.1f}%" if adamw else "-"
        rank = f"{r['final_mean_rank']:.2f}" if r.get("final_mean_rank") is not None else "-"
        print(
            f"{r['name']:12s} {r['lr']:>8.0e} {r['final_val_loss']:>9.4f} {min(r['val_loss']):>9.4f} "
            f"{r['state_bytes']:>12,d} {ratio:>9s} {1e3 * r['step_time_s']:>8.1f} {1e3 * r['opt_time_s']:>7.1f} {rank:>9s}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        sys.exit(f"unknown optimizer(s) {unknown}; choose from {sorted(OPTIMIZERS)}")
    lrs = default_lrs()
    for item in filter(None, args.lr.split(",")):
        key, _, value = item.partition("=")
        lrs[key.strip()] = float(value)
    model_cfg = SIZES[args.size]
    seq_len = args.seq_len or model_cfg.seq_len
    corpus = read_corpus(args.data, args.max_bytes)
    print(f"corpus: {len(corpus):,} bytes from {args.data or 'the Python standard library'}; "
          f"model {args.size}; {args.steps} steps of {args.batch_size}x{seq_len} on {args.device}")  # fmt: skip
    runs = []
    for name in names:
        cfg = RunConfig(
            optimizer=name, lr=lrs[name], steps=args.steps, warmup=args.warmup, eval_every=args.eval_every,
            eval_batches=args.eval_batches, k_max=args.k_max, device=args.device, seed=args.seed,
        )  # fmt: skip
        data = ByteBatches(corpus, seq_len, args.batch_size, seed=args.seed)
        runs.append(train_one(cfg, model_cfg, data))
    print()
    print_table(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(environment(args.device), args=vars(args), corpus_bytes=len(corpus))
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    plot_runs(runs, out / "comparison.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
