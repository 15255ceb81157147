"""What the Triton kernels cost a Hopper SM, read from their compiled code: no GPU needed.

Each default launch configuration of the optimizer's passes, and candidate product
configurations (V's tiles rebuilt by the rank loop, unrolled or by a dot), is compiled for sm_90 with
Triton's own ``ptxas`` (as the JIT compiles it on an H100: 16-byte-aligned pointers, unit
inner strides), and for each the script reports

* registers per thread and spilled bytes (``ptxas -v``), and shared memory per program;
* how many programs fit on one SM at once (65,536 registers, 227 KiB of shared memory per
  SM): with few, the SM has few warps to hide memory latency with;
* whether the main loop of a product kernel is software-pipelined, i.e. its loads become
  asynchronous copies ``num_stages − 1`` iterations ahead (``async_copy`` in the TTGIR), and
  whether the code depends on ``num_stages`` at all (the PTX for 2 and 3 stages compared).

It runs here, on CPU; timings need a GPU (``bench/tune_blocks.py``, ``bench/bench_step.py``).
``python bench/kernel_resources.py`` writes
``bench/results/kernel_resources_sm90_triton<version>.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not for the interpreter

import triton  # noqa: E402
from common import RESULTS, markdown_table, metadata, write_json  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from adapprox_kernels.kernels import _launch, apply_update, dense_moment, update_cosine, v_matmul, v_norms  # noqa: E402

REGISTERS_PER_SM = 65536
SHARED_PER_SM = 227 * 1024  # what one SM of an H100 can give to programs
MAX_PROGRAMS_PER_SM = 32
FLOATS = {"beta2", "one_minus_beta2", "eps"}
# What the JIT specializes on a real launch: unit inner strides become constants, and sizes
# and outer strides of the GPT-2 shapes are multiples of 16 (as is a product's FIRST, 0 below
# 65,536 matrices).
UNIT_STRIDES = frozenset({"stride_gn", "stride_qk", "stride_uk", "stride_xr", "stride_or", "stride_wn", "stride_mn",
                "stride_qnk", "stride_unk"})  # fmt: skip
DIVISIBLE = {"M", "N", "NUMEL", "N_PER_SPLIT", "FIRST", "stride_gm", "stride_gn", "stride_wm", "stride_mm", "stride_qb",
             "stride_ub", "stride_xb", "stride_xn", "stride_ob", "stride_om", "stride_os", "stride_qnb",
             "stride_unb"}  # fmt: skip


def ptxas() -> str:
    """The ptxas Triton's JIT assembles sm_90 code with: from Triton 3.9 the CUDA 13 one it ships
    as ``ptxas-blackwell``, as 3.9 writes PTX 9.4, which its CUDA 12.9 ``ptxas`` rejects."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(90).path
    except TypeError:  # Triton 3.4: one ptxas for every architecture, get_ptxas() takes none
        return get_ptxas().path


