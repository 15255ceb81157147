"""Batched orthonormalization and batched S-RSI over L same-shaped layers: the csrc/ extension vs
``torch.linalg.qr`` on the whole batch vs a per-layer loop.

Shapes are the 2-D weights of GPT-2 124M / 345M and Llama-7B, L = 12, 24, 48 matrices per batch,
ranks k in {1, 8, 64, 256}, oversampling p = 5 and l = 5 iterations (sketch width k + p).
Rows, per (bench, model, shape, L, k):

* ``orthonormalize``: a ``(L, m, k+p)`` sketch -> orthonormal basis, by ``extension`` (cholqr_cuda),
  ``cholqr_torch`` (the same algorithm in plain PyTorch, adapprox_kernels/cholqr.py),
  ``qr_batched`` (``torch.linalg.qr`` on the batch) and ``qr_loop`` (``torch.linalg.qr`` per layer);
* ``srsi``: Algorithm 1 on a dense ``(L, m, n)`` batch, with the extension / batched QR as the
  orthonormalizer, and ``srsi_loop``: one S-RSI call per layer with ``torch.linalg.qr``.

Timings: ``triton.testing.do_bench`` on CUDA (median, p20, p80 in ms); a plain timer on CPU.
Results go to ``bench/results/orthonormalize_<device>.json`` with the device, versions and commit.
Without a GPU the extension rows are not measured (said in the output and the JSON); ``--cpu-small``
runs a small CPU variant (GPT-2 124M shapes, L = 12, k in {1, 8}).

    python bench/bench_orthonormalize.py                 # GPU: the full sweep
    python bench/bench_orthonormalize.py --cpu-small     # CPU: batched QR vs the loop
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import in_ms, metadata, time_call
from adapprox_kernels import DenseOperator, srsi
from adapprox_kernels import _extension as ext
from adapprox_kernels.cholqr import cholqr_orthonormalize
from adapprox_kernels.srsi import householder_orthonormalize

# (rows, cols) of the distinct 2-D weight shapes per transformer block (embeddings left out).
MODELS = {
    "gpt2-124m": [(768, 2304), (768, 768), (768, 3072), (3072, 768)],
    "gpt2-345m": [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)],
    "llama-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
}
OVERSAMPLE = 5
ITERS = 5
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_ms(fn, device: torch.device, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()`` (``bench.common.time_call``)."""
    return in_ms(time_call(fn, device, reps=reps, gpu_rep=max(reps, 1) * 10))


def orthonormalizers(device: torch.device) -> dict:
    """name -> (B, m, r) -> (B, m, r); the extension only where it runs."""
    fns = {
        "cholqr_torch": cholqr_orthonormalize,
        "qr_batched": householder_orthonormalize,
        "qr_loop": lambda y: torch.stack([torch.linalg.qr(y[i]).Q for i in range(y.shape[0])]),
    }
    if ext.extension_status()[0] and device.type == "cuda":
        fns = {"extension": ext.cholqr_cuda, **fns}
    return fns


def srsi_runners(device: torch.device) -> dict:
    """name -> (op batch tensor, k) -> result, each with a fixed-seed generator."""

    def batched(orth):
        return lambda a, k: srsi(
            DenseOperator(a), k, OVERSAMPLE, ITERS, torch.Generator(device).manual_seed(0), orthonormalize=orth
        )

    def loop(a, k):
        gen = torch.Generator(device).manual_seed(0)
        return [srsi(DenseOperator(a[i]), k, OVERSAMPLE, ITERS, gen) for i in range(a.shape[0])]

    runners = {"srsi_qr_batched": batched(householder_orthonormalize), "srsi_loop": loop}
    if ext.extension_status()[0] and device.type == "cuda":
        runners = {"srsi_extension": batched(ext.cholqr_cuda), **runners}
    return runners


def environment(device: torch.device) -> dict:
    """bench/common.py's metadata plus whether the extension was loaded (and why not)."""
    loaded, error = ext.extension_status()
    return metadata(device, extension_loaded=loaded, extension_error=error)


