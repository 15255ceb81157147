"""Host-side pieces shared by the launchers: the matrix table that lets one launch cover a
batch of separately allocated matrices, argument checks, block sizes and dot precision.

No device is queried at import time; the few queries (SM count, compute capability) happen at
the first launch on a device and are cached.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Sequence

import torch
import triton

from ..transfer import ConstantCache, handed_out, to_device_nowait

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Every launch sets FMA contraction rather than take Triton's default: the kernels were measured
# and tested on GPUs with it, Triton 3.10 turns the default off, and 3.9 warns (once a process,
# at a launch's first compile) where a launch leaves it unset.
FP_FUSION = True

MIN_DOT = 16  # tl.dot needs every dimension >= 16 on GPUs
# The widest rank a product rebuilds V's tiles by one dot (``Blocks.dot_from``): the pipelined
# factor tiles sit in shared memory, and at 128 columns they overflow an H100 block's 227 KiB
# with the default product tiles and 64-column sketch blocks; at 64 columns they fit
# (test_product_kernel_compiles_for_hopper_and_tf32_truncates compiles both for sm_90).
MAX_DOT_RANK = 64


class Blocks(NamedTuple):
    """Launch configuration: upper bounds of the tile sizes (powers of two >= 16; a launch uses
    the smallest power of two that covers the dimension, up to these), ``r`` the widest thin
    block one program of a product holds (wider sketches take several r blocks), and the
    launch's ``num_warps`` / ``num_stages`` (the interpreter ignores those). Tests pass 16s to
    reach the multi-block paths on small shapes; ``bench/tune_blocks.py`` measured the
    defaults below on an H100.

    ``unroll`` (products only): the largest rank whose rebuild of V is unrolled at compile
    time (0: none; each power of two up to it is a kernel of its own). Only then is a
    product's main loop software-pipelined, so that ``num_stages`` matters at all: with the
    rank loop inside it, Triton 3.6 and 3.8 compile the same code for every stage count
    (``bench/kernel_resources.py``). Except at rank 1: the JIT passes an int argument equal to
    1 as a constant, so ``K = 1`` leaves no loop, and the main loop is pipelined (the stage
    count changes the code) whatever ``unroll`` says. Not on by default until a GPU measures it.

    ``dot_from`` (products only): the smallest rank whose rebuild of V is one tensor-core dot
    per tile (``tf32x3``, close to fp32, on GPUs with tf32 unless the products' own dots are
    ``ieee``, else ``ieee``; 0: never), in place of k FMAs per entry; it also leaves no loop
    inside the main loop. Takes precedence over ``unroll``. Ranks above ``MAX_DOT_RANK`` keep
    the loop. Not on by default until a GPU measures it."""

    m: int = 64
    n: int = 64
    r: int = 64
    warps: int = 4
    stages: int = 3
    unroll: int = 0
    dot_from: int = 0

    def options(self) -> dict:
        """The launch's compile options: warps, stages and :data:`FP_FUSION`."""
        return dict(num_warps=self.warps, num_stages=self.stages, enable_fp_fusion=FP_FUSION)

    def tile(self, m: int, n: int) -> tuple[int, int]:
        return pow2_block(m, self.m), pow2_block(n, self.n)

    def fit(self, m: int, n: int, r: int) -> tuple[int, int, int]:
        return pow2_block(m, self.m), pow2_block(n, self.n), pow2_block(r, self.r)

    def rank_unroll(self, k: int) -> int:
        """The products' ``K_UNROLL`` for rank ``k``: 0 (a run-time loop) or a power of two >= k."""
        return triton.next_power_of_2(k) if 0 < k <= self.unroll and not self.rank_dot(k) else 0

    def rank_dot(self, k: int) -> int:
        """The products' ``K_DOT`` for rank ``k``: 0 (no dot) or a power of two >= max(k, 16)."""
        return max(MIN_DOT, triton.next_power_of_2(k)) if 0 < self.dot_from <= k <= MAX_DOT_RANK else 0


