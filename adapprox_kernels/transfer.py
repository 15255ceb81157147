"""Small host-to-device copies that do not wait for the GPU."""

from __future__ import annotations

import torch


def to_device_nowait(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a small CPU tensor) on ``device``.

    A plain copy from pageable memory waits for every kernel queued before it (a host sync).
    From pinned memory with ``non_blocking`` it is queued like a kernel; torch's pinned-memory
    allocator keeps the staging buffer until the copy has run."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
