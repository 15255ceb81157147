"""Optimizer-step benchmark of Adapprox's Triton backend (see docs/kernels.md).

On a CUDA device, for GPT-2 124M and 345M parameter shapes (fp32 parameters, random
gradients set once):

* step time of Adapprox at fixed ranks k (cold S-RSI l = 5 and warm start l = 1, each eager and
  with CUDA graphs; cold l = 2 with Rayleigh–Ritz; the warm graphed step under ``OneCycleLR``,
  with bf16 weights and at the other product precisions) against fused AdamW and
  ``torch.optim.Adafactor`` in the same run (``triton.testing.do_bench``: median, p20, p80 in ms);
* achieved bandwidth of each fused pass on the largest same-shaped group of matrices, against
  a device-to-device copy of the same bytes;
* peak memory during a step (``torch.cuda.max_memory_allocated`` above what was allocated
  before it) against the optimizer state alone.

Everywhere (CPU only when there is no GPU, said clearly in the output): a small-shape
step-time comparison on the reference backend, and the warm-vs-cold ξ / passes-over-G study
of ``bench/warm_start.py``. Results go to ``bench/results/bench_step_<device>_<time>.json``
with device name, torch / triton versions and the git commit.

``--smoke`` runs the GPU section's code on tiny shapes wherever it is (on CPU under the Triton
interpreter, where a step takes seconds: 2 timed calls of each, about a minute on 2 cores) to
check it end to end; its numbers mean nothing and it writes no file.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
if not torch.cuda.is_available():  # CPU: Triton code paths (pass counts, --smoke) run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import warm_start  # noqa: E402
from common import in_ms, metadata, time_call  # noqa: E402  (bench/common.py: the one place for them)

from adapprox_kernels import Adapprox  # noqa: E402

MODELS = {"gpt2-124M": (768, 12), "gpt2-345M": (1024, 24)}
RANKS = (1, 8)


# ----------------------------------------------------------------------------- utilities
def gpt2_shapes(d: int, layers: int, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2 (nn.Linear convention, tied LM head)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]  # ln_1, attention qkv, projection
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # ln_2, MLP
    return shapes + [(d,), (d,)]


def make_params(shapes, device) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(0.02 * torch.randn(*s, device=device, generator=gen))
        p.grad = 1e-3 * torch.randn(*s, device=device, generator=gen)
        params.append(p)
    return params


def timer(device: torch.device, reps: int = 15):
    """``fn -> (median, p20, p80)`` in ms (``common.time_call``: do_bench on CUDA, ``reps`` calls
    by the wall clock elsewhere)."""
    return lambda fn: in_ms(time_call(fn, device, reps=reps, gpu_rep=200))


def ms(t) -> dict:
    return {"median_ms": t[0], "p20_ms": t[1], "p80_ms": t[2]}


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def optimizer_factories(ranks, backend: str) -> dict:
    """name -> params -> optimizer, or ``(optimizer, step)`` where the timed step does more than
    ``optimizer.step()``. Ranks are pinned (k_init = k_min = k_max) so the timing is at a known
    k; with random gradients the step rule would hold them at k_max anyway."""
    out = {
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),  # fused on CPU too (torch >= 2.4)
        "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
    }
    for k in ranks:
        common = dict(lr=1e-3, k_init=k, k_min=k, k_max=k, backend=backend, seed=0)
        out[f"adapprox_k{k}_cold"] = lambda ps, c=common: Adapprox(ps, **c)
        out[f"adapprox_k{k}_warm"] = lambda ps, c=common: Adapprox(ps, warm_start=True, warm_power_iters=1, **c)
        # Rayleigh–Ritz lets a cold step take 2 iterations (5 passes over G) for l = 5's ξ
        # (bench/results/warm_start_{truncation,tiny_gpt}_cpu.json; its eigen-decompositions by the
        # Jacobi kernel on CUDA: no sync, graphed)
        out[f"adapprox_k{k}_cold_l2_rr"] = lambda ps, c=common: Adapprox(
            ps, power_iters=2, truncation="rayleigh_ritz", cuda_graphs=backend == "triton", **c
        )
        if backend == "triton":  # the same steps replayed from CUDA graphs (captured in the warm-up)
            out[f"adapprox_k{k}_cold_graphs"] = lambda ps, c=common: Adapprox(ps, cuda_graphs=True, **c)
            out[f"adapprox_k{k}_warm_graphs"] = lambda ps, c=common: Adapprox(
                ps, warm_start=True, warm_power_iters=1, cuda_graphs=True, **c
            )
            # Under OneCycleLR, which writes a new α and β1 every step (its step timed with it).
            out[f"adapprox_k{k}_warm_graphs_onecycle"] = lambda ps, c=common: with_one_cycle(
                Adapprox(ps, warm_start=True, warm_power_iters=1, cuda_graphs=True, **c)
            )
            # bf16 weights (and gradients), rounded to nearest or at random (bf16_stochastic_round).
            for sr in (False, True):
                out[f"adapprox_k{k}_warm_graphs_bf16{'_sr' if sr else ''}"] = lambda ps, c=common, sr=sr: Adapprox(
                    as_bf16(ps), warm_start=True, warm_power_iters=1, cuda_graphs=True, bf16_stochastic_round=sr, **c
                )
            out[f"adapprox_k{k}_warm_graphs_tf32"] = lambda ps, c=common: Adapprox(
                ps, warm_start=True, warm_power_iters=1, cuda_graphs=True, product_precision="tf32", **c
            )
            # tf32 only where it leaves ξ alone (docs/kernels.md#precision)
            out[f"adapprox_k{k}_cold_graphs_tf32_range"] = lambda ps, c=common: Adapprox(
                ps, cuda_graphs=True, product_precision="tf32_range", **c
            )
            out[f"adapprox_k{k}_warm_graphs_tf32_range"] = lambda ps, c=common: Adapprox(
                ps, warm_start=True, warm_power_iters=1, cuda_graphs=True, product_precision="tf32_range", **c
            )
            out[f"adapprox_k{k}_warm_graphs_tf32_rn"] = lambda ps, c=common: Adapprox(
                ps, warm_start=True, warm_power_iters=1, cuda_graphs=True, product_precision="tf32_rn", **c
            )
            # exact fp32 products on CUDA cores (Triton's FMA dot), timed at 64×64 tiles only: at
            # k = 1 ahead of tf32x3 at PRODUCT_BLOCKS in every V @ X, behind in Vᵀ @ Y of 345M's qkv
            # and the 124M embedding; at k = 8 behind in all
            # (bench/results/tune_blocks_nvidia-h100-80gb-hbm3.json; docs/benchmarks.md, "Still not measured")
            out[f"adapprox_k{k}_warm_graphs_ieee"] = lambda ps, c=common: Adapprox(
                ps, warm_start=True, warm_power_iters=1, cuda_graphs=True, product_precision="ieee", **c
            )
    return out


def as_bf16(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """``params`` and their gradients cast to bfloat16 in place (a pure-bf16 run's layout)."""
    for p in params:
        p.data, p.grad = p.data.bfloat16(), p.grad.bfloat16()
    return params


def with_one_cycle(opt: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, object]:
    """``(opt, step)``: ``step`` is ``opt.step()`` then a ``OneCycleLR`` step (momentum cycled,
    its default); long enough for any warm-up and timing."""
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=100_000)

    def step() -> None:
        opt.step()
        scheduler.step()

    return opt, step


