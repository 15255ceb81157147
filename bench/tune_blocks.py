"""Launch-configuration sweep of the fused passes (GPU only): which ``Blocks`` (tile sizes,
``num_warps``, ``num_stages``) and which ``tl.dot`` precision reach the most bandwidth.

For GPT-2 124M/345M same-shaped groups (fp32 gradients, ranks k = 1 and 8, sketch width
k + 5) it times ``V @ X`` (also with the first pass's sums), ``Vᵀ @ Y`` and the update pass
for every configuration, V's tiles rebuilt by the rank loop at run time, unrolled
(``Blocks.unroll``) or by one dot (``Blocks.dot_from``), with ``triton.testing.do_bench`` and
reports GB/s against a device-to-device copy of the same bytes. ``PRODUCT_BLOCKS`` and
``ELEMENTWISE_BLOCKS`` in ``adapprox_kernels/kernels/_launch.py`` come from this sweep
(``FIRST_PASS_BLOCKS`` from ``bench_step.py``; this sweep times it too).

``python bench/tune_blocks.py [--quick] [--rebuild loop dot]`` writes
``bench/results/tune_blocks_<device>[_<rebuilds>].json`` (the suffix when not all three).
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import metadata, write_json  # noqa: E402

from adapprox_kernels.kernels._launch import ELEMENTWISE_BLOCKS, FIRST_PASS_BLOCKS, PRODUCT_BLOCKS, Blocks  # noqa: E402

# (label, batch, m, n): the largest groups of GPT-2 124M and 345M (nn.Linear weights).
GROUPS = [
    ("345M mlp fc", 24, 4096, 1024),
    ("345M mlp proj", 24, 1024, 4096),
    ("345M attn qkv", 24, 3072, 1024),
    ("124M embedding", 1, 50257, 768),
]
RANKS = (1, 8)
EPS = 1e-8
DEFAULTS = {"v_matmul": PRODUCT_BLOCKS, "v_rmatmul": PRODUCT_BLOCKS, "v_matmul+sums": FIRST_PASS_BLOCKS,
            "apply_update": ELEMENTWISE_BLOCKS}  # fmt: skip


# How a product rebuilds V's tiles: the Blocks fields that choose it.
REBUILDS = {"loop": {}, "unroll": dict(unroll=16), "dot": dict(dot_from=1)}


def product_configs(quick: bool, rebuilds=tuple(REBUILDS), k: int | None = None) -> list[Blocks]:
    """Tiles × warps with the rank loop at run time (one stage count: it does not change that
    code, see ``Blocks.unroll``; but at rank ``k = 1`` the JIT makes ``K`` the constant 1, no
    loop is left and the main loop is pipelined, so stage counts are swept there too), and over
    stage counts with the loop unrolled up to rank 16 or replaced by a dot (either lets the main
    loop be pipelined)."""
    tiles = (
        [(32, 64), (64, 64), (64, 128), (128, 64), (128, 128)]
        if quick
        else [(m, n) for m in (32, 64, 128) for n in (32, 64, 128)]
    )
    configs = []
    for rebuild in rebuilds:
        stages = (2,) if rebuild == "loop" and k != 1 else (2, 3) if quick else (2, 3, 4)
        configs += [Blocks(m, n, 64, w, s, **REBUILDS[rebuild])
                    for (m, n), w, s in itertools.product(tiles, (4, 8), stages)]  # fmt: skip
    return configs


def update_configs(quick: bool) -> list[Blocks]:
    tiles = (
        [(32, 128), (64, 64), (64, 128), (16, 256)]
        if quick
        else [(32, 64), (32, 128), (64, 64), (64, 128), (128, 64), (128, 128), (16, 256)]
    )
    return [Blocks(m, n, 64, w, 2) for (m, n), w in itertools.product(tiles, (4, 8))]


def same_code(a: Blocks, b: Blocks, k: int | None = None) -> bool:
    """Whether two configurations compile to the same product kernel at rank ``k``: the stage
    count only matters once the rank loop is unrolled or a dot, or gone (``k = 1``, which the
    JIT specializes as a constant)."""
    loop = a.unroll == b.unroll == a.dot_from == b.dot_from == 0 and k != 1
    return a == b or (loop and a._replace(stages=0) == b._replace(stages=0))


def sweep(device, quick: bool, precisions: tuple, rebuilds: tuple) -> list[dict]:
    from triton.testing import do_bench

    from adapprox_kernels.kernels.apply_update import apply_update
    from adapprox_kernels.kernels.v_matmul import v_matmul, v_rmatmul

    bench = lambda fn: do_bench(fn, warmup=10, rep=40)  # noqa: E731
    rows = []
    for (label, batch, m, n), k in itertools.product(GROUPS, RANKS):
        r = k + 5
        gen = torch.Generator(device=device).manual_seed(0)
        grads = [1e-3 * torch.randn(m, n, device=device, generator=gen) for _ in range(batch)]
        params = [torch.randn(m, n, device=device, generator=gen) for _ in range(batch)]
        moms = [torch.zeros(m, n, device=device) for _ in range(batch)]
        q = 1e-3 * torch.randn(batch, m, k, device=device, generator=gen)
        u = 1e-3 * torch.randn(batch, n, k, device=device, generator=gen)
        x = torch.randn(batch, n, r, device=device, generator=gen)
        y = torch.randn(batch, m, r, device=device, generator=gen)
        clip = torch.ones(batch, device=device)
        g_bytes = batch * m * n * 4
        thin = batch * (m + n) * (k + r) * 4
        src = torch.empty(g_bytes // 4, device=device)
        dst = torch.empty_like(src)
        copy_gbps = 2 * g_bytes / (bench(lambda: dst.copy_(src)) * 1e-3) / 1e9
        cases = []
        # The default precision and tf32 rounded to nearest (within the sketch's own noise:
        # bench/results/product_precision_{cold,warm}_nvidia-h100-80gb-hbm3.json) over every tile
        # shape; the others at the default tiles.
        for precision in precisions:
            for blocks in product_configs(quick, rebuilds, k):
                for name, fn, thin_in in (("v_matmul", v_matmul, x), ("v_rmatmul", v_rmatmul, y)):
                    cases.append((name, blocks, precision,
                                  lambda f=fn, t=thin_in, b=blocks, p=precision:
                                      f(grads, q, u, t, 0.999, blocks=b, precision=p),
                                  g_bytes + thin))  # fmt: skip
                first = lambda b=blocks, p=precision: v_matmul(grads, q, u, x, 0.999, eps=EPS, blocks=b, precision=p)  # noqa: E731
                cases.append(("v_matmul+sums", blocks, precision, first, g_bytes + thin))
        for precision in ("tf32", "ieee"):
            for name, fn in (("v_matmul", v_matmul), ("v_rmatmul", v_rmatmul)):
                thin_in = x if name == "v_matmul" else y
                cases.append((name, PRODUCT_BLOCKS, precision,
                              lambda f=fn, t=thin_in, p=precision: f(grads, q, u, t, 0.999, precision=p),
                              g_bytes + thin))  # fmt: skip
        for blocks in update_configs(quick):
            fn = lambda b=blocks: apply_update(  # noqa: E731
                grads, q, u, params, moms, clip, None, q, u,
                beta2=0.999, eps=1e-8, lr=0.0, beta1=0.9, weight_decay=0.0, blocks=b,
            )  # fmt: skip
            cases.append(("apply_update", blocks, None, fn, 5 * g_bytes + 2 * batch * (m + n) * k * 4))
        for name, blocks, precision, fn, nbytes in cases:
            try:
                t = bench(fn)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile (e.g. out of shared memory)
                print(f"  {label} k={k} {name} {blocks} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            gbps = nbytes / (t * 1e-3) / 1e9
            rows.append({
                "group": label, "batch": batch, "m": m, "n": n, "k": k, "r": r, "pass": name,
                "blocks": blocks._asdict(), "precision": precision or "default", "ms": t, "GBps": gbps,
                "fraction_of_copy": gbps / copy_gbps,
            })  # fmt: skip
        best = {}
        for row in rows:
            if row["group"] == label and row["k"] == k:
                key = row["pass"]
                if key not in best or row["ms"] < best[key]["ms"]:
                    best[key] = row
        default = {
            row["pass"]: row for row in rows
            if row["group"] == label and row["k"] == k and row["precision"] == "default"
            and same_code(Blocks(**row["blocks"]), DEFAULTS[row["pass"]], k)
        }  # fmt: skip
        for key, row in best.items():
            d = default.get(key)
            print(
                f"{label:<15} k={k} {key:<13} best {row['fraction_of_copy']:6.1%} of copy ({row['ms']:.3f} ms) "
                f"{tuple(row['blocks'].values())} {row['precision']}; default "
                + (f"{d['fraction_of_copy']:6.1%} ({d['ms']:.3f} ms)" if d else "n/a"),
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument("--default-precision-only", action="store_true", help="skip the tf32_rn sweep")
    parser.add_argument(
        "--rebuild",
        nargs="+",
        choices=list(REBUILDS),
        default=list(REBUILDS),
        help="how the products rebuild V's tiles (default: all three)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("NOT MEASURED: bench/tune_blocks.py needs a CUDA device")
        return
    device = torch.device("cuda")
    precisions = (None,) if args.default_precision_only else (None, "tf32_rn")
    rebuilds = tuple(r for r in REBUILDS if r in args.rebuild)
    result = {"meta": metadata(device), "rows": sweep(device, args.quick, precisions, rebuilds)}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["meta"]["device"]).strip("-").lower()
    suffix = "" if rebuilds == tuple(REBUILDS) else "_" + "-".join(rebuilds)
    write_json(result, args.out, f"tune_blocks_{slug}{suffix}.json")


if __name__ == "__main__":
    main()
