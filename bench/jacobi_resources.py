"""Registers and spills of the batched Jacobi eigensolver (``kernels/jacobi_eigh.py``) compiled for
sm_90 on CPU with Triton's own compiler, as ``kernel_resources.py`` compiles the step's kernels:
``python bench/jacobi_resources.py`` prints one line per tile size, way of applying the rotations
(``tl.dot`` or gathers) and warp count; ``default`` marks what ``jacobi_eigh`` launches."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_resources import compile_sm90, programs_per_sm, ptxas_usage

from adapprox_kernels.kernels.jacobi_eigh import DEFAULT_SWEEPS, DOT_MAX_TILE, _jacobi_eigh_kernel

UNIT = frozenset({"stride_an", "stride_zn"})  # the launcher's outputs and a contiguous input


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()  # --help; no options
    for tile in (16, 32, 64):
        for by_dot in (True, False):
            for warps in (4, 8):
                consts = dict(SWEEPS=DEFAULT_SWEEPS, R=tile, BY_DOT=by_dot)
                kernel = compile_sm90(_jacobi_eigh_kernel, consts, warps=warps, stages=1, unit=UNIT)
                regs, spills = ptxas_usage(kernel.asm["ptx"])
                shared = kernel.metadata.shared
                default = by_dot == (tile <= DOT_MAX_TILE) and warps == (4 if tile <= 32 else 8)
                print(dict(R=tile, rotations="dot" if by_dot else "gather", warps=warps, registers=regs,
                           spilled_bytes=spills, shared_bytes=shared,
                           programs_per_sm=programs_per_sm(regs, shared, warps),
                           default=default), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