def compile_sm90(
    fn, consts: dict, *, pointers: dict | None = None, warps: int = 4, stages: int = 3, unit: frozenset = UNIT_STRIDES
):
    """``fn`` compiled for sm_90 with ``consts`` and the ``unit`` strides as constexprs; pointer
    arguments of the types ``pointers`` names (e.g. ``{"g_ptr": "*bf16"}``), else fp32 (the
    table offsets int64)."""
    pointers = pointers or {}
    consts = dict(consts, **{name: 1 for name in fn.arg_names if name in unit})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name.endswith("off_ptr") else pointers.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
        if sig[name].startswith("*") or name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    options = dict(num_warps=warps, num_stages=stages, enable_fp_fusion=_launch.FP_FUSION)  # as the launchers set it
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """``(registers per thread, spilled bytes)`` from ``ptxas -v`` for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        done = subprocess.run([ptxas(), "-v", "-arch=sm_90a", str(path), "-o", os.devnull], capture_output=True,
                              text=True, check=True)  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", done.stderr).group(1))
    return regs, spills


def _code(ptx: str) -> str:
    """The PTX without debug lines and debug sections, to compare two compilations (the DWARF
    names the source's folder: a kernel Triton's cache serves from another checkout of the same
    code differs there only)."""
    code = ptx.split("\t.section\t.debug", 1)[0]
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith((".loc", ".file", "//")))


def programs_per_sm(regs: int, shared: int, warps: int) -> int:
    """How many programs of ``warps`` warps fit on one SM at once."""
    by_shared = SHARED_PER_SM // shared if shared else MAX_PROGRAMS_PER_SM
    return min(REGISTERS_PER_SM // (regs * 32 * warps), by_shared, MAX_PROGRAMS_PER_SM)


def resources(fn, consts: dict, grad_dtype: str, blocks: _launch.Blocks, unit: frozenset) -> dict:
    pointers = {"g_ptr": grad_dtype}
    kernel = compile_sm90(fn, consts, pointers=pointers, warps=blocks.warps, stages=blocks.stages, unit=unit)
    regs, spills = ptxas_usage(kernel.asm["ptx"])
    shared = kernel.metadata.shared
    other = 3 if blocks.stages == 2 else 2  # the same launch with another stage count
    other_ptx = compile_sm90(fn, consts, pointers=pointers, warps=blocks.warps, stages=other, unit=unit).asm["ptx"]
    ttgir = kernel.asm["ttgir"]
    return dict(
        registers=regs,
        spilled_bytes=spills,
        shared_bytes=shared,
        programs_per_sm=programs_per_sm(regs, shared, blocks.warps),
        loops=ttgir.count("scf.for"),
        async_copies=ttgir.count("async_copy_global_to_local"),
        stages_change_code=_code(kernel.asm["ptx"]) != _code(other_ptx),
        ptx_sha=hashlib.sha256(_code(kernel.asm["ptx"]).encode()).hexdigest()[:12],
    )


class Launch(NamedTuple):
    label: str
    fn: object
    consts: dict  # the constexprs the launcher passes
    blocks: _launch.Blocks
    unit: frozenset = UNIT_STRIDES
    grads: tuple = ("*fp32", "*bf16")


RANK = 8  # the rank the product launches are compiled for (K_UNROLL = 8 where Blocks.unroll >= 8, K_DOT = 16 where
# Blocks.dot_from <= 8)
TRANSPOSED = (UNIT_STRIDES - {"stride_gn"}) | {"stride_gm"}  # Vᵀ @ Y reads G's transposed view


def _product(label: str, blocks: _launch.Blocks, precision: str, norms: bool, rank: int = RANK, **kw) -> Launch:
    """A product launch as ``v_matmul._launch`` makes it on an H100 (``tf32_rn``: a tf32 dot of
    operands rounded first)."""
    consts = dict(G_ALIGN=4, BLOCK_R=16, HAS_LOWRANK=True, PRECISION="tf32" if precision == "tf32_rn" else precision,
                  ROUND_TF32=precision == "tf32_rn", BLOCK_M=blocks.m, BLOCK_N=blocks.n, WITH_NORMS=norms,
                  K_UNROLL=blocks.rank_unroll(rank), K_DOT=blocks.rank_dot(rank),
                  REBUILD_TF32X3=precision != "ieee")  # fmt: skip
    if rank == 1:  # the JIT passes an int argument equal to 1 as a constant
        consts["K"] = 1
    return Launch(label, v_matmul._v_matmul_kernel, consts, blocks, **kw)


def products(precision: str, rank: int = RANK, **variant) -> list[Launch]:
    """The three product launches of a factored bucket's step at rank ``rank``, with the default
    blocks changed by ``variant`` (e.g. ``unroll=16``, ``dot_from=1``)."""
    fb, pb = _launch.FIRST_PASS_BLOCKS._replace(**variant), _launch.PRODUCT_BLOCKS._replace(**variant)
    return [
        _product("V @ X, first pass (+ sums)", fb, precision, True, rank),
        _product("V @ X", pb, precision, False, rank),
        _product("Vᵀ @ Y", pb, precision, False, rank, unit=TRANSPOSED),
    ]


def launches(precision: str) -> list[Launch]:
    """The optimizer's default launches of a factored bucket's step (rank k > 0) and of a
    dense bucket's. The dense kernels read flat blocks of ``DENSE_BLOCK`` elements with the
    elementwise passes' warps and stages."""
    eb = _launch.ELEMENTWISE_BLOCKS
    tile = dict(G_ALIGN=4, HAS_LOWRANK=True, BLOCK_M=eb.m, BLOCK_N=eb.n)
    flat = dict(G_ALIGN=4, V_ALIGN=4, BLOCK=dense_moment.DENSE_BLOCK)
    return products(precision) + [
        Launch("update (momentum, ξ numerator)", apply_update._apply_update_kernel,
               dict(tile, W_ALIGN=4, MOM_ALIGN=4, HAS_MOMENTUM=True, WITH_RESIDUAL=True, STOCHASTIC=False), eb),
        Launch("update (no momentum)", apply_update._apply_update_kernel,
               dict(tile, W_ALIGN=4, MOM_ALIGN=4, HAS_MOMENTUM=False, WITH_RESIDUAL=False, STOCHASTIC=False), eb),
        Launch("cosine-guidance sums", update_cosine._update_cosine_kernel, dict(tile, MOM_ALIGN=4), eb),
        Launch("V norms (outside the step)", v_norms._v_norms_kernel, dict(tile, WITH_RESIDUAL=True), eb),
        Launch("dense sums", dense_moment._dense_sums_kernel, flat, eb),
        Launch("dense update", dense_moment._dense_apply_kernel,
               dict(flat, W_ALIGN=4, MOM_ALIGN=4, HAS_MOMENTUM=True, STOCHASTIC=False), eb),
    ]  # fmt: skip


