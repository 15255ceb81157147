"""One training run: a fresh model, one optimizer, warmup + cosine schedule, periodic eval."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from ..adapprox import Adapprox
from ..state_report import held_bytes
from .data import ByteBatches
from .model import GPT, GPTConfig
from .optimizers import build_optimizer


@dataclass
class RunConfig:
    optimizer: str
    lr: float
    steps: int
    warmup: int
    eval_every: int
    eval_batches: int
    k_max: int
    device: str
    seed: int = 0


def warmup_cosine(warmup: int, steps: int, floor: float = 0.1):
    """Linear warmup, then cosine decay to ``floor`` × peak (a multiplier for LambdaLR)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def matrix_type(name: str) -> str:
    """'blocks.3.fc.weight' -> 'fc'; 'tok.weight' -> 'tok'."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name


def ranks_by_type(opt: torch.optim.Optimizer) -> dict[str, float]:
    """Mean current rank per matrix type (Adapprox only: the others' ranks are fixed)."""
    if not isinstance(opt, Adapprox):
        return {}
    by_type: dict[str, list[float]] = {}
    for row in opt.state_report().rows:
        if row.rank is not None:
            by_type.setdefault(matrix_type(row.name), []).append(row.rank)
    return {k: sum(v) / len(v) for k, v in by_type.items()}


@torch.no_grad()
def evaluate(model: GPT, batches: list[torch.Tensor], device: str) -> float:
    model.eval()
    loss = sum(model.loss(b.to(device)).item() for b in batches) / len(batches)
    model.train()
    return loss


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_one(cfg: RunConfig, model_cfg: GPTConfig, data: ByteBatches) -> dict:
    """Train a fresh model; returns the curves, timings, state bytes and ranks as plain data."""
    from tqdm import tqdm  # here, not at import: the job checks its `main` extra before any run

    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(cfg.device)
    opt = build_optimizer(cfg.optimizer, model, cfg.lr, cfg.device, cfg.k_max, cfg.seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps))
    val = data.val_batches(cfg.eval_batches)
    out = dict(name=cfg.optimizer, lr=cfg.lr, config=asdict(cfg), eval_steps=[], val_loss=[], train_loss=[],
               rank_steps=[], ranks=[], step_times=[], opt_times=[])  # fmt: skip
    # A with-block closes the bar when a step raises too, before the job prints the error.
    # Into a log (stderr not a terminal) each redraw is kept: one every 30 s there, not 10 a second.
    # miniters=1: else tqdm's monitor thread redraws the bar every 10 s (its maxinterval) once a
    # draw has raised miniters, with the step count and ETA of the last draw.
    refresh = 0.1 if sys.stderr.isatty() else 30.0
    with tqdm(
        range(1, cfg.steps + 1), desc=f"{cfg.optimizer:>10s}", dynamic_ncols=True, mininterval=refresh, miniters=1
    ) as bar:
        for step in bar:
            batch = data.train_batch().to(cfg.device)
            _sync(cfg.device)
            t0 = time.perf_counter()
            loss = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _sync(cfg.device)
            t1 = time.perf_counter()
            opt.step()
            _sync(cfg.device)
            t2 = time.perf_counter()
            sched.step()
            out["step_times"].append(t2 - t0)
            out["opt_times"].append(t2 - t1)
            out["train_loss"].append(loss.item())
            if step % 10 == 0 or step == 1:
                ranks = ranks_by_type(opt)
                if ranks:
                    out["rank_steps"].append(step)
                    out["ranks"].append(ranks)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                out["eval_steps"].append(step)
                out["val_loss"].append(evaluate(model, val, cfg.device))
                bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{out['val_loss'][-1]:.3f}", refresh=False)
    warm = out["step_times"][5:] or out["step_times"]
    out["step_time_s"] = statistics.median(warm)
    out["opt_time_s"] = statistics.median(out["opt_times"][5:] or out["opt_times"])
    out["final_val_loss"] = out["val_loss"][-1]
    out["state_bytes"] = held_bytes(opt)
    out["params"] = sum(p.numel() for p in model.parameters())
    out["final_mean_rank"] = opt.state_report().mean_rank if hasattr(opt, "state_report") else None
    if hasattr(opt, "state_report"):
        out["state_report"] = str(opt.state_report())
    if getattr(opt, "cuda_graph_counts", None):
        out["cuda_graph_counts"] = opt.cuda_graph_counts
    del out["step_times"], out["opt_times"]
    return out


def package_commit() -> str:
    """HEAD of the checkout the package was imported from, or "" when it is not the top of one: an
    installed copy (site-packages) inside some other repository must not record that one's commit."""
    root = Path(__file__).resolve().parents[2]  # the directory holding adapprox_kernels/
    try:  # prints nothing to stdout outside a checkout
        git = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root, capture_output=True, text=True)
    except OSError:
        return ""
    lines = git.stdout.splitlines()
    if git.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
        return ""
    return lines[1]


def environment(device: str) -> dict:
    """Versions and device, for the results file."""
    return dict(
        adapprox_kernels=__version__,
        torch=torch.__version__,
        python=platform.python_version(),
        device=torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        threads=torch.get_num_threads(),
        # The vector instructions torch's CPU kernels take ("AVX512", "AVX2"): with the thread
        # count, what the last digits of a CPU run's losses depend on.
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        commit=os.environ.get("ADAPPROX_COMMIT") or package_commit(),  # set where no .git travels
    )
