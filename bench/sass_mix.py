"""Issue slots the V products spend per element of G, read from their sm_90 SASS: a static model, no GPU.

Each product launch (the first pass with the sums, ``V @ X``, ``Vᵀ @ Y``) is compiled for sm_90 as
``kernel_resources.py`` compiles it, at ranks 1 and 8, with fp32 and bf16 G, at the default blocks
and dot precision and at the variants no GPU session has timed (``Blocks(unroll=16)``,
``Blocks(dot_from=1)``, the other precisions), and disassembled with Triton's ``cuobjdump``. The
instructions of the main loop (the loop over G's columns: the outermost loop, found from the
backward branches; a loop inside it is the rank loop, counted k times) are counted by the pipe
that executes them. One iteration covers BLOCK_M × BLOCK_N elements of G with ``num_warps``
warps, so the counts give each pipe's clocks per element on one SM at the sm_90 rates below.
Against them: G's bytes per element at the copy bandwidth the H100 measured, in SM clocks.

    bound = min(1, memory clocks / the busiest pipe's clocks)

is an upper bound on the fraction of copy bandwidth a launch can reach, from instruction issue
alone: it ignores latency, occupancy, barriers and stalls, and counts every instruction of the
loop once per iteration (predicated-off ones too). A measured fraction far below it means the
pass waits, not that it issues too much. Nothing here is measured.

``python bench/sass_mix.py`` writes ``bench/results/sass_mix_sm90_triton<version>.{json,md}``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import triton  # noqa: E402
from common import RESULTS, markdown_table, metadata, write_json  # noqa: E402
from triton.tools.disasm import path_to_cuobjdump  # noqa: E402

# H100 SXM. Sustained clocks under load are lower than the boost clock: every bound falls in
# proportion (at 1.6 GHz, to 81% of the value here).
SMS = 132
CLOCK_HZ = 1.98e9
# device-to-device copy on the H100: 2.79-2.99 TB/s on the fp32 groups, 2.56-2.92 on bf16
# (``copy_GBps`` in bench/results/bench_step_nvidia-h100-80gb-hbm3_*.json)
COPY_BPS = 2.9e12

# Warp-instructions per clock per SM on sm_90: the CUDA C++ Programming Guide's results per clock
# per SM for compute capability 9.0 ("Arithmetic Instructions"), over 32 lanes. Which opcode runs
# where (CLASSES) is not documented per opcode: sm_90's VIADD counts as an integer add (ALU), IMAD
# in all its forms (IMAD.MOV too) as a multiply-add on the FMA-heavy pipe.
ISSUE = 4  # four schedulers, one instruction each per clock
FP32 = 4  # 128 fp32 add / multiply / FMA
HEAVY = 2  # 64 integer multiply(-add): on the FMA-heavy half of the fp32 lanes, so they share it
ALU = 2  # 64 compare, min/max, integer add, logic, shift
XU = 0.5  # 16 conversions to or from 64-bit or fp types, and MUFU (rcp, rsqrt, ...)
SHFL = 1  # 32 warp shuffles
# Loads and stores (global, shared, LDGSTS, LDSM): the MIO unit hands one instruction per clock
# to the LSU pipe, one per SM (NVIDIA's answer in forums.developer.nvidia.com/t/273699); each
# takes at least one wavefront of the L1/shared pipeline, which processes one per clock.
LSU = 1
SHARED_BYTES = 128  # shared memory bytes per clock per SM
# Dense tensor-core FMAs per clock per SM: Hopper's SM does twice A100's per clock (512 tf32).
TENSOR_FMA = {"TF32": 1024, "BF16": 2048, "F16": 2048, "E4M3": 4096, "E5M2": 4096}

CLASSES = {
    "fp32": {"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I"},
    "heavy": {"IMAD", "IMAD32I", "IMUL", "IMUL32I", "IDP"},
    "alu": {"FMNMX", "FSETP", "FSEL", "FSET", "ISETP", "IADD3", "VIADD", "LOP3", "SHF", "SEL", "LEA", "PRMT",
            "IABS", "IMNMX", "VIMNMX", "MOV", "PLOP3", "P2R", "R2P", "BMSK", "SGXT", "F2FP", "I2FP", "FLO"},
    "xu": {"MUFU", "F2F", "F2I", "I2F", "I2I", "FRND", "POPC", "BREV"},
    "tensor": {"HGMMA", "HMMA"},
    "shared": {"LDS", "STS", "LDSM", "STSM", "ATOMS"},
    "shfl": {"SHFL"},
    "global": {"LDG", "STG", "LDGSTS", "RED", "ATOMG", "LDL", "STL", "LD", "ST"},
}  # fmt: skip
# Anything else is "other" and costs an issue slot only: branches, barriers, the uniform datapath
# (U*, R2UR), CS2R (zeroing register pairs), fences and the WARPGROUP syncs of HGMMA.
CLASS_OF = {op: name for name, ops in CLASSES.items() for op in ops}

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z]\S*)([^;]*);")
BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def sass(kernel) -> str:
    """The SASS of a compiled kernel, as ``cuobjdump -sass`` prints it (with addresses)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([path_to_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def parse(text: str) -> list[tuple[int, str, str]]:
    """``(address, opcode with modifiers, operands)`` of each instruction."""
    return [(int(a, 16), op, args.strip()) for a, op, args in INSTRUCTION.findall(text)]


def loops(code: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """``(first, last address)`` of each loop: a branch back to an address before its own (not
    the branch to itself that ends every program)."""
    out = []
    for addr, op, args in code:
        target = BRANCH_TARGET.search(args) if op.split(".")[0] == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            out.append((int(target.group(1), 16), addr))
    return out


def _outermost(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]


def main_loop(code: list[tuple[int, str, str]], trips: int) -> dict[str, int]:
    """The main loop's instructions, each weighted by how often it runs per iteration: ``trips``
    times inside a loop nested in it (the rank loop), once elsewhere. The main loop is the
    outermost loop (the one holding the tensor-core instructions, were there several)."""
    found = loops(code)
    tensor = [a for a, op, _ in code if CLASS_OF.get(op.split(".")[0]) == "tensor"]
    top = _outermost(found)
    if len(top) > 1:
        top = [lp for lp in top if any(lp[0] <= a <= lp[1] for a in tensor)]
    if len(top) != 1:
        raise ValueError(f"cannot tell the main loop among {len(top)} loops")
    first, last = top[0]
    nested = _outermost([lp for lp in found if lp != top[0] and first <= lp[0] and lp[1] <= last])
    if len(nested) > 1:  # e.g. a loop that ptxas unrolled with a remainder loop: trip counts unknown
        raise ValueError(f"{len(nested)} loops inside the main loop; expected at most the rank loop")
    counts = collections.Counter()
    for addr, op, _ in code:
        if first <= addr <= last:
            counts[op] += trips if any(lo <= addr <= hi for lo, hi in nested) else 1
    return dict(counts)


def _width(op: str) -> int:
    """Bytes per lane of a load or store (``.64``, ``.128``, ``.U16``...; 4 unless given)."""
    mods = op.split(".")[1:]
    for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return size
    return 4


def _mma(op: str) -> tuple[int, int, int, str]:
    """``(m, n, k, input type)`` of ``HGMMA.64x16x8.F32.TF32`` or ``HMMA.1688.F32.TF32``."""
    base, shape, *rest = op.split(".")
    if base == "HGMMA":
        m, n, k = map(int, shape.split("x"))
    else:
        m, n, k = int(shape[:2]), int(shape[2]), int(shape[3:])  # 1688, 16816
    return m, n, k, rest[-1]


def mix(counts: dict[str, int], code_by_op: dict[str, str], warps: int, elements: int) -> dict:
    """Warp-instructions per element of G by class, shared-memory bytes and tensor FMAs per
    element, and each pipe's clocks per element on one SM. ``code_by_op``: an operand string
    of each opcode (HGMMA's tells whether A comes from shared memory)."""
    per = collections.Counter()
    shared_bytes = tensor_clocks = 0.0
    for op, n in counts.items():
        base = op.split(".")[0]
        cls = CLASS_OF.get(base, "other")
        per[cls] += n * warps / elements
        if base in ("LDS", "STS", "LDGSTS", "ATOMS"):  # LDGSTS writes shared memory
            shared_bytes += n * warps * 32 * _width(op) / elements
        elif base in ("LDSM", "STSM"):  # 8x8 matrices of 16-bit values, 128 bytes each
            shared_bytes += n * warps * 128 * int(re.search(r"M88\.(\d)", op).group(1)) / elements
        elif cls == "tensor":
            m, nn, k, kind = _mma(op)
            group = base == "HGMMA"  # the 4 warps of a warpgroup issue one HGMMA together
            issued = n * (warps / 4 if group else warps)
            tensor_clocks += issued * m * nn * k / TENSOR_FMA[kind] / elements
            if group:  # B, and A where a descriptor gives it, come from shared memory
                size = 4 if kind == "TF32" else 2 if kind in ("BF16", "F16") else 1
                a_shared = code_by_op[op].split(",")[1].strip().startswith("gdesc")
                shared_bytes += issued * (nn * k + (m * k if a_shared else 0)) * size / elements
    clocks = dict(
        issue=sum(per.values()) / ISSUE,
        fma=max((per["fp32"] + per["heavy"]) / FP32, per["heavy"] / HEAVY),
        alu=per["alu"] / ALU,
        xu=per["xu"] / XU,
        shfl=per["shfl"] / SHFL,
        lsu=(per["global"] + per["shared"]) / LSU,
        tensor=tensor_clocks,
    )
    return dict(per_element=dict(per), shared_bytes_per_element=shared_bytes, clocks=clocks,
                shared_clocks=shared_bytes / SHARED_BYTES)  # fmt: skip


VARIANTS = {  # (precision, Blocks fields changed)
    "default (tf32x3)": ("tf32x3", {}),
    "unroll=16": ("tf32x3", dict(unroll=16)),
    "dot_from=1": ("tf32x3", dict(dot_from=1)),
    "tf32": ("tf32", {}),
    "tf32_rn": ("tf32_rn", {}),
    "ieee": ("ieee", {}),
}
GRADS = {"*fp32": 4, "*bf16": 2}  # G's pointer type: bytes per element


def _kr():
    """``kernel_resources``, imported only to compile: importing it unsets ``TRITON_INTERPRET``,
    which a test process that imports the parser here may be running kernels under."""
    import kernel_resources

    return kernel_resources


def model(launch, grad: str, rank: int) -> dict:
    """The main loop's mix and clocks per element for one launch (a ``kernel_resources.Launch``)."""
    kr, b = _kr(), launch.blocks
    kernel = kr.compile_sm90(launch.fn, launch.consts, pointers={"g_ptr": grad}, warps=b.warps, stages=b.stages,
                             unit=launch.unit)  # fmt: skip
    code = parse(sass(kernel))
    counts = main_loop(code, rank)
    regs, spills = kr.ptxas_usage(kernel.asm["ptx"])
    out = mix(counts, {op: args for _, op, args in code}, b.warps, b.m * b.n)
    memory = GRADS[grad] * SMS * CLOCK_HZ / COPY_BPS
    busiest = max(out["clocks"], key=out["clocks"].get)
    programs = kr.programs_per_sm(regs, kernel.metadata.shared, b.warps)
    barriers = sum(n for op, n in counts.items() if op.startswith("BAR."))  # each waits for every warp of the program
    return dict(registers=regs, spilled_bytes=spills, warps_per_sm=b.warps * programs, barriers=barriers,
                loop_instructions=sum(counts.values()), counts=counts, **out, memory_clocks=memory, busiest=busiest,
                bound=min(1.0, memory / out["clocks"][busiest]))  # fmt: skip


# The H100's fractions of copy for the products at k = 8 (twenty-third session, docs/benchmarks.md).
MEASURED_FILE = RESULTS / "bench_step_nvidia-h100-80gb-hbm3_20261124-014020.json"
PASSES = {"V @ X, first pass (+ sums)": "v_matmul+sums (first pass)", "V @ X": "v_matmul", "Vᵀ @ Y": "v_rmatmul"}


def measured(label: str, grad: str) -> dict:
    """``{group: (fraction of copy, SM clocks per element at CLOCK_HZ)}`` from the H100 run, the
    345M MLP group first."""
    gpu = json.loads(MEASURED_FILE.read_text())["gpu"]
    out = {}
    for group in ("gpt2-345M", "gpt2-124M"):
        runs = gpu[group]
        run = runs["bandwidth"]["torch.float32" if grad == "*fp32" else "torch.bfloat16"]
        g, p = run["group"], run["passes"][PASSES[label]]
        out[group] = (p["fraction_of_copy"], p["median_ms"] * 1e-3 * SMS * CLOCK_HZ / (g["batch"] * g["m"] * g["n"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--only", default=None, help="only variants whose name contains this text")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    rows = []
    for name, (precision, variant) in VARIANTS.items():
        if args.only and args.only not in name:
            continue
        for rank in args.ranks:
            for launch in _kr().products(precision, rank, **variant):
                for grad in GRADS:
                    row = dict(launch=launch.label, rank=rank, grads=grad[1:], variant=name,
                               blocks=launch.blocks._asdict(), **model(launch, grad, rank))  # fmt: skip
                    if rank == 8 and name.startswith("default"):
                        row["measured_h100"] = measured(launch.label, grad)
                    rows.append(row)
                    print({k: row[k] for k in ("launch", "rank", "grads", "variant", "busiest", "bound")}, flush=True)
    assumptions = dict(sms=SMS, clock_hz=CLOCK_HZ, copy_bytes_per_s=COPY_BPS, warp_instructions_per_clock=dict(
        issue=ISSUE, fp32=FP32, heavy=HEAVY, alu=ALU, xu=XU, shfl=SHFL, lsu=LSU), shared_bytes_per_clock=SHARED_BYTES,
        tensor_fma_per_clock=TENSOR_FMA, classes={k: sorted(v) for k, v in CLASSES.items()})  # fmt: skip
    meta = metadata("cpu", target="sm_90 (compiled, not run)", model="static: instruction counts, no GPU")
    name = f"sass_mix_sm90_triton{triton.__version__}"
    write_json(dict(meta=meta, assumptions=assumptions, rows=rows), args.out, f"{name}.json")
    (args.out / f"{name}.md").write_text(report(rows))


PIPES = dict(issue="issue", fma="FMA", alu="ALU", xu="XU", shfl="SHFL", lsu="LSU", tensor="tensor")


def _pct(x: float) -> str:
    return f"{x:.0%}"


def report(rows: list[dict]) -> str:
    table = markdown_table(
        ["launch", "k", "G", "variant", "regs (spilled B)", "warps / SM", "BAR / iter.", *PIPES.values(),
         "shared (no broadcast)", "memory", "bound", "H100 at k = 8: 345M, 124M (clocks)"],
        [[r["launch"], r["rank"], r["grads"], r["variant"], f"{r['registers']} ({r['spilled_bytes']})",
          r["warps_per_sm"], r["barriers"], *(f"{r['clocks'][p]:.3f}" for p in PIPES), f"{r['shared_clocks']:.3f}",
          f"{r['memory_clocks']:.3f}",
          f"{_pct(r['bound'])} ({PIPES[r['busiest']]})",
          ", ".join(f"{_pct(f)} ({c:.2f})" for f, c in r["measured_h100"].values()) if "measured_h100" in r else ""]
         for r in rows],
    )  # fmt: skip
    return (
        f"Triton {triton.__version__}: the V products' main loops compiled for sm_90 on CPU (no GPU); a static model, "
        "nothing measured but the last column.\n\n"
        f"SM clocks per element of G on one SM, at the sm_90 rates of `bench/sass_mix.py` (H100 SXM, {SMS} SMs, "
        f"{CLOCK_HZ / 1e9:.2f} GHz; memory: G's bytes at {COPY_BPS / 1e12:.1f} TB/s). bound = min(1, memory / the "
        "busiest pipe, named in brackets): an upper bound on the fraction of copy bandwidth from instruction "
        "issue alone (no latency, occupancy, barriers or stalls). BAR / iter.: block-wide barriers per iteration "
        "of the main loop (the rank loop's k times). Shared memory counts every lane's bytes at "
        f"{SHARED_BYTES} B per clock (a broadcast load takes fewer) and is left out of the bound. Last column: the "
        f"H100's fraction of copy at k = 8 (`{MEASURED_FILE.name}`) and the SM clocks per element it took at "
        f"{CLOCK_HZ / 1e9:.2f} GHz.\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
