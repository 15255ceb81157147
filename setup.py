"""Build of adapprox_kernels: pure Python, plus the optional csrc/ CUDA extension ``adapprox_kernels._C``.

The extension is built only when torch is a CUDA build and a CUDA toolkit (nvcc) of torch's CUDA
major version plus the cuBLAS / cuSOLVER headers and libraries are found; otherwise the wheel is
pure Python and the package falls back to torch.linalg (see docs/install.md). Environment switches:

* ``ADAPPROX_SKIP_CUDA_BUILD=1``: never build the extension (pure wheel).
* ``ADAPPROX_FORCE_BUILD=1``: build it or fail with the reason (instead of a silent pure wheel).
* ``ADAPPROX_CUDA_ARCHS="8.0;9.0"``: GPU architectures; default ``TORCH_CUDA_ARCH_LIST`` if set,
  else the visible GPU's, else ``9.0+PTX``.
* ``MAX_JOBS``: parallel compile jobs (ninja); ``CUDA_HOME``: the toolkit (else nvcc's location,
  then ``/usr/local/cuda``).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

DEFAULT_ARCHS = "9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> str | None:
    """A toolkit directory holding ``bin/nvcc`` and ``include/cuda_runtime.h``.

    torch's own guess takes ``dirname(dirname(which nvcc))``, which is wrong when nvcc on PATH is a
    wrapper script (here ``/usr/local/bin/nvcc``) and then fails to link ``-lcudart``; so ask nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            dry_run = [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull]
            out = subprocess.run(dry_run, capture_output=True, text=True, timeout=60)
            # A dry run prints the toolkit's variables, e.g. "#$ TOP=/usr/local/cuda-13.0/bin/..".
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("#$ TOP="):
                    candidates.append(os.path.normpath(os.path.join(line.split("=", 1)[1].strip(), "..")))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if (
            home
            and os.path.isfile(os.path.join(home, "bin", "nvcc"))
            and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
        ):
            return os.path.realpath(home)
    return None


