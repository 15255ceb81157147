"""A dispatch mode that fails at any op that reads a device tensor on the host: on a CPU, where
nothing waits, it finds what would make a step wait for the GPU (or a CUDA-graph capture fail)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that wait for the GPU to read a result on the host: a scalar read (item, bool, float),
# a check of a solver's info flags, or an output whose size depends on the data. A CUDA-graph
# capture refuses them (the call then runs eagerly for good: CallGraphs' "failed" count), and
# elsewhere in a step each one is a wait of its own.
HOST_READS = frozenset({
    "_local_scalar_dense", "_linalg_check_errors", "_linalg_eigh", "_linalg_svd", "linalg_eig", "nonzero",
    "masked_select", "is_nonzero", "equal", "allclose", "_unique2", "unique_dim", "unique_consecutive",
    "repeat_interleave",
})  # fmt: skip


class NoHostReads(TorchDispatchMode):
    """Raises at any op of :data:`HOST_READS`, or an index by a boolean mask (a nonzero)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masked = name == "index" and any(torch.is_tensor(i) and i.dtype == torch.bool for i in args[1])
        if name in HOST_READS or masked:
            raise AssertionError(f"{func} reads the device on the host")
        return func(*args, **(kwargs or {}))
