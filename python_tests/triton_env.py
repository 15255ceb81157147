"""Where the Triton tests run, and the fixture that gets the kernels ready there.

On a machine with CUDA the kernels are compiled and the tests use CUDA tensors. Without one
they run on CPU tensors under the Triton interpreter, which triton only enables for kernels
decorated while ``TRITON_INTERPRET=1`` is set, triton.language's own functions included (those
are decorated when triton is first imported, which is why conftest.py sets the variable before
any test imports triton). The fixture makes sure of it for this module, (re-)imports the
kernel modules if they were decorated otherwise, and restores the variable afterwards.
"""

import importlib
import importlib.util
import os
import re
import sys

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreter_refuses_numpy() -> str | None:
    """Why Triton's interpreter cannot run a kernel with a run-time loop bound here, or None:
    that of triton 3.4 to 3.6 converts a one-element array with ``int()``, which numpy >= 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars", triton#9171;
    triton 3.8 converts it). Read from the installed versions: triton is not imported here."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version, numpy_version = version("triton"), version("numpy")
    except PackageNotFoundError:
        return None

    def major_minor(v: str) -> tuple[int, int]:  # "2.4.0rc1" and "3.6.0+git…" too
        return tuple(map(int, re.match(r"(\d+)\.(\d+)", v).groups()))

    if major_minor(triton_version) <= (3, 6) and major_minor(numpy_version) >= (2, 4):
        return f"triton {triton_version}'s interpreter fails under numpy {numpy_version} (needs numpy < 2.4)"
    return None


# Kernel modules and a jitted function of each (interpreted or compiled); _tiles first: the
# others import it.
_MODULES = {
    "_tiles": "v_tile",
    "v_matmul": "_v_matmul_kernel",
    "v_norms": "_v_norms_kernel",
    "update_cosine": "_update_cosine_kernel",
    "apply_update": "_apply_update_kernel",
    "dense_moment": "_dense_sums_kernel",
    "jacobi_eigh": "_jacobi_eigh_kernel",
}


def _load_kernels() -> None:
    stale = False  # once one module is re-imported, the ones importing it must be too
    for name, jitted in _MODULES.items():
        full = f"adapprox_kernels.kernels.{name}"
        module = sys.modules.get(full)
        if module is None:
            importlib.import_module(full)
            continue
        if stale or type(getattr(module, jitted)).__name__ != "InterpretedFunction":
            stale = True
            importlib.reload(module)


@pytest.fixture(scope="module", autouse=True)
def triton_kernels():
    """Autouse in the Triton test modules (import it there)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if DEVICE.type == "cuda":
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _load_kernels()
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
