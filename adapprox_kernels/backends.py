"""Which implementation runs the Adapprox step, and why the others cannot.

A backend supplies three pieces to the optimizer (see :class:`ReferenceBackend`), and a
``name`` (``"triton"`` is also passed ``precision=``, ``Adapprox(product_precision=…)``):

* ``second_moment(grads, q, u, beta2, *, eps)`` -> a :class:`~adapprox_kernels.linear_operator.LinearOperator`
  for ``V_t`` of a batch of same-shaped matrices, whose update ``apply_step`` computes
  (``eps`` lets a fused backend reduce the update's RMS in its first pass over G);
* ``orthonormalize`` -> the batched QR used inside S-RSI; optionally
  ``orthonormalize_unchecked`` -> ``(q, failed)``, the same without a host sync, where
  ``failed`` (``(B,)`` bool, or ``None``) marks matrices to recompute with ``orthonormalize``
  (the optimizer checks every flag of a step at once);
* ``apply_step(op, params, exp_avgs, ..., residual_factors=None)`` -> the momentum /
  weight-decay / weight write; with ``residual_factors=(q, u)`` it also returns ξ's numerator
  ``‖V − q uᵀ‖_F²`` per matrix (a fused backend gets it from the same pass).

Optionally ``dense_second_moment`` and ``apply_dense_step``: the dense buckets' fused passes
(vectors, small matrices; see ``TritonBackend``); without them those take the reference path.

``"reference"`` is plain PyTorch and works everywhere. Faster backends register themselves in
:data:`BACKENDS` with an ``available(device)`` check that returns ``None`` or the reason they
cannot run; ``"auto"`` takes the first one available for the parameters' device, among those
whose optional ``auto_device_types`` include the device's type (so a backend can run on a
device when asked by name without ever being picked there automatically).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import reference
from ._extension import orthonormalize as default_orthonormalize
from ._extension import orthonormalize_unchecked


class ReferenceBackend:
    """Plain PyTorch; materializes V (the oracle for every other backend)."""

    name = "reference"
    # The CUDA extension's CholeskyQR on fp32 CUDA tensors when it is built, else Householder QR.
    orthonormalize = staticmethod(default_orthonormalize)
    orthonormalize_unchecked = staticmethod(orthonormalize_unchecked)

    @staticmethod
    def available(device: torch.device) -> str | None:
        return None

    @staticmethod
    def second_moment(
        grads: Sequence[torch.Tensor], q: torch.Tensor, u: torch.Tensor, beta2: float, *, eps: float | None = None
    ):
        """``grads``: ``B`` tensors ``(m, n)``; ``q: (B, m, K)``, ``u: (B, n, K)``."""
        g = torch.stack([x.to(q.dtype) for x in grads])
        return reference.ReferenceSecondMoment(g, q, u, beta2)

    @staticmethod
    def apply_step(
        op, params, exp_avgs, *, eps, clip_threshold, lr, beta1, weight_decay, cosine_max_scale, residual_factors=None,
        rounding_keys=None, scalars=None,
    ):  # fmt: skip
        resid = op.residual_sq_norm(*residual_factors) if residual_factors is not None else None
        upd = op.clipped_update(eps, clip_threshold)
        reference.apply_updates(
            params, upd, exp_avgs, lr=lr, beta1=beta1, weight_decay=weight_decay, cosine_max_scale=cosine_max_scale,
            rounding_keys=rounding_keys, scalars=scalars,
        )  # fmt: skip
        return resid


# name -> backend, in order of preference for "auto" (fastest first).
BACKENDS: dict[str, object] = {"reference": ReferenceBackend}
_PREFERENCE: list[str] = ["reference"]


def register_backend(backend, prefer: bool = True) -> None:
    """Add a backend; ``prefer`` puts it ahead of the others for ``"auto"``."""
    BACKENDS[backend.name] = backend
    if backend.name in _PREFERENCE:
        _PREFERENCE.remove(backend.name)
    if prefer:
        _PREFERENCE.insert(0, backend.name)
    else:
        _PREFERENCE.append(backend.name)


def backend_names() -> tuple[str, ...]:
    return ("auto", *BACKENDS)


def resolve_backend(name: str, device: torch.device):
    """The backend object for ``name`` on ``device``; raises with the reason if unusable."""
    if name == "auto":
        for candidate in _PREFERENCE:
            backend = BACKENDS[candidate]
            if device.type not in getattr(backend, "auto_device_types", (device.type,)):
                continue
            if backend.available(device) is None:
                return backend
        raise RuntimeError("no backend available")  # unreachable: reference is always available
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {backend_names()}")
    backend = BACKENDS[name]
    why = backend.available(device)
    if why is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {why}")
    return backend


def availability(device: torch.device) -> dict[str, str | None]:
    """``{backend name: None if usable on device else the reason}``, for diagnostics."""
    return {name: b.available(device) for name, b in BACKENDS.items()}