def candidates(precision: str) -> list[Launch]:
    """Other product configurations (fp32 gradients, 4 warps, 3 stages): the rank loop at run
    time, unrolled (``Blocks.unroll``) or replaced by a dot (``Blocks.dot_from``): what a GPU
    session should time next."""
    out = []
    rebuilds = {"loop": {}, "unroll 8": dict(unroll=8), "dot": dict(dot_from=1)}
    for norms, (m, n), rebuild in itertools.product((False, True), ((32, 64), (64, 32), (64, 64), (128, 64)), rebuilds):
        label = f"candidate: V @ X{' (+ sums)' if norms else ''}, rebuild by {rebuild}"
        blocks = _launch.Blocks(m, n, 64, 4, 3, **rebuilds[rebuild])
        out.append(_product(label, blocks, precision, norms, grads=("*fp32",)))
    return out


def _tile(row: dict) -> str:
    b = row["blocks"]
    return f"{b['block']} flat" if "block" in b else f"{b['m']}×{b['n']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--precision", default="tf32x3", help="tl.dot precision of the products (H100 default)")
    ap.add_argument("--only", default=None, help="only launches whose label contains this text")
    args = ap.parse_args()
    rows = []
    for launch in launches(args.precision) + candidates(args.precision):
        if args.only and args.only not in launch.label:
            continue
        consts = launch.consts
        tile = dict(block=consts["BLOCK"]) if "BLOCK" in consts else dict(m=consts["BLOCK_M"], n=consts["BLOCK_N"])
        for dtype in launch.grads:
            row = dict(
                launch=launch.label,
                grads=dtype[1:],
                blocks=dict(launch.blocks._asdict(), **tile),
                **resources(launch.fn, consts, dtype, launch.blocks, launch.unit),
            )
            rows.append(row)
            print(row, flush=True)
    record = dict(meta=metadata("cpu", target="sm_90 (compiled, not run)", precision=args.precision), rows=rows)
    name = f"kernel_resources_sm90_triton{triton.__version__}"
    write_json(record, args.out, f"{name}.json")
    table = markdown_table(
        ["launch", "G", "tile (warps, stages)", "registers", "spilled B", "shared KiB", "programs / SM",
         "loop pipelined", "stages change the code"],
        [[r["launch"], r["grads"], f"{_tile(r)} ({r['blocks']['warps']}, {r['blocks']['stages']})", r["registers"],
          r["spilled_bytes"], f"{r['shared_bytes'] / 1024:.0f}", r["programs_per_sm"],
          ("yes" if r["async_copies"] else "no") if r["loops"] else "no loop",
          "yes" if r["stages_change_code"] else "no"]
         for r in rows],
    )  # fmt: skip
    (args.out / f"{name}.md").write_text(
        f"Triton {triton.__version__}, compiled for sm_90 on CPU (no GPU), precision {args.precision}\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
