"""Small host-to-device copies that do not wait for the GPU, and the device constants that a
captured CUDA graph must keep alive."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from typing import Callable, Hashable, Iterator, Sequence

import torch

# Each thread's open `keeping_constants` blocks (`.open`, innermost last): per thread, since two
# threads capturing graphs at once must each keep their own constants (a shared list handed one
# thread's constants to the other's graph, and the first graph lost them).
_collectors = threading.local()
# How to empty each cache of device constants (see forget_constants).
_cache_clearers: list[Callable[[], None]] = []


def constant_cache(clear: Callable[[], None]) -> None:
    """Registers ``clear``, which empties a cache of device constants, with :func:`forget_constants`."""
    _cache_clearers.append(clear)


def forget_constants() -> None:
    """Empties every cache of device constants. After a failed CUDA graph capture: a constant
    first made inside it was only recorded into the graph, never copied, and the caches would
    hand out its unfilled memory to every later call (wrong offsets, masks and scalars)."""
    for clear in _cache_clearers:
        clear()


class ConstantCache:
    """Device constants by key, least recently used first: at most ``max_entries`` of them and
    ``max_elements`` elements in all. Bounded in elements too, because where a key changes every
    step (ranks that move, routed experts' gradients) nearly every step adds a constant, held
    outside every state count and after the optimizer is gone. Registered with
    :func:`forget_constants`.

    Shared by every optimizer of the process, and so by threads that step optimizers of their
    own: a lookup raised ``KeyError`` where another thread evicted the entry it had just found,
    and concurrent puts lost updates of the element count, which drifted until the cache
    held one entry, or bounded nothing. Changes are made under a lock (never traced: callers
    bypass the cache under torch.compile)."""

    def __init__(self, max_entries: int, max_elements: int):
        self.max_entries, self.max_elements = max_entries, max_elements
        self._values: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._elements = 0
        self._lock = threading.Lock()
        constant_cache(self.clear)

    def get(self, key: Hashable) -> torch.Tensor | None:
        # No lock on a hit, the step's common case (a lock would double its cost): each
        # OrderedDict call is atomic, and an entry evicted between the two is still a valid
        # constant for this caller.
        value = self._values.get(key)
        if value is not None:
            with contextlib.suppress(KeyError):
                self._values.move_to_end(key)
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> torch.Tensor:
        with self._lock:
            old = self._values.pop(key, None)  # another thread's, made meanwhile: counted once
            if old is not None:
                self._elements -= old.numel()
            self._values[key] = value
            self._elements += value.numel()
            while len(self._values) > 1 and (
                len(self._values) > self.max_entries or self._elements > self.max_elements
            ):
                self._elements -= self._values.popitem(last=False)[1].numel()
            return value

    def values(self):
        with self._lock:
            return list(self._values.values())

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._elements = 0

    def __len__(self) -> int:
        return len(self._values)


@contextlib.contextmanager
def keeping_constants() -> Iterator[list[torch.Tensor]]:
    """Collects every cached device constant (matrix tables, column masks, their pinned
    sources) handed out inside the block. A CUDA graph captured there reads them at each
    replay, so it must hold them after the caches have let them go."""
    kept: list[torch.Tensor] = []
    blocks = _open_blocks()
    blocks.append(kept)
    try:
        yield kept
    finally:
        blocks.pop()


def _open_blocks() -> list[list[torch.Tensor]]:
    """This thread's open :func:`keeping_constants` blocks, innermost last."""
    if not hasattr(_collectors, "open"):
        _collectors.open = []
    return _collectors.open


def handed_out(t: torch.Tensor) -> torch.Tensor:
    """``t``, noted by this thread's innermost open :func:`keeping_constants` block, if any."""
    blocks = getattr(_collectors, "open", None)
    if blocks:
        blocks[-1].append(t)
    return t


def to_device_nowait(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a small CPU tensor) on ``device``. Callers make ``t`` with ``device="cpu"``: a
    factory's default device is the user's (``torch.set_default_device("cuda")``), and a CUDA
    ``t`` cannot be pinned (RuntimeError), nor read on the host right after a non-blocking copy.

    A plain copy from pageable memory waits for every kernel queued before it (a host sync).
    From pinned memory with ``non_blocking`` it is queued like a kernel; torch's pinned-memory
    allocator keeps the staging buffer until the copy has run (and a graph that captured the
    copy keeps it through :func:`handed_out`). Traced by torch.compile, a plain copy: dynamo's
    fake tensors have no ``pin_memory``."""
    if device.type == "cuda" and not torch.compiler.is_compiling():
        t = handed_out(t.pin_memory())
    return handed_out(t.to(device, non_blocking=True))


def update_scalars(lr: float | torch.Tensor, weight_decay: float, beta1: float, device: torch.device) -> torch.Tensor:
    """``[α, 1 − α·λ, β1, 1 − β1]`` as an fp32 ``(4,)`` tensor on ``device``, for the update
    passes, which read them at these offsets (``kernels._tiles.store_step`` and
    ``update_and_average``) from the device so that a captured CUDA graph replays with new
    values (schedulers write α, and OneCycleLR / CyclicLR β1, every step). The derived entries
    are computed in float64 and rounded once, as launch constants would be. Cached: they change
    at most once a step. Keyed by value: a tensor ``lr`` that a scheduler fills in place hashes
    by identity, and would keep its first value."""
    return _update_scalars(float(lr), float(weight_decay), float(beta1), device)


def rounding_keys_tensor(keys: Sequence[int], device: torch.device) -> torch.Tensor:
    """The keys of a bucket's stochastic rounding, one per matrix (``reference.rounding_noise``),
    as an int64 ``(B,)`` tensor on ``device``, which the update kernels read (new ones every step)."""
    return to_device_nowait(torch.tensor(keys, dtype=torch.int64, device="cpu"), device)


@functools.lru_cache(maxsize=64)
def _update_scalars(lr: float, weight_decay: float, beta1: float, device: torch.device) -> torch.Tensor:
    values = torch.tensor([lr, 1.0 - lr * weight_decay, beta1, 1.0 - beta1], dtype=torch.float32, device="cpu")
    return to_device_nowait(values, device)


constant_cache(_update_scalars.cache_clear)