# V @ X and Vᵀ @ Y: 128×64 tiles. On the H100 (bench/results/tune_blocks_*.json, GPT-2 groups at
# the default precision) they reached 32-63% of copy bandwidth where 64×64 tiles reached 26-50%.
# The stage count does not change these kernels' code at ranks above 1 (see ``Blocks.unroll``):
# in that sweep the k = 8 pairs of configurations differing only in it (the same code) differ by
# 0.2% in the median, 0.9% at the 90th percentile. At k = 1 (K a constant: no rank loop, the main
# loop pipelined) it does change the code, and the k = 1 pairs differ by 6.9% / 25% (up to 6.6×),
# neither count faster throughout; 2 stages here were not chosen for k = 1.
PRODUCT_BLOCKS = Blocks(m=128, n=64, warps=4, stages=2)
# The first V @ X of a step, which also reduces ‖V‖² and the update's RMS from its tiles: those
# sums hold more registers per row (compiled for sm_90 at 128×64 the kernel spills 552-644 bytes
# per thread, at 64×64 0-40: bench/results/kernel_resources_*), and 64×64 tiles ran it 4-15% faster
# than PRODUCT_BLOCKS on the H100 (bench/results/bench_step_*-153951.json against *-151653.json).
FIRST_PASS_BLOCKS = Blocks(m=64, n=64, warps=4, stages=3)
# The elementwise passes (update, norms, cosine sums; the dense passes take its 4096 elements per
# program, warps and stages: dense_moment.DENSE_BLOCK): 16 rows of 256 columns, 2 stages. The
# update pass reached 94-95% of copy bandwidth at k = 8 on the H100's 345M groups, 86% on the
# 124M embedding (32×128 tiles: 76-78%; the rebuild of V loads each factor entry once per tile
# row or column, so flat tiles load fewer) and 96-100% at k = 1
# (bench/results/tune_blocks_nvidia-h100-80gb-hbm3.json, apply_update rows at 4 warps).
ELEMENTWISE_BLOCKS = Blocks(m=16, n=256, warps=4, stages=2)


def interpreted() -> bool:
    """True when kernels decorated now run under the Triton interpreter: ``TRITON_INTERPRET`` as
    Triton reads it (``1``, ``true``, ``yes``, ``on``)."""
    return bool(triton.knobs.runtime.interpret)


def pow2_block(size: int, cap: int) -> int:
    """Smallest power of two >= ``size``, between ``MIN_DOT`` and ``cap``."""
    return max(MIN_DOT, min(cap, triton.next_power_of_2(max(size, 1))))


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.major


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context a launcher launches its kernels in: ``torch.cuda.device(device)`` where that
    is not the current CUDA device, else nothing. Triton launches on the *current* device and
    its current stream, whatever device its tensor arguments are on: parameters on another GPU
    than the current one (a model spread over GPUs, ``model.to("cuda:1")`` without
    ``torch.cuda.set_device(1)``) were stepped by kernels of the current device, which Triton
    refuses where the GPUs have no peer access ("cannot be accessed from Triton") and which
    otherwise run over the interconnect, unordered with the torch ops of the step on the
    parameters' own device (their stream)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def dot_precision(device: torch.device) -> str:
    """``tl.dot`` input precision of the long thin products ``V @ X`` and ``Vᵀ @ Y``.

    ``tf32x3`` (three tf32 products, close to fp32) on GPUs with tf32; ``ieee`` elsewhere (and
    under the interpreter, which computes in fp32 anyway). Plain tf32 made these passes
    1.5-3.2× faster at k = 1 on the H100, 1.0-1.1× at k = 8
    (bench/results/tune_blocks_nvidia-h100-80gb-hbm3.json, tf32 against the default at 64×64
    tiles), but moves the products by tf32's rounding (~1e-3 relative); in training it raised
    mean ξ 1.65-4.0× and changed 5× and 3.3× as many rank decisions as another sketch seed
    (bench/results/product_precision_{cold,warm}_nvidia-h100-80gb-hbm3.json, ``summary``), so
    it is opt-in only (``precision=`` of the launchers)."""
    if device.type != "cuda" or torch.version.hip is not None:
        return "ieee"
    _, major = _cuda_props(device.index if device.index is not None else torch.cuda.current_device())
    return "tf32x3" if major >= 8 else "ieee"


