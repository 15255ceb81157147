"""The small operator interface that S-RSI is written against.

S-RSI never needs the entries of the matrix it compresses, only four operations: the products
``A @ X`` and ``Aᵀ @ Y`` with thin matrices (``matmul``, ``rmatmul``), ``‖A‖_F²`` (``sq_norm``)
and ``‖A − Q Uᵀ‖_F²`` (``residual_sq_norm``), and three attributes: ``shape`` ``(B, m, n)``,
``dtype`` and ``device`` (S-RSI sizes its sketch from the shape and draws it in that dtype on
that device). Anything that provides them (a dense tensor, the fused Triton operator that
rebuilds V tile by tile, a row-sharded operator) reuses the same iteration code in
:mod:`adapprox_kernels.srsi`. An operator may also offer ``project(y)``, an ``Aᵀ @ Y`` more
precise than its ``rmatmul``, which S-RSI then uses for its last product (the one that becomes
the factor ``U``).

Every operator is *batched*: it stands for ``B`` same-shaped matrices ``A[b]`` of shape
``(m, n)``, and all tensors carry that leading batch dimension.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LinearOperator(Protocol):
    """A batch of ``B`` matrices of shape ``(m, n)``, seen only through products and norms."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, m, n)``."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the products are computed and returned in."""
        ...

    @property
    def device(self) -> torch.device: ...

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ x``: ``(B, n, r) -> (B, m, r)``."""
        ...

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        """``Aᵀ @ y``: ``(B, m, r) -> (B, n, r)``."""
        ...

    def sq_norm(self) -> torch.Tensor:
        """``‖A‖_F²`` per matrix: ``(B,)``."""
        ...

    def residual_sq_norm(self, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``‖A − q uᵀ‖_F²`` per matrix, ``q: (B, m, k)``, ``u: (B, n, k)`` -> ``(B,)``."""
        ...


class DenseOperator:
    """A batch of matrices held in memory: ``a`` is ``(B, m, n)`` or a single ``(m, n)``."""

    def __init__(self, a: torch.Tensor):
        if a.dim() == 2:
            a = a.unsqueeze(0)
        if a.dim() != 3:
            raise ValueError(f"DenseOperator expects a (B, m, n) or (m, n) tensor, got shape {tuple(a.shape)}")
        self.a = a

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.a.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.a, x)

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        # (yᵀ A)ᵀ reads A row-major; bmm on A's transposed view was slower on CPU.
        return torch.bmm(y.transpose(1, 2), self.a).transpose(1, 2)

    def sq_norm(self) -> torch.Tensor:
        return self.a.square().sum(dim=(1, 2))

    def residual_sq_norm(self, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.a, q, u.transpose(1, 2), alpha=-1.0).square_().sum(dim=(1, 2))