# ----------------------------------------------------------------------------- step time + memory
def bench_steps(shapes, factories, device, baseline: str, reps: int = 15) -> dict:
    """Step time (and on CUDA the step's peak memory above what was allocated before it) of
    each optimizer; ``vs_baseline`` is the median over ``baseline``'s median."""
    time_fn = timer(device, reps)
    results = {}
    for name, factory in factories.items():
        params = make_params(shapes, device)
        opt = factory(params)
        opt, step = opt if isinstance(opt, tuple) else (opt, opt.step)
        for _ in range(3):  # state allocated; warm start has previous factors
            step()
        entry = ms(time_fn(step))
        entry["state_bytes"] = state_bytes(opt)
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            entry["step_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
        results[name] = entry
        print(
            f"  {name:<22} {entry['median_ms']:9.3f} ms  (p20 {entry['p20_ms']:.3f}, p80 {entry['p80_ms']:.3f})",
            flush=True,
        )
        del opt, step, params
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for entry in results.values():
        entry["vs_baseline"] = entry["median_ms"] / results[baseline]["median_ms"]
    return results


# ----------------------------------------------------------------------------- bandwidth per pass
def bench_passes(batch: int, m: int, n: int, k: int, grad_dtype: torch.dtype, device, reps: int = 15) -> dict:
    """Achieved bandwidth of each fused pass on ``batch`` matrices ``(m, n)``, fp32 weights and
    momentum, against a device-to-device copy of the gradient bytes."""
    from adapprox_kernels.kernels.apply_update import apply_update
    from adapprox_kernels.kernels.update_cosine import update_cosine_sums
    from adapprox_kernels.kernels.v_matmul import v_matmul, v_rmatmul

    time_fn = timer(device, reps)
    r = k + 5
    grads = [1e-3 * torch.randn(m, n, device=device).to(grad_dtype) for _ in range(batch)]
    params = [0.02 * torch.randn(m, n, device=device) for _ in range(batch)]
    moms = [torch.zeros(m, n, device=device) for _ in range(batch)]
    q = torch.randn(batch, m, k, device=device) * 1e-3
    u = torch.randn(batch, n, k, device=device) * 1e-3
    x, y = torch.randn(batch, n, r, device=device), torch.randn(batch, m, r, device=device)
    clip = torch.ones(batch, device=device)
    f32 = 4
    g_bytes = batch * m * n * grads[0].element_size()
    w_bytes = batch * m * n * f32
    thin = batch * (m + n) * (k + r) * f32  # factors and the thin matrix / product
    kw = dict(beta2=0.999, eps=1e-8)
    cases = {
        "v_matmul+sums (first pass)": (lambda: v_matmul(grads, q, u, x, 0.999, eps=1e-8), g_bytes + thin),
        "v_matmul": (lambda: v_matmul(grads, q, u, x, 0.999), g_bytes + thin),
        "v_rmatmul": (lambda: v_rmatmul(grads, q, u, y, 0.999), g_bytes + thin),
        "update_cosine_sums": (
            lambda: update_cosine_sums(grads, q, u, moms, clip, beta1=0.9, **kw),
            g_bytes + w_bytes + batch * (m + n) * k * f32,
        ),
        "apply_update (momentum, xi numerator)": (
            lambda: apply_update(
                grads, q, u, params, moms, clip, None, q, u, lr=0.0, beta1=0.9, weight_decay=0.0, **kw
            ),
            g_bytes + 4 * w_bytes + 2 * batch * (m + n) * k * f32,
        ),
        "apply_update (no momentum)": (
            lambda: apply_update(grads, q, u, params, None, clip, lr=0.0, beta1=0.0, weight_decay=0.0, **kw),
            g_bytes + 2 * w_bytes + batch * (m + n) * k * f32,
        ),
    }
    src = torch.empty(g_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_t = time_fn(lambda: dst.copy_(src))
    copy_bw = 2 * g_bytes / (copy_t[0] * 1e-3) / 1e9
    out = {
        "group": {"batch": batch, "m": m, "n": n, "k": k, "r": r, "grad_dtype": str(grad_dtype)},
        "copy_GBps": copy_bw,
        "passes": {},
    }
    for name, (fn, nbytes) in cases.items():
        t = time_fn(fn)
        bw = nbytes / (t[0] * 1e-3) / 1e9
        out["passes"][name] = {**ms(t), "bytes": nbytes, "GBps": bw, "fraction_of_copy": bw / copy_bw}
        print(f"  {name:<40} {t[0]:8.3f} ms  {bw:8.1f} GB/s  {bw / copy_bw:6.1%} of copy", flush=True)
    return out


def largest_group(shapes) -> tuple[int, int, int]:
    """``(count, m, n)`` of the same-shaped 2-D group with the most elements."""
    groups: dict[tuple[int, int], int] = {}
    for s in shapes:
        if len(s) == 2:
            groups[s] = groups.get(s, 0) + 1
    (m, n), count = max(groups.items(), key=lambda kv: kv[1] * kv[0][0] * kv[0][1])
    return count, m, n


def gpu_section(device, models, ranks, reps: int = 15) -> dict:
    """``reps``: timed calls of each step or pass where there is no GPU (do_bench decides on one)."""
    out = {}
    for name, shapes in models.items():
        print(f"{name}: step time", flush=True)
        entry = {"step": bench_steps(shapes, optimizer_factories(ranks, "triton"), device, "adamw_fused", reps)}
        count, m, n = largest_group(shapes)
        entry["bandwidth"] = {}
        for dtype in (torch.float32, torch.bfloat16):
            print(f"{name}: passes over {count}×({m}, {n}) {dtype} gradients, k={max(ranks)}", flush=True)
            entry["bandwidth"][str(dtype)] = bench_passes(count, m, n, max(ranks), dtype, device, reps)
        out[name] = entry
    return out


# ----------------------------------------------------------------------------- CPU parts
def cpu_step_section() -> dict:
    """Small shapes on CPU with the reference backend (no Triton): relative step cost only."""
    shapes = gpt2_shapes(128, 2, vocab=512, ctx=128)
    print("CPU, reference backend, GPT-like d=128, 2 layers, vocab 512: step time", flush=True)
    factories = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3)}  # the default (unfused) AdamW
    factories.update((k, v) for k, v in optimizer_factories((8,), "reference").items() if k != "adamw_fused")
    return {
        "shapes": "gpt2_shapes(d=128, layers=2, vocab=512, ctx=128)",
        "backend": "reference (plain PyTorch; materializes V)",
        "step": bench_steps(shapes, factories, torch.device("cpu"), "adamw"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes through the GPU section's code; no file")
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU section")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if args.smoke:
        models = {"tiny": gpt2_shapes(16, 1, vocab=40, ctx=24)}
        # 2 timed calls: 15 took over 5 minutes under the interpreter
        print(json.dumps(gpu_section(device, models, ranks=(2,), reps=2), indent=1)[:2000])
        return

    result = {"meta": metadata(device)}
    if device.type == "cuda":
        result["gpu"] = gpu_section(device, {k: gpt2_shapes(*v) for k, v in MODELS.items()}, RANKS)
    else:
        result["gpu"] = "NOT MEASURED: no CUDA device in this run (step time, bandwidth and memory need a GPU)"
        print(result["gpu"], flush=True)
    if not args.skip_cpu:
        result["cpu_small_step"] = cpu_step_section()
        print("warm start vs cold S-RSI (reference backend, recorded MLP gradients)", flush=True)
        result["warm_start"] = warm_start.run()
        print(warm_start.summary(result["warm_start"]))
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["meta"]["device"]).strip("-").lower()
    path = args.out / f"bench_step_{slug}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