def target_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device (the interpreter runs one at a time)."""
    if device.type != "cuda":
        return 1
    sms, _ = _cuda_props(device.index if device.index is not None else torch.cuda.current_device())
    return 2 * sms


def reduction_split(programs: int, reduction_blocks: int, device: torch.device, split: int | None) -> int:
    """How many programs share one reduction axis (split-K): enough to fill the device when
    the grid is otherwise small (e.g. ``Vᵀ Y`` of a tall 50257×768 embedding)."""
    if split is None:
        split = triton.cdiv(target_programs(device), max(programs, 1))
    return max(1, min(split, reduction_blocks))


# Offset tables are tiny but built from host data: cache them per (device, pointers) so that a
# training loop whose gradients keep their storage builds each once (a miss costs a queued copy,
# not a host sync).
# A step makes up to 4 tables a dense bucket and 3 a factored one: at 256 entries, a step of more
# than 64 dense buckets (per-layer groups × shapes) built every table anew, every step. At most
# 512 Ki offsets in all (4 MiB on the device, their keys ~5 times as much on the host: a 32-byte
# Python int and an 8-byte tuple slot per 8-byte offset): where the matrices with a gradient
# change every step (routed experts), so do the tables, and 4,096 of a 512-matrix bucket would
# hold 16 MiB of the device and ~80 MiB of the host.
_TABLES = ConstantCache(max_entries=4096, max_elements=1 << 19)


class MatrixTable:
    """``B`` same-shaped ``(m, n)`` matrices, each in its own allocation, as one kernel argument
    pair: ``base`` (the first matrix, whose pointer fixes the dtype) and ``offsets``, an int64
    tensor with matrix ``b`` at element ``base + offsets[b] * align``.

    Offsets are stored in units of ``align`` elements (16 bytes when every matrix is 16-byte
    aligned) so the kernel's address arithmetic proves the alignment and loads vectorize.
    Matrices that are not contiguous (or whose address is not a multiple of the element size)
    are staged in contiguous copies;
    ``writeback()`` copies staged results back after a kernel wrote them. ``flat=True``: tensors
    of any one shape, read as flat arrays of ``numel`` elements (staging leaves every one of them
    contiguous)."""

    def __init__(self, tensors: Sequence[torch.Tensor], name: str, *, flat: bool = False):
        if len(tensors) == 0:
            raise ValueError(f"{name}: need at least one matrix")
        first = tensors[0]
        if first.dim() != 2 and not flat:
            raise ValueError(f"{name}: expected 2-D matrices, got shape {tuple(first.shape)}")
        if first.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: dtype {first.dtype} not supported (use one of {SUPPORTED_DTYPES})")
        for i, t in enumerate(tensors):
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"{name}[{i}] is {tuple(t.shape)} {t.dtype} on {t.device}; "
                    f"{name}[0] is {tuple(first.shape)} {first.dtype} on {first.device}: "
                    "a table needs one shape, dtype, device"
                )
        self.originals = list(tensors)
        layout = first.stride() if first.is_contiguous() else None
        size = first.element_size()
        # An address that is not a multiple of the element size (a tensor over foreign memory:
        # torch.frombuffer or from_blob at an odd byte offset) is staged too: offsets count
        # whole elements from the base, and such a matrix was read and written bytes off.
        self.tensors = [
            t.clone(memory_format=torch.contiguous_format) if t.data_ptr() % size
            else t if layout is not None and t.stride() == layout else t.contiguous()
            for t in tensors
        ]  # fmt: skip
        self.base = self.tensors[0]
        self.shape = tuple(first.shape)
        self.numel = first.numel()
        self.dtype = first.dtype
        self.device = first.device
        self.stride = self.base.stride()
        addrs = [t.data_ptr() for t in self.tensors]
        aligned = all(a % 16 == 0 for a in addrs)
        self.align = 16 // size if aligned else 1
        key = (str(self.device), size * self.align, *addrs)
        table = _TABLES.get(key)
        if table is None:
            offsets = [(a - addrs[0]) // (size * self.align) for a in addrs]
            table = _TABLES.put(
                key, to_device_nowait(torch.tensor(offsets, dtype=torch.int64, device="cpu"), self.device)
            )
        self.offsets = handed_out(table)

    def __len__(self) -> int:
        return len(self.tensors)

    def writeback(self) -> None:
        for orig, staged in zip(self.originals, self.tensors, strict=True):
            if staged is not orig:
                orig.copy_(staged)


# A CUDA grid's second and third axes take at most 65,535 programs each: fewer than the matrices
# one bucket may hold (an MoE's experts). The kernels give the matrix index an axis of its own
# (an index computed from a one-dimensional grid cost registers and time: docs/kernels.md), so
# a larger batch takes several launches, each told its first matrix.
MAX_GRID_AXIS = 65_535


def batch_chunks(batch: int) -> list[tuple[int, int]]:
    """``(first matrix, matrices)`` of each launch over ``batch`` matrices."""
    return [(first, min(MAX_GRID_AXIS, batch - first)) for first in range(0, batch, MAX_GRID_AXIS)]


def step_tables(
    params: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor] | None, grads: MatrixTable, *, flat: bool = False
) -> tuple[MatrixTable, MatrixTable | None]:
    """Writable tables of the weights and momenta an update pass writes (``None``: no momentum),
    each ``len(grads)`` matrices of the gradients' shape on their device (``flat``: see
    :class:`MatrixTable`)."""
    weights = MatrixTable(params, "params", flat=flat)
    moms = MatrixTable(exp_avgs, "exp_avgs", flat=flat) if exp_avgs is not None else None
    for name, other in (("params", weights), ("exp_avgs", moms)):
        if other is not None and (other.shape, len(other), other.device) != (grads.shape, len(grads), grads.device):
            raise ValueError(f"{name}: need {len(grads)} matrices {grads.shape} on {grads.device}")
    return weights, moms


def check_factor(x: torch.Tensor, name: str, batch: int, rows: int, device: torch.device) -> None:
    """``x`` must be an fp32 ``(batch, rows, cols)`` tensor on ``device``."""
    if x.dim() != 3 or x.shape[0] != batch or x.shape[1] != rows:
        raise ValueError(f"{name}: expected shape ({batch}, {rows}, cols), got {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"{name}: expected float32, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the gradients on {device}")


def check_factors(q: torch.Tensor, u: torch.Tensor, batch: int, m: int, n: int, device: torch.device) -> None:
    """``q: (batch, m, K)`` and ``u: (batch, n, K)`` fp32 on ``device``, with one ``K``: a
    kernel reads ``K`` columns of both (a narrower ``u`` would be read past its rows)."""
    check_factor(q, "q", batch, m, device)
    check_factor(u, "u", batch, n, device)
    if q.shape[2] != u.shape[2]:
        raise ValueError(f"q and u need the same number of columns, got {q.shape[2]} and {u.shape[2]}")


def check_new_factors(q_new, u_new, batch: int, m: int, n: int, device: torch.device) -> bool:
    """Checks the optional ``(q_new: (B, m, k), u_new: (B, n, k))``, ``k >= 1``, whose residual
    ``‖V − q_new u_newᵀ‖²`` a pass also reduces; returns whether they were given."""
    if (q_new is None) != (u_new is None):
        raise ValueError("give both q_new and u_new, or neither")
    if q_new is None:
        return False
    check_factor(q_new, "q_new", batch, m, device)
    check_factor(u_new, "u_new", batch, n, device)
    if q_new.shape[2] != u_new.shape[2] or q_new.shape[2] == 0:
        raise ValueError(f"q_new and u_new need the same, nonzero columns, got {q_new.shape[2]} and {u_new.shape[2]}")
    return True


def check_vector(x: torch.Tensor, name: str, batch: int, device: torch.device) -> torch.Tensor:
    """``x`` must be an fp32 ``(batch,)`` tensor on ``device``; returned contiguous, as the
    kernels read it (entry ``b`` at ``x + b``: a strided view such as ``sums[:, 1]`` was read
    past its entries)."""
    if x.shape != (batch,) or x.dtype != torch.float32 or x.device != device:
        raise ValueError(
            f"{name}: expected float32 ({batch},) on {device}, got {x.dtype} {tuple(x.shape)} on {x.device}"
        )
    return x.contiguous()


def check_rounding_keys(keys: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
    """``keys`` must be ``None`` or an int64 ``(batch,)`` tensor on ``device``: one key per
    matrix; returned contiguous (see :func:`check_vector`)."""
    if keys is None:
        return None
    if not torch.is_tensor(keys) or keys.shape != (batch,) or keys.dtype != torch.int64 or keys.device != device:
        got = f"{keys.dtype} {tuple(keys.shape)} on {keys.device}" if torch.is_tensor(keys) else type(keys).__name__
        raise ValueError(f"rounding_keys: expected an int64 ({batch},) tensor on {device}, got {got}")
    return keys.contiguous()


def pointer_arg(t: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``t``, or ``fallback`` when ``t`` holds no elements (the first step's ``K = 0`` factors):
    an empty tensor may have a null data pointer, which the GPU launcher rejects even for an
    argument the kernel never reads."""
    return t if t.numel() > 0 else fallback
