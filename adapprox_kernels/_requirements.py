"""The oldest torch and triton this package runs on, checked at import (torch) and when the
Triton backend is first asked for (triton), so that an older release fails with a clear message
rather than deep inside (torch 2.6: infer_schema rejects ``list[Tensor]``; triton 3.3: no
``triton.knobs``). Tested: torch 2.8, 2.11, 2.14, 2.15 and triton 3.4, 3.6, 3.8, 3.9 (docs/install.md)."""

from __future__ import annotations

import re

import torch

MIN_TORCH = (2, 8)  # at::Tag::cudagraph_unsafe (csrc/); 2.6 also rejects list[Tensor] in custom ops
MIN_TRITON = (3, 4)  # triton.knobs (kernels._launch.interpreted)


def version_tuple(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string ("2.8.0+cu128", "2.9.0a0+git1234"); None if unreadable."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(match.group(1)), int(match.group(2))) if match else None


def too_old(version: str, minimum: tuple[int, int]) -> bool:
    found = version_tuple(version)
    return found is not None and found < minimum


if too_old(torch.__version__, MIN_TORCH):
    raise ImportError(
        f"adapprox_kernels needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, found torch {torch.__version__} "
        "(see docs/install.md, Requirements)"
    )
