"""Soft loader of the compiled ``adapprox_kernels._C`` extension, and the orthonormalizer that uses it.

The extension is optional: a missing or broken module (pure-Python install, no CUDA toolkit at
build time, torch upgraded after the build, ...) only sets a flag and keeps the import error for
diagnostics (``extension_status()``, shown by ``python -m adapprox_kernels``). ``orthonormalize``
then falls back to Householder QR (``torch.linalg.qr``), which spans the same columns.

Layers: ``_C.cholqr_orthonormalize`` (C++/CUDA) -> the dispatcher op
``torch.ops.adapprox_kernels.cholqr_orthonormalize`` (with a fake impl for torch.compile) ->
the launcher :func:`cholqr_cuda` (checks) -> :func:`orthonormalize` (picks a path per tensor).
Set ``ADAPPROX_DISABLE_EXTENSION=1`` to ignore a built extension (A/B comparisons).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .cholqr import check_sketch
from .srsi import householder_orthonormalize

OP_NAME = "adapprox_kernels::cholqr_orthonormalize"
UNCHECKED_OP_NAME = "adapprox_kernels::cholqr_orthonormalize_unchecked"


def _load(name: str = f"{__package__}._C"):
    """``(module, None)`` or ``(None, "why it is unavailable")``; never raises."""
    if os.environ.get("ADAPPROX_DISABLE_EXTENSION", "").strip().lower() in ("1", "true", "yes", "on"):
        return None, "disabled by ADAPPROX_DISABLE_EXTENSION"
    try:
        if importlib.util.find_spec(name) is None:
            return None, "not built (pure-Python install; see docs/install.md to build it)"
        return importlib.import_module(name), None
    except Exception as exc:  # noqa: BLE001 - any failure to load (OSError, undefined symbol, ...) is reported
        return None, f"{type(exc).__name__}: {exc}"


_MODULE, _ERROR = _load()

if _MODULE is not None:

    def _check_fake_input(y: torch.Tensor) -> None:
        # The metadata checks of csrc/cholqr.cpp (TORCH_CHECK: RuntimeError), so that a trace
        # rejects what the kernel would; the device is not checked (meta tensors infer shapes).
        torch._check(
            y.dim() == 3, lambda: f"cholqr_orthonormalize expects a (B, m, r) tensor, got {y.dim()} dimensions"
        )
        torch._check(y.dtype == torch.float32, lambda: f"cholqr_orthonormalize expects float32, got {y.dtype}")
        torch._check(
            y.shape[1] >= y.shape[2], lambda: f"cholqr_orthonormalize needs m >= r, got shape {tuple(y.shape)}"
        )

    @torch.library.register_fake(OP_NAME)
    def _cholqr_fake(y: torch.Tensor) -> torch.Tensor:
        # Same shape, dtype and device as the input; contiguous like the CUDA result.
        _check_fake_input(y)
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    @torch.library.register_fake(UNCHECKED_OP_NAME)
    def _cholqr_unchecked_fake(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_fake_input(y)
        q = torch.empty_like(y, memory_format=torch.contiguous_format)
        return q, y.new_empty(y.shape[0], dtype=torch.bool)


def extension_status() -> tuple[bool, str | None]:
    """``(loaded, error)``: whether ``adapprox_kernels._C`` is usable, else why not."""
    return _MODULE is not None, _ERROR


def extension_module():
    """The loaded ``_C`` module; raises ``RuntimeError`` with the saved reason if unavailable."""
    if _MODULE is None:
        raise RuntimeError(f"the adapprox_kernels CUDA extension is unavailable: {_ERROR}")
    return _MODULE


def cholqr_cuda(y: torch.Tensor) -> torch.Tensor:
    """Robust batched CholeskyQR on the GPU (the extension): ``(B, m, r)`` fp32 CUDA ->
    ``(B, m, r)`` with orthonormal columns. Same algorithm as :func:`adapprox_kernels.cholqr.cholqr_orthonormalize`."""
    extension_module()
    check_sketch(y)
    if y.device.type != "cuda":
        raise ValueError(f"cholqr_cuda needs a CUDA tensor, got one on {y.device}")
    if y.dtype != torch.float32:
        raise ValueError(f"cholqr_cuda takes float32 sketches, got {y.dtype}")
    return torch.ops.adapprox_kernels.cholqr_orthonormalize(y)


def uses_extension(y: torch.Tensor) -> bool:
    """Whether :func:`orthonormalize` sends ``y`` to the extension: fp32 CUDA tensors, when loaded."""
    return _MODULE is not None and y.device.type == "cuda" and y.dtype == torch.float32


def orthonormalize_unchecked(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`orthonormalize` without its host sync: ``(q, failed)`` where ``failed`` is a
    ``(B,)`` bool tensor of the matrices whose CholeskyQR failed (only non-finite sketches do),
    which the caller must recompute with :func:`orthonormalize` before using them; ``None``
    when Householder QR ran (it cannot fail). The optimizer checks all of a step's flags at once."""
    if uses_extension(y):
        check_sketch(y)
        return torch.ops.adapprox_kernels.cholqr_orthonormalize_unchecked(y)
    return householder_orthonormalize(y), None


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """The S-RSI orthonormalizer, ``(B, m, r) -> (B, m, r)``: the extension's CholeskyQR for fp32
    CUDA tensors when it is loaded, else Householder QR. Column signs may differ between the two;
    the spans (and so every S-RSI result ``Q Uᵀ = Q Qᵀ A``) agree to rounding."""
    if uses_extension(y):
        return cholqr_cuda(y)
    return householder_orthonormalize(y)
