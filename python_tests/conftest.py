import os

# Before torch is imported: one thread (2 BLAS threads on 2 cores made small matmuls ~80x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

# Without a GPU the Triton kernels run under the interpreter, which triton enables only for
# functions decorated while TRITON_INTERPRET=1 is set -- including triton.language's own
# (tl.cdiv, tl.sum, ...), decorated when triton is first imported. So it is set here, before
# any test module can import triton; with CUDA the kernels are compiled as usual.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