def _nvcc_version(cuda_home: str) -> str | None:
    """The toolkit's ``major.minor`` as its nvcc reports it ("13.0"), or None when that cannot be read."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    return match.group(1) if match else None


def _find_library(roots: list[str], header: str, stem: str) -> tuple[str, str, str] | None:
    """``(include dir, lib dir, linker flag)`` of a CUDA math library such as cuBLAS.

    Looks in the toolkit, then in the ``nvidia/*`` wheels next to torch, which ship only
    versioned files (``libcublas.so.13``), hence ``-l:<file>`` when no unversioned one exists."""
    for root in roots:
        include = os.path.join(root, "include")
        if not os.path.isfile(os.path.join(include, header)):
            continue
        for libdir in (os.path.join(root, "lib64"), os.path.join(root, "lib")):
            if os.path.isfile(os.path.join(libdir, f"lib{stem}.so")):
                return include, libdir, f"-l{stem}"
            versioned = sorted(glob.glob(os.path.join(libdir, f"lib{stem}.so.[0-9]*")), key=len)
            if versioned:
                return include, libdir, f"-l:{os.path.basename(versioned[0])}"
    return None


def _arch_list(torch) -> str:
    if os.environ.get("ADAPPROX_CUDA_ARCHS"):
        return os.environ["ADAPPROX_CUDA_ARCHS"]
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return DEFAULT_ARCHS


def _extension() -> tuple[list, dict, str | None]:
    """``(ext_modules, cmdclass, None)``, or ``([], {}, reason)`` when the extension is not built."""
    if _flag("ADAPPROX_SKIP_CUDA_BUILD"):
        return [], {}, "ADAPPROX_SKIP_CUDA_BUILD is set"
    try:
        import torch
    except ImportError:
        return [], {}, "torch is not importable (build with --no-build-isolation next to an installed torch)"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU-only build"
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < (2, 8):
        # csrc/cholqr.cpp tags its op at::Tag::cudagraph_unsafe, which 2.7 and older lack
        return [], {}, f"torch {torch.__version__} is older than 2.8, the oldest this package supports"
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return [], {}, "no CUDA toolkit found (set CUDA_HOME to a directory with bin/nvcc)"
    # torch.utils.cpp_extension stops the whole install with a RuntimeError on a major mismatch;
    # this says why and builds the pure-Python package instead. (An unreadable version passes,
    # as it does torch's check.)
    toolkit = _nvcc_version(cuda_home)
    if toolkit is not None and toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
        why = f"the CUDA toolkit in {cuda_home} is {toolkit}, torch {torch.__version__} needs CUDA {torch.version.cuda}"
        return [], {}, why
    # torch.utils.cpp_extension reads CUDA_HOME when imported.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    torch_site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    roots = [cuda_home, *sorted(glob.glob(os.path.join(torch_site, "nvidia", "*")))]
    libs = [_find_library(roots, "cublas_v2.h", "cublas"), _find_library(roots, "cusolverDn.h", "cusolver")]
    if None in libs:
        return [], {}, f"cuBLAS / cuSOLVER headers or libraries not found under {roots}"
    os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list(torch)

    include_dirs = sorted({inc for inc, _, _ in libs})
    library_dirs = sorted({lib for _, lib, _ in libs})
    link_args = [flag for _, _, flag in libs]
    for libdir in library_dirs:
        # Found at run time both from a wheel installed next to torch's nvidia/ wheels and from
        # the build machine's own location (editable installs).
        link_args.append(f"-Wl,-rpath,{libdir}")
        if libdir.startswith(torch_site + os.sep):
            link_args.append("-Wl,-rpath,$ORIGIN/../" + os.path.relpath(libdir, torch_site))
    ext = CUDAExtension(
        name="adapprox_kernels._C",
        sources=["csrc/cholqr.cpp", "csrc/cholqr_kernels.cu"],
        depends=["csrc/cholqr_kernels.cuh"],  # a changed header rebuilds (MANIFEST.in ships it in the sdist)
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        # -g0: Python's own CFLAGS carry -g, which makes a 12.4 MB module instead of 370 KB (torch
        # 2.14.1, nvcc 13.0).
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3"]},
        extra_link_args=link_args,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, None


ext_modules, cmdclass, skipped = _extension()
if skipped is not None:
    if _flag("ADAPPROX_FORCE_BUILD"):
        sys.exit(f"adapprox_kernels: ADAPPROX_FORCE_BUILD is set but the CUDA extension cannot be built: {skipped}")
    print(f"adapprox_kernels: building without the CUDA extension ({skipped})", file=sys.stderr)

setup(
    name="adapprox_kernels",
    version="0.1.0",
    description="Adapprox and AdaMeM optimizers with fused Triton kernels and a batched S-RSI extension",
    packages=find_packages(include=["adapprox_kernels", "adapprox_kernels.*"]),
    python_requires=">=3.10",
    # torch 2.8: the extension tags its op at::Tag::cudagraph_unsafe (new in 2.8; 2.6 also rejects
    # the custom ops' list[Tensor] annotations at import). Tested: torch 2.8 (CPU), 2.11 (H100),
    # 2.14, 2.15 (CPU); adapprox_kernels/_requirements.py refuses an older torch at import (keep in step).
    install_requires=["torch>=2.8", "numpy"],
    # "main": what python -m adapprox_kernels.train imports, its peers' packages included
    # (transformers: Hugging Face's Adafactor for adafactor-m; also a galore-torch import).
    extras_require={
        # 3.4: triton.knobs (the interpreter switch); tested 3.4 (interpreter, sm_90 compile),
        # 3.6 (H100), 3.8, 3.9. An older one leaves the "triton" backend unavailable, with the reason.
        "triton": ["triton>=3.4"],
        "main": ["matplotlib", "tqdm", "came-pytorch", "galore-torch", "transformers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