def run(args) -> dict:
    device = torch.device(args.device)
    env = environment(device)
    not_measured = None
    if device.type != "cuda" or not env["extension_loaded"]:
        why = "no GPU" if device.type != "cuda" else f"extension not loaded: {env['extension_error']}"
        not_measured = f"extension rows NOT MEASURED ({why})"
        print(not_measured, flush=True)
    rows = []
    gen = torch.Generator(device).manual_seed(0)
    for model in args.models:
        for m, n in MODELS[model]:
            for layers in args.layers:
                for k in args.ranks:
                    r = min(k + OVERSAMPLE, m, n)
                    if "orthonormalize" in args.benches:
                        y = torch.randn(layers, m, r, generator=gen, device=device)
                        for name, fn in orthonormalizers(device).items():
                            rows.append(record("orthonormalize", model, m, n, layers, k, name, fn, (y,), device, args))
                        del y
                    if "srsi" in args.benches:
                        a = torch.randn(layers, m, n, generator=gen, device=device).square_()  # like G², >= 0
                        for name, fn in srsi_runners(device).items():
                            rows.append(record("srsi", model, m, n, layers, k, name, fn, (a, k), device, args))
                        del a
    return {"environment": env, "not_measured": not_measured, "oversample": OVERSAMPLE, "iters": ITERS, "rows": rows}


def record(bench, model, m, n, layers, k, name, fn, fn_args, device, args) -> dict:
    median, p20, p80 = time_ms(lambda: fn(*fn_args), device, args.reps)
    row = dict(bench=bench, model=model, m=m, n=n, L=layers, k=k, method=name, median_ms=median, p20_ms=p20, p80_ms=p80)
    print(f"{bench:15s} {model:10s} {m:6d}x{n:<6d} L={layers:<3d} k={k:<4d} {name:16s} {median:10.3f} ms", flush=True)
    return row


def summary(result: dict) -> list[str]:
    """Speed-ups over the per-layer loop and over batched torch.linalg.qr, per configuration."""
    lines = []
    groups: dict[tuple, dict[str, float]] = {}
    for row in result["rows"]:
        key = (row["bench"], row["model"], row["m"], row["n"], row["L"], row["k"])
        groups.setdefault(key, {})[row["method"]] = row["median_ms"]
    for (bench, model, m, n, layers, k), t in groups.items():
        loop = t.get("qr_loop") or t.get("srsi_loop")
        batched = t.get("qr_batched") or t.get("srsi_qr_batched")
        best = t.get("extension") or t.get("srsi_extension")
        parts = [f"batched qr {loop / batched:6.2f}x vs loop"]
        if best is not None:
            parts.append(f"extension {loop / best:6.2f}x vs loop, {batched / best:6.2f}x vs batched qr")
        lines.append(f"{bench:15s} {model:10s} {m}x{n} L={layers} k={k}: " + "; ".join(parts))
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--layers", nargs="+", type=int, default=[12, 24, 48])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 8, 64, 256])
    parser.add_argument("--benches", nargs="+", default=["orthonormalize", "srsi"], choices=["orthonormalize", "srsi"])
    parser.add_argument("--reps", type=int, default=10, help="CPU repetitions (CUDA: do_bench rep = 10x this in ms)")
    parser.add_argument("--cpu-small", action="store_true", help="GPT-2 124M shapes, L=12, k in {1, 8} on the CPU")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/orthonormalize_<device>.json)")
    args = parser.parse_args(argv)
    if args.cpu_small:
        args.device, args.models, args.layers, args.ranks, args.reps = "cpu", ["gpt2-124m"], [12], [1, 8], 5
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible (use --cpu-small)")

    result = run(args)
    result["summary"] = summary(result)
    print("\n".join(["", *result["summary"]]))
    if result["not_measured"]:
        print(f"\n{result['not_measured']}")
    slug = "".join(c if c.isalnum() else "_" for c in result["environment"]["device"]).strip("_").lower()
    out = args.out or os.path.join(RESULTS_DIR, f"orthonormalize_{slug}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)  # a bare file name: the current folder
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
