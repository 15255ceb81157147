"""``python -m adapprox_kernels``: what is installed, which backends run here, and why not."""

from __future__ import annotations

import importlib
import platform

import torch

from . import __version__
from .backends import availability


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - any import failure is worth reporting, not raising
        return f"not usable ({type(exc).__name__}: {exc})"


def extension_line() -> str:
    """The compiled csrc/ extension: loaded, or the saved reason it is not."""
    from . import _extension  # imported with the package (backends); its functions looked up per call

    loaded, error = _extension.extension_status()
    if not loaded:
        return f"not loaded ({error})"
    devices, why = _extension.extension_module().cuda_runtime_status()
    return f"loaded; {devices} CUDA device(s)" if why is None else f"loaded, but no CUDA runtime here ({why})"


def report() -> str:
    lines = [
        f"adapprox_kernels {__version__}",
        f"python   {platform.python_version()} ({platform.machine()})",
        f"torch    {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton   {_version('triton')}",
        f"numpy    {_version('numpy')}",
        f"extension (csrc/): {extension_line()}",
    ]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(i)
            cap = ".".join(map(str, torch.cuda.get_device_capability(i)))
            lines.append(f"cuda:{i}   {name} (sm {cap})")
            devices.append(torch.device("cuda", i))
    else:
        lines.append("cuda     no device visible (the optimizer runs the reference backend on CPU)")
    for device in devices:
        lines.append(f"backends on {device}:")
        for name, why in availability(device).items():
            lines.append(f"  {name:10s} {'usable' if why is None else 'not usable: ' + why}")
    return "\n".join(lines)
