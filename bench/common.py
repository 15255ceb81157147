"""Plumbing shared by the paper-table scripts: run metadata, honest timing, result files.

Every script writes ``bench/results/<name>_<cpu|cuda>.json`` (``{"meta": ..., "rows": [...]}``),
the same rows as CSV (with the device, versions and commit in every line, so a CSV can be read
alone), a Markdown table and a PNG. The device kind is in the file name so that a GPU run never
overwrites the committed CPU results.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, Sequence

import torch

import adapprox_kernels

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
NOT_MEASURED = "not measured"


def parser(description: str) -> argparse.ArgumentParser:
    """The options every script has: device, CPU threads, output folder."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the machine is shared: default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the result files")
    return ap


def setup(args: argparse.Namespace) -> torch.device:
    """Check the options every script has, before anything is measured, and apply ``--threads``:
    a one-line error (not a traceback, nor one after minutes of measuring); returns the device."""
    if args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: expected at least 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {args.out}: {e.strerror or e}") from None
    torch.set_num_threads(args.threads)
    return device


def rel(path: Path | str) -> str:
    """``path`` relative to the repository when it is inside it (result files stay portable)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def device_tag(device: torch.device | str) -> str:
    return torch.device(device).type


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # platform.processor() is empty on most Linux machines; /proc/cpuinfo has the model.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return out.stdout.strip()


def _dirty() -> bool | None:
    """Uncommitted changes to tracked files outside bench/results/ (the results themselves are
    rewritten by every run, so they do not count); ``None`` where there is no git checkout."""
    if not _git("rev-parse", "HEAD"):
        return None
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"))


def metadata(device: torch.device | str, **extra) -> dict:
    """Where and with what a result was measured."""
    device = torch.device(device)
    return dict(
        device=device_name(device),
        device_type=device.type,
        cpu_threads=torch.get_num_threads() if device.type == "cpu" else None,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=_version("triton"),
        came_pytorch=_version("came-pytorch"),
        galore_torch=_version("galore-torch"),
        adapprox_kernels=adapprox_kernels.__version__,
        commit=os.environ.get("ADAPPROX_COMMIT") or _git("rev-parse", "HEAD"),  # set where no .git travels
        dirty=_dirty(),
        python=platform.python_version(),
        # CPU timings on a shared machine are only as good as its load when they were taken.
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    )


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted list."""
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def time_call(
    fn: Callable[[], object], device: torch.device | str, *, warmup: int = 1, reps: int = 5, gpu_rep: int = 100
) -> dict:
    """Median, p20 and p80 of the wall time of ``fn()`` in seconds.

    GPU: ``triton.testing.do_bench`` (CUDA events, its own warm-up, L2 flush between runs,
    ``gpu_rep`` ms of runs).
    CPU: ``warmup`` untimed calls, then ``reps`` calls each timed with ``time.perf_counter``
    (the CPU work is synchronous, so no barrier is needed).
    """
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=25, rep=gpu_rep, quantiles=[0.5, 0.2, 0.8])
        return dict(median_s=med / 1e3, p20_s=p20 / 1e3, p80_s=p80 / 1e3, timer="triton.testing.do_bench")
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return dict(
        median_s=_quantile(times, 0.5), p20_s=_quantile(times, 0.2), p80_s=_quantile(times, 0.8),
        reps=reps, timer="time.perf_counter",
    )  # fmt: skip


def in_ms(timing: dict) -> tuple[float, float, float]:
    """``(median, p20, p80)`` in milliseconds of a :func:`time_call` result."""
    return timing["median_s"] * 1e3, timing["p20_s"] * 1e3, timing["p80_s"] * 1e3


def not_measured(reason: str) -> dict:
    """The fields of a row that was not measured, and why (never a made-up number)."""
    return dict(status=NOT_MEASURED, reason=reason)


def measured() -> dict:
    return dict(status="measured", reason="")


def write_results(
    name: str, device: torch.device | str, rows: list[dict], meta: dict, out: Path = RESULTS, **extra
) -> Path:
    """Write ``<name>_<tag>.json`` (``{"meta", "rows", **extra}``) and the rows as ``.csv``;
    returns the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}_{device_tag(device)}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, **extra}, indent=1) + "\n")
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    ident = {k: meta.get(k) for k in ("device", "torch", "triton", "commit")}
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*ident, *keys])
        writer.writeheader()
        for row in rows:
            writer.writerow({**ident, **row})
    return stem.with_suffix(".json")


def write_json(record: dict, out: Path, filename: str) -> Path:
    """Writes ``record`` to ``out/filename`` (indented JSON), says where, returns the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def write_markdown(name: str, device: torch.device | str, text: str, out: Path = RESULTS) -> Path:
    path = out / f"{name}_{device_tag(device)}.md"
    path.write_text(text.rstrip() + "\n")
    return path


def markdown_table(headers: Sequence[str], lines: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(x) for x in line) + " |" for line in lines]
    return "\n".join(out)


def fmt_time(row: dict) -> str:
    """``median [p20, p80]`` with units, or the reason it was not measured."""
    if row.get("status") == NOT_MEASURED:
        return NOT_MEASURED
    return f"{fmt_seconds(row['median_s'])} [{fmt_seconds(row['p20_s'])}, {fmt_seconds(row['p80_s'])}]"


def fmt_seconds(seconds: float) -> str:
    """Seconds with a readable unit: ``1.23 s``, ``45.6 ms``, ``789 µs``."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, name: str, device: torch.device | str, out: Path = RESULTS) -> Path:
    """A small PNG (committed to the repository, so keep it light)."""
    path = out / f"{name}_{device_tag(device)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return path
