"""Figures 3/4 of the paper: Adapprox's rank over training per matrix type, and the validation
loss of every optimizer, from the main job (``python -m adapprox_kernels.train``).

It reads the main job's ``results.json`` (``--from``, default ``runs/main/results.json``) when
there is one; otherwise (or with ``--rerun``) it runs a shortened main job itself through the
same command-line entry point (tiny model, 200 steps of 8 × 128 bytes on CPU). The figure is the
main job's own plot (:func:`adapprox_kernels.train.plot.plot_runs`).

    python -m bench.fig3_4_training
"""

from __future__ import annotations

import json
from pathlib import Path

from adapprox_kernels.train.__main__ import main as train_main
from adapprox_kernels.train.model import SIZES
from adapprox_kernels.train.optimizers import OPTIMIZERS
from adapprox_kernels.train.plot import plot_runs

from . import common

NAME = "fig3_4_training"
DEFAULT_FROM = Path("runs/main/results.json")
# The paper's Figure 3: mean rank after the first ~1k iterations (GPT-2 117M, BERT 345M).
PAPER_MEAN_RANK = {"GPT-2 117M": 1.4, "BERT 345M": 7.7}


def shortened_job(args, device) -> Path:
    """Run the main job with short settings; returns its results.json."""
    out = common.RESULTS / "cache" / f"main_short_{common.device_tag(device)}"
    train_main([
        "--size", args.size, "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--batch-size", str(args.batch_size), "--eval-every", str(args.eval_every), "--eval-batches", "4",
        "--optimizers", args.optimizers, "--device", str(device), "--max-bytes", "2000000", "--out", str(out),
    ])  # fmt: skip
    return out / "results.json"


def summary_rows(runs: list[dict]) -> list[dict]:
    runs = [r for r in runs if "error" not in r]  # a run that failed in the main job has no numbers
    adamw = next((r["state_bytes"] for r in runs if r["name"] == "adamw"), None)
    out = []
    for r in runs:
        losses = [v for v in r["val_loss"] if v is not None]  # a diverged run's NaN losses are null
        out.append(dict(
            optimizer=r["name"], lr=r["lr"],
            final_val_loss=r["final_val_loss"], best_val_loss=min(losses, default=None),
            state_bytes=r["state_bytes"], vs_adamw=r["state_bytes"] / adamw if adamw else None,
            step_time_s=r["step_time_s"], opt_time_s=r["opt_time_s"], final_mean_rank=r.get("final_mean_rank"),
            final_ranks_by_type=json.dumps(r["ranks"][-1]) if r.get("ranks") else "",
        ))  # fmt: skip
    return out


def markdown(rows: list[dict], job_meta: dict) -> str:
    def loss(v):
        return "—" if v is None else f"{v:.4f}"  # null: the run diverged

    lines = [(r["optimizer"], f"{r['lr']:g}", loss(r["final_val_loss"]), loss(r["best_val_loss"]),
              f"{r['state_bytes']:,}", f"{100 * r['vs_adamw']:.1f}%" if r["vs_adamw"] else "—",
              common.fmt_seconds(r["step_time_s"]),
              f"{r['final_mean_rank']:.2f}" if r["final_mean_rank"] is not None else "—") for r in rows]  # fmt: skip
    head = ["optimizer", "lr", "final val loss", "best val loss", "state bytes", "vs AdamW", "iteration", "mean rank"]
    table = common.markdown_table(head, lines)
    a = job_meta.get("args", {})
    seq_len = a.get("seq_len") or (SIZES[a["size"]].seq_len if a.get("size") in SIZES else "?")
    return (f"{table}\n\nMain job: model `{a.get('size')}`, {a.get('steps')} steps of {a.get('batch_size')} × "
            f"{seq_len} bytes, k_max = {a.get('k_max')}, on {job_meta.get('device')}.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source", type=Path, default=None,
                    help=f"main job results.json (default {DEFAULT_FROM}, when it exists)")  # fmt: skip
    ap.add_argument("--rerun", action="store_true", help="run the shortened main job even if --from exists")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="default: every optimizer of the main job")
    args = ap.parse_args(argv)
    if args.source is not None and not args.source.is_file() and not args.rerun:
        ap.error(f"--from {args.source}: no such file")  # a path given is not replaced by a 3-minute rerun
    device = common.setup(args)
    source = args.source or DEFAULT_FROM
    source = source if source.exists() and not args.rerun else shortened_job(args, device)
    data = json.loads(source.read_text())
    runs = data["runs"]
    rows = summary_rows(runs)
    # The results are the main job's: name the files by the device it trained on.
    job_device = data["meta"].get("args", {}).get("device", str(device))
    meta = common.metadata(device, source=common.rel(source), main_job=data["meta"], paper_mean_rank=PAPER_MEAN_RANK)
    if common.device_tag(job_device) != device.type:
        meta["device"] = data["meta"].get("device", meta["device"])
    path = common.write_results(NAME, job_device, rows, meta, args.out, runs=runs)
    common.write_markdown(NAME, job_device, markdown(rows, data["meta"]), args.out)
    plot_runs(runs, args.out / f"{NAME}_{common.device_tag(job_device)}.png")
    print(markdown(rows, data["meta"]))
    print(f"wrote {path} (+ .csv, .md, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
