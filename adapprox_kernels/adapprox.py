"""The Adapprox optimizer (Algorithm 3): Adam with a low-rank, adaptive-rank second moment.

Per parameter, by shape (after folding ``(d0, d1, …)`` to ``(d0, d1·…)``):

* **factored** (2-D and folded >2-D parameters): ``V ≈ relu(Q Uᵀ)`` with ``Q: (m, k)``,
  ``U: (n, k)`` recomputed every step by S-RSI on ``V_t = β2·relu(Q Uᵀ) + (1−β2)·G²``; the
  rank ``k`` adapts per matrix. State: ``4·k·(m+n)`` bytes (fp32 factors; ``8·k·(m+n)``, fp64, for
  float64 parameters) plus the first moment when β1 > 0.
* **dense** (1-D parameters, and matrices too small to gain from factoring, i.e.
  ``min(m, n) <= k_max + p`` while ``exact_small_matrices``): an unfactored ``V`` as in
  Adafactor's vector case. The update rule is the same, so the result is what the factored
  path gives at full rank.

Same-shaped factored parameters of a param group are stacked and go through S-RSI in one
batched call. See ``docs/algorithm.md`` for every decision the paper leaves open.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections import defaultdict
from dataclasses import dataclass
from types import EllipsisType
from typing import Any, Callable, Iterable

import torch

from ._stacklevel import _outside_stacklevel
from .backends import backend_names, resolve_backend
from .buckets import BucketMixin
from .cuda_graphs import CallGraphs
from .distributed import RowShards, is_dtensor, local, local_list
from .optim_base import SketchOptimizer, compute_dtype, to_host
from .options import (
    INT_OPTION_MAX,
    POWER_ITERS_MAX,
    as_tuple,
    check_kinds,
    check_shared,
    is_int_in,
    is_real,
    is_sequence,
)
from .options import check as _check
from .rank_policy import RANK_POLICIES, next_rank_step, rank_moment, sigmoid_increment
from .reference import shard_keys, signed_clip_threshold
from .srsi import (
    TRUNCATIONS,
    column_mask,
    ratio_from_sq_norms,
    sketch_width,
    subspace_iteration,
    truncate,
    truncate_columns,
)
from .state_report import StateReport, report_rows
from .transfer import rounding_keys_tensor, update_scalars


def _sync_free_eigh(backend, device: torch.device, width: int, dtype: torch.dtype) -> Callable | None:
    """Rayleigh–Ritz's eigensolver where one needs no host sync (so that the bucket's S-RSI can
    be captured in a CUDA graph): the Triton Jacobi kernel, for CUDA buckets of fp32 factors
    that the Triton backend steps with a sketch of at most its ``MAX_SIZE`` columns, outside
    torch.compile (the kernel is no custom op). None elsewhere: ``torch.linalg.eigh`` in
    float64, also for fp64 factors (float64 parameters), which the kernel's fp32 vectors would
    leave orthonormal only to fp32's rounding (and which are never graphed)."""
    if (
        getattr(backend, "name", None) != "triton" or device.type != "cuda" or dtype != torch.float32
        or torch.compiler.is_compiling()
    ):  # fmt: skip
        return None
    from .kernels.jacobi_eigh import MAX_SIZE, jacobi_eigh

    return functools.partial(jacobi_eigh, descending=True) if width <= MAX_SIZE else None


# The backends whose apply_step takes α, λ and β1 as a device tensor (``scalars``).
_SCALARS = ("reference", "triton")
PRODUCT_PRECISIONS = (None, "tf32x3", "tf32", "ieee", "tf32_range", "tf32_rn")
_SQRT_MAX = {dtype: math.sqrt(torch.finfo(dtype).max) for dtype in (torch.float32, torch.float64)}


# Read from hundreds of tensors and states a step: C getters for map(), not Python loops.
_dtype, _grad = operator.attrgetter("dtype"), operator.attrgetter("grad")
_rank, _exp_avg_sq = operator.itemgetter("rank"), operator.itemgetter("exp_avg_sq")


def _round_rank(k: float) -> int:
    """Round half up (Python's round() would round 2.5 to 2)."""
    return int(math.floor(k + 0.5))


def _round_ranks(states: list[dict[str, Any]], cap: int) -> list[int]:
    """``min(round(k), cap)`` of each state's rank; a bucket's matrices mostly share one
    rank, so each distinct rank is rounded once."""
    ranks = list(map(_rank, states))
    rounded = {k: min(_round_rank(k), cap) for k in set(ranks)}
    return list(map(rounded.__getitem__, ranks))


def matrix_shape(p: torch.Tensor) -> tuple[int, int] | None:
    """How a parameter is seen: ``(m, n)`` for ≥2-D (folded), ``None`` for vectors/scalars."""
    if p.dim() < 2:
        return None
    return p.shape[0], math.prod(p.shape[1:])  # not numel() // m: a (0, 5) weight has m = 0


# A column of last step's U whose norm is at most this fraction of the largest one's is rounding
# noise (V is exactly of lower rank than the factors: U = Vᵀ Q is then of the order of fp32's
# unit roundoff, 2⁻²⁴ ≈ 6e-8, of it).
_NOISE_COLUMN = 2.0**-20


def _sketch_oversample(group: dict[str, Any]) -> int:
    """The sketch's extra columns: ``oversample``, but at least one with ``warm_start``. A warm
    sketch is last step's ``U`` and its extra columns are its only Gaussian ones: with none, a
    rank that grows gets its new columns straight from the Gaussian with the warm start's
    single iteration, measured and kept as they are (ξ far above the optimum on those steps,
    and a rank pushed up by them). One extra column lets the rank grow from a column that had
    an iteration the step before, as with ``oversample >= 1`` (ξ within 1.2× of the optimum:
    ``test_warm_start_without_oversampling_grows_the_rank_from_iterated_columns``); at most one
    more column, no more passes over G."""
    p = group["oversample"]
    return max(p, 1) if group["warm_start"] else p


def _warm_sketch(u_prev: torch.Tensor, gaussian: torch.Tensor, prev_mask: torch.Tensor) -> torch.Tensor:
    """Warm-start sketch ``(B, n, r)``: where ``prev_mask`` (``(B, 1, r)``, see
    :func:`~adapprox_kernels.srsi.column_mask`) holds and last step's ``U`` (V's dominant row
    space) has a column above rounding noise (:data:`_NOISE_COLUMN` of its largest), that
    column, elsewhere the Gaussian columns. An all-zero column carries no direction (after an
    all-zero V, e.g. LoRA A's gradient while B is 0, U = 0): as a start it would leave Q's
    leading columns an arbitrary basis, kept as the factors (a large ξ where a cold start's is
    at rounding level: ``test_a_leading_all_zero_gradient_step_changes_nothing``). A column of
    rounding noise (V of exactly lower rank than the factors: a rank-1 gradient, sparse
    embedding rows) carries none either: its direction is whatever the backend's rounding
    made, so the reference and the Triton kernels took different sketches, their ξ differed
    and the ranks parted (``test_warm_start_on_an_exactly_low_rank_second_moment_matches_reference``)."""
    width = gaussian.shape[-1]
    u = torch.nn.functional.pad(u_prev, (0, max(width - u_prev.shape[-1], 0)))[..., :width]
    norms = torch.linalg.vector_norm(u, dim=-2, keepdim=True).where(prev_mask, 0.0)  # of the kept columns
    real = norms > _NOISE_COLUMN * norms.amax(dim=-1, keepdim=True)
    return torch.where(real, u.to(gaussian.dtype), gaussian)


def _stack_padded(factors: list[torch.Tensor], width: int) -> torch.Tensor:
    """``(B, d, width)`` from ``B`` factors ``(d, k_b)`` zero-padded to ``width`` columns."""
    if all(f.shape[1] == width for f in factors):
        return torch.stack(factors)
    pad = torch.nn.functional.pad
    return torch.stack([pad(f, (0, width - f.shape[1])) for f in factors])


def _is_each(tensors: list[torch.Tensor], others: tuple[torch.Tensor, ...]) -> bool:
    """Are these the very tensor objects ``others``, in order?"""
    return len(tensors) == len(others) and all(map(operator.is_, tensors, others))


def _narrowed(q: torch.Tensor, u: torch.Tensor, k: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Every matrix's first ``k`` columns of ``q: (B, m, r)`` and ``u: (B, n, r)``, as the
    matrices of one new tensor each (which next step's S-RSI takes as its stacks). A copy
    even when ``k = r``: ``q`` may view a larger buffer, or a graph's output that its next
    replay overwrites."""
    fmt = torch.contiguous_format
    return q[:, :, :k].clone(memory_format=fmt).unbind(0), u[:, :, :k].clone(memory_format=fmt).unbind(0)


def _addresses(tensors: list[torch.Tensor]) -> tuple:
    """Where a captured call reads or writes each tensor, as which dtype and with which
    strides: part of its graph key. Hundreds of tensors a step: ``map``, not a Python loop."""
    return (
        tuple(map(torch.Tensor.data_ptr, tensors)),
        tuple(map(_dtype, tensors)),
        tuple(map(torch.Tensor.stride, tensors)),
    )


def _deferred_orthonormalize(backend, failures: list[torch.Tensor]):
    """The backend's orthonormalizer without a host sync per call where it offers one: each
    call's ``(B,)`` failure flags go to ``failures``, checked once per step (``_end_step``)."""
    unchecked = getattr(backend, "orthonormalize_unchecked", None)
    if unchecked is None:
        return backend.orthonormalize

    def orthonormalize(y: torch.Tensor) -> torch.Tensor:
        q, failed = unchecked(y)
        if failed is not None:
            failures.append(failed)
        return q

    return orthonormalize


@dataclass
class _Pending:
    """A bucket's (``params``) S-RSI result waiting for the step's host sync: full-width
    ``q: (B, m, r)``, ``u: (B, n, r)``, the rank bound ``cap``, the ranks ``used`` for ξ,
    ``due``: whether matrix ``b``'s rank is decided this step (always under the step policy),
    ``xi()``: ``(B,)`` ξ where any is due, else 0, NaN where the new factors are not finite (a
    call, since a deferred update has not run yet when this is made), the orthonormalizer's
    failure flags ``(B,)`` (None if it cannot fail) and ``redo``, which recomputes
    ``(q, u, xi)`` with the checked one. ``narrowed``: ``(k, Q's, U's)``, every matrix's first
    k columns, copied before the sync for the k that holds unless the rank decision moves it
    (None where the matrices' ranks differ). ``fetched``: ``(ξ, flags)`` on the host, once read
    (see :meth:`Adapprox._launch_gated`)."""

    group: dict[str, Any]
    params: list[torch.Tensor]
    states: list[dict[str, Any]]
    shards: RowShards | None
    cap: int
    q: torch.Tensor
    u: torch.Tensor
    used: list[int]
    due: list[bool]
    xi: Callable[[], torch.Tensor | None]
    failed: torch.Tensor | None
    redo: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    narrowed: tuple[int, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None
    fetched: tuple[list[float] | None, list[float] | None] | None = None


@dataclass
class _Started:
    """A bucket after S-RSI (or a dense bucket after its sums pass), before its update.
    ``sums()`` ``(B, 2)``: ``[‖V‖², Σ (G/(√V+ε))²]`` per matrix from the first pass when the
    backend reduces them there (else None); the second is NaN exactly where a gradient holds
    NaN or inf, or entries whose squares overflow V. A call, since a graphed pass is deferred
    (see ``cuda_graphs.py``): the first read runs every queued pass. ``prepare(gate)`` queues a graphed update (the host
    prepares it while the GPU runs S-RSI: ``_run_ahead`` calls it before the non-finite check's
    sync, and a failed check discards it); ``finish(gate)`` applies or queues the update, if
    ``prepare`` has not, and queues the rank decisions; ``done`` once it has. ``gate``: None
    once the check has passed, else a device bool, true iff every gradient of the step is
    finite, that the update reads before it writes anything (:func:`_gated_sums`)."""

    states: list[dict[str, Any]]
    sums: Callable[[], torch.Tensor | None]
    finish: Callable[[torch.Tensor | None], None]
    prepare: Callable[[torch.Tensor | None], None] = lambda gate: None
    done: bool = False


def _finite_marks(u: torch.Tensor) -> torch.Tensor:
    """``(B,)``: 0 where ``u[b]`` is finite, NaN where not (or where its sum overflows, which
    only an overflowed V gives): ξ's stand-in on a step that does not measure it."""
    return u.sum(dim=(1, 2)) * 0


def _first_moments(bucket: list[torch.Tensor], states: list[dict[str, Any]], beta1: float) -> list[torch.Tensor] | None:
    """The parameters' first moments M (None while β1 = 0). β1 may change between steps: where
    it has become > 0, M starts from zeros, as M_0 does; while it is 0 an existing M is kept,
    unused, so that switching back resumes it."""
    if beta1 == 0:
        return None
    try:
        return [state["exp_avg"] for state in states]
    except KeyError:  # new state, or β1 has just become > 0
        for p, state in zip(bucket, states, strict=True):
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [state["exp_avg"] for state in states]


def _gated_sums(sums: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """A bucket's first-pass sums ``(B, 2)`` as its update reads them: all NaN unless ``gate``,
    so that every clip divisor is NaN and the update passes write nothing (see
    ``kernels._tiles.gated``); the sums themselves without a gate."""
    return sums if gate is None else torch.where(gate, sums, float("nan"))


def _step_gates(values: list[torch.Tensor]) -> dict[torch.device, torch.Tensor]:
    """The update gate on each device of ``values`` (the run-ahead sums, NaN marking a bad
    gradient): a device bool, true iff no value on any device is NaN, so that a bad gradient
    on one GPU stops the updates on all of them. One launch pair on one device, the usual
    case; parameters on several GPUs (one optimizer over a model spread across them) add a
    device-to-device copy of each flag, no host sync."""
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for v in values:
        by_device[v.device].append(v)
    oks = [torch.isnan(torch.cat(vs)).any().logical_not() for vs in by_device.values()]
    if len(oks) > 1:
        ok = torch.stack([o.to(oks[0].device, non_blocking=True) for o in oks]).all()
        oks = [ok.to(device, non_blocking=True) for device in by_device]
    return dict(zip(by_device, oks, strict=True))


def _key_and_gate_inputs(keys: list[int] | None, gate: torch.Tensor | None, device: torch.device) -> tuple:
    """A graphed update's inputs after the scalars: this step's stochastic-rounding keys (one
    per matrix) as a device tensor (a graph replays it with each step's keys), then the device
    gate, each only where there is one (whether there is is part of the graph's key)."""
    return (*(() if keys is None else (rounding_keys_tensor(keys, device),)), *(() if gate is None else (gate,)))


def _key_and_gate(rest: tuple, has_key: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(keys, gate)`` from the inputs :func:`_key_and_gate_inputs` made, None where absent."""
    keys = rest[0] if has_key else None
    gates = rest[1:] if has_key else rest
    return keys, gates[0] if gates else None


class Adapprox(BucketMixin, SketchOptimizer):
    """Adam whose second moment is a low-rank factorization of adaptive rank.

    Args:
        params: parameters or param groups (``named_parameters()`` is accepted too); a group may
            set any option below, and its values are checked as the constructor's are.
        lr: learning rate α: a number, or a one-element floating tensor (filled in place by a scheduler).
        betas: ``(β1, β2, β3)``: momentum of updates (0 keeps no first moment), second-moment
            decay, rank-moment decay.
        eps: ε added to ``√V`` (at least float32's smallest normal, ~1.2e-38: V has exact zeros where
            G does and relu clamps).
        clip_threshold: d, the update-RMS clipping threshold (``None``: no clipping).
        weight_decay: λ, decoupled: ``W ← W − α(M + λW)``.
        maximize: step up the gradient, as torch.optim's ``maximize``: the same bits as the step
            on ``−G`` (the update's clip divisor carries the sign: no extra pass over G).
        bf16_stochastic_round: write bfloat16 weights rounded at random (unbiased), not to
            nearest, which drops an update below half a bf16 ulp for good: for training with
            bf16 weights and no fp32 copy. The random bits come from a counter-based hash of
            the seed, the parameter, its step count and the element's index, the same on every
            backend, data-parallel rank and after a resume; other dtypes are rounded to nearest.
        truncation: how the rank-k factors are taken from the ``k + p`` sketch columns:
            ``"qr"`` (the first k QR columns, the paper's Algorithm 1; the ``p`` extra columns
            then only feed rank growth) or ``"rayleigh_ritz"`` (the best rank-k part of the
            sketch, from an eigen-decomposition of the small ``Uᵀ U``: the extra columns improve
            the factors, so fewer ``power_iters`` reach the same ξ; see docs/algorithm.md). With
            ``"rayleigh_ritz"`` each CUDA bucket syncs once more per step (``torch.linalg.eigh``)
            and is not replayed from CUDA graphs, except with the Triton backend, fp32 factors
            (not float64 parameters) and a sketch of at most 64 columns (this step's rank plus
            the oversampling columns: a rank that starts at ``k_max = 256`` gets there as it
            falls): there a Jacobi kernel with a fixed number of sweeps takes the eigenvectors,
            with no sync.
        k_init: initial rank k0 (default: ``k_max`` for ``"step"``, ``k_min`` for ``"sigmoid"``).
        k_max, k_min: bounds of the rank (also capped at ``min(m, n)``).
        oversample: p, extra sketch columns. power_iters: l, subspace iterations (at most 1000,
            as ``warm_power_iters``; every int option at most 2³¹ − 1).
        xi_thresh: ξ threshold of the rank rules.
        rank_policy: ``"step"`` (ICLR, every step, with the rank moment) or ``"sigmoid"`` (arXiv,
            growth only, checked every ``rank_interval`` (default 10) steps with ``sigmoid``'s
            ``(η, ω, τ, φ)``).
        cosine_guidance: scale the momentum part of each step (not the weight decay) by the cosine
            similarity of the update and the momentum (only with β1 > 0), bounded by ``cosine_max_scale``.
        exact_small_matrices: keep a dense (exact) second moment for matrices with
            ``min(m, n) <= k_max + oversample``. Wider matrices are factored even where their
            factors at ``k_init`` outsize V (``k_init·(m+n) > m·n``) until the rank adapts down;
            a ``k_init`` of at most half the width avoids that (docs/algorithm.md).
        nonfinite: ``"raise"`` (default: a ``FloatingPointError`` naming the parameter, before
            anything is modified) or ``"skip"`` (that parameter's step is skipped, its state left
            untouched, and ``state["nonfinite_skips"]`` counts it).
        backend: ``"auto"``, ``"reference"`` or any registered backend.
        seed: seed of the optimizer's own sketch RNG (default: drawn from torch's global RNG,
            which that draw moves on; under torch.distributed, rank 0's draw, broadcast to all
            ranks, at the first step if the process group came later). Under DDP or FSDP2
            every rank must have the same seed (FSDP2's are checked; see docs/distributed.md).
        warm_start: start S-RSI from last step's ``U`` (its columns, topped up with Gaussian
            ones, at least one whatever ``oversample``: the columns a growing rank takes) instead
            of a fresh Gaussian sketch, with ``warm_power_iters`` iterations (``power_iters`` on
            a step whose rank grew past last step's sketch, e.g. the sigmoid policy's growth):
            V moves slowly (β2 = 0.999), so fewer passes reach the same ξ. Off by default
            (the paper's algorithm).
        cuda_graphs: replay a factored bucket's step (S-RSI and update) and a dense bucket's
            passes from CUDA graphs (each bucket's S-RSI in a graph of its own, every update
            in one), once they have come up twice with the same ranks, hyperparameters (the
            learning rate and weight decay may change) and tensor addresses; the results are
            the same bits as without. Needs CUDA and the Triton backend (elsewhere the steps
            run eagerly, as without it, so one configuration serves a CPU test run); see
            ``docs/kernels.md``.
        product_precision: tensor-core precision of the Triton backend's ``V @ X`` / ``Vᵀ @ Y``
            products (S-RSI only; the update and ξ stay fp32): None (the device default,
            ``"tf32x3"``, about fp32, on GPUs with tf32), ``"tf32"`` (faster, ~1e-3 relative
            error per product, which puts a floor under ξ), ``"tf32_range"`` (tf32 in the
            products that only choose the subspace, the default in the last ``U = Vᵀ Q``),
            ``"tf32_rn"`` (tf32 with the operands rounded to nearest in the kernel: unbiased)
            or ``"ieee"``; see ``docs/kernels.md``. Other backends ignore it.

    ``load_state_dict`` keeps this optimizer's ``backend`` and ``cuda_graphs`` (how to run,
    not what to compute), the first moment in the parameter's dtype and the rest in fp32
    (fp64 for an fp64 parameter), whatever the checkpoint had.
    """

    _RUN_OPTIONS = ("backend", "cuda_graphs")
    # Host work on a bucket's ranks and its sketch draw (a graph break of its own: the sketch
    # RNG is a torch.Generator), which, traced, recompiled as the ranks (floats) moved.
    # _compact_factors: traced, a factor's ``_base`` (a fake view's) was read as a tensor and
    # was None at run time (AttributeError once a parameter with factors sat out a step).
    # _discard_run_ahead: restores the sketch RNG, setting attributes of the optimizer (see
    # SketchOptimizer._share_seed).
    _EAGER_UNDER_COMPILE = (
        *SketchOptimizer._EAGER_UNDER_COMPILE,
        "_draw_sketch",
        "_used_ranks",
        "_warn_overflowed",
        "_compact_factors",
        "_discard_run_ahead",
    )

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9),
        eps: float = 1e-8,
        clip_threshold: float | None = 1.0,
        weight_decay: float = 0.1,
        k_init: int | None = None,
        k_max: int = 256,
        k_min: int = 1,
        oversample: int = 5,
        power_iters: int = 5,
        xi_thresh: float = 1e-3,
        rank_policy: str = "step",
        rank_interval: int = 10,
        sigmoid: tuple[float, float, float, float] = (8.0, 10.0, 0.5, 0.0),
        cosine_guidance: bool = False,
        cosine_max_scale: float = 2.0,
        exact_small_matrices: bool = True,
        nonfinite: str = "raise",
        backend: str = "auto",
        seed: int | None = None,
        warm_start: bool = False,
        warm_power_iters: int = 1,
        cuda_graphs: bool = False,
        product_precision: str | None = None,
        maximize: bool = False,
        bf16_stochastic_round: bool = False,
        truncation: str = "qr",
    ):
        defaults = dict(
            lr=lr, betas=as_tuple(betas), eps=eps, clip_threshold=clip_threshold, weight_decay=weight_decay,
            k_init=k_init, k_max=k_max, k_min=k_min, oversample=oversample, power_iters=power_iters,
            xi_thresh=xi_thresh, rank_policy=rank_policy, rank_interval=rank_interval, sigmoid=as_tuple(sigmoid),
            cosine_guidance=cosine_guidance, cosine_max_scale=cosine_max_scale,
            exact_small_matrices=exact_small_matrices, nonfinite=nonfinite, backend=backend,
            warm_start=warm_start, warm_power_iters=warm_power_iters, cuda_graphs=cuda_graphs,
            product_precision=product_precision, maximize=maximize, bf16_stochastic_round=bf16_stochastic_round,
            truncation=truncation,
        )  # fmt: skip
        super().__init__(params, defaults, seed)  # checks every group's values: _check_hyperparameters
        self._reset_step_caches()

    def _check_params(self, params: list[torch.Tensor]) -> None:
        """Refuses DTensor parameters laid out in a way the sharded step cannot serve
        (:meth:`RowShards.of`: HSDP's 2-D mesh, ``Shard(1)``) before any state exists (the
        constructor's groups arrive through ``add_param_group`` too)."""
        for p in params:
            RowShards.of(p)

    @staticmethod
    def _check_hyperparameters(h: dict[str, Any]) -> None:
        check_shared(h, betas=3)  # clip_threshold too
        # Used in float32: a scale that rounds to inf multiplies the update by it.
        scale, f32 = h["cosine_max_scale"], torch.finfo(torch.float32)
        _check(
            is_real(scale) and 1.0 <= scale <= f32.max,
            f"Invalid cosine_max_scale: {scale!r} (need a value in [1, {f32.max:.3g}], float32's largest)",
        )
        k_min, k_max, k_init = h["k_min"], h["k_max"], h["k_init"]
        _check(is_int_in(k_min, 1), f"Invalid k_min: {k_min!r} (need an int in [1, {INT_OPTION_MAX}])")
        _check(
            is_int_in(k_max, k_min),
            f"Invalid k_max: {k_max!r} (need an int in [k_min, {INT_OPTION_MAX}] = [{k_min}, {INT_OPTION_MAX}])",
        )
        _check(
            k_init is None or is_int_in(k_init, k_min, k_max),
            f"Invalid k_init: {k_init!r} (need None or an int in [k_min, k_max] = [{k_min}, {k_max}])",
        )
        sigmoid = h["sigmoid"]
        _check(
            is_sequence(sigmoid, 4) and all(map(is_real, sigmoid)) and sigmoid[0] >= 0 and sigmoid[1] > 0,
            f"Invalid sigmoid (eta, omega, tau, phi): {sigmoid!r} (need four finite numbers, eta >= 0, omega > 0)",
        )
        check_kinds(
            h,
            ints={
                "oversample": 0, "power_iters": (1, POWER_ITERS_MAX), "warm_power_iters": (1, POWER_ITERS_MAX),
                "rank_interval": 1,
            },
            reals=("weight_decay", "xi_thresh"),
            flags=(
                "cosine_guidance", "exact_small_matrices", "warm_start", "cuda_graphs", "maximize",
                "bf16_stochastic_round",
            ),
            choices={
                "rank_policy": RANK_POLICIES, "backend": backend_names(), "product_precision": PRODUCT_PRECISIONS,
                "truncation": TRUNCATIONS,
            },
        )  # fmt: skip

    def _reset_step_caches(self) -> None:
        super()._reset_step_caches()  # keep_eager; the remembered buckets and self._marks (buckets.py)
        self._pending: list[_Pending] = []  # buckets of the current step awaiting _end_step
        # Captured bucket steps (cuda_graphs=True): a factored bucket's S-RSI and update, a dense
        # bucket's sums and update pass, batched per step (see cuda_graphs.py); 64 calls in all.
        self._graphs = CallGraphs(capacity=64)
        self._baked: dict[int, tuple] = {}  # id(group) -> _baked_hyperparameters, this step
        # What undoes the buckets that ran ahead (see _run_ahead): (rng, new states, new moments,
        # states stepped).
        self._marks["ahead_undo"] = None
        self._marks["updates_launched"] = False  # the gated updates of the step (see _launch_gated)
        # id(a bucket's states) -> (Q's, U's) that the last rank decision made as the matrices
        # of one tensor each (see _decide_ranks, _factored_srsi); rebuilt every step.
        self._factor_stacks: dict[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
        # Buckets whose S-RSI ran before the non-finite check (see _run_ahead).
        self._ahead: dict[tuple, _Started] = {}
        # (id(group), bucket key) -> the sketch _run_ahead drew for a factored bucket that does
        # not run ahead, so that every backend draws the buckets' sketches in the same order.
        self._sketches: dict[tuple, torch.Tensor] = {}
        self._ahead_buckets: dict[int, dict[tuple, tuple]] = {}  # id(group) -> _buckets(...)[0]

    # ---------------------------------------------------------------------------------- state
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if state:
            return state
        try:
            beta1 = group["betas"][0]
            shape = matrix_shape(p)
            factor_dtype = compute_dtype(p)
            state["step"] = 0
            state["nonfinite_skips"] = 0
            if shape is not None and not self._is_dense_matrix(shape, group):
                m, n = shape
                cap = min(group["k_max"], m, n)
                k0 = (
                    group["k_init"]
                    if group["k_init"] is not None
                    else (group["k_max"] if group["rank_policy"] == "step" else group["k_min"])
                )
                state["rank"] = float(min(k0, cap))
                state["xi"] = float("nan")  # not measured yet
                # Q0 = U0 = 0: the first V is (1 − β2)·G².
                state["Q"] = torch.zeros(m, 0, dtype=factor_dtype, device=p.device)
                state["U"] = torch.zeros(n, 0, dtype=factor_dtype, device=p.device)
                shards = RowShards.of(p)
                if shards is not None:  # DTensor (FSDP2): Q by rows like p, U replicated
                    q_rows = torch.zeros(local(p).shape[0], 0, dtype=factor_dtype, device=state["U"].device)
                    state["Q"], state["U"] = shards.rows_of(q_rows), shards.replicated(state["U"])
            else:
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=factor_dtype)
            _first_moments([p], [state], beta1)
            return state
        except BaseException:
            # Out of memory (or Ctrl-C) halfway: a half-made state would fail every later step
            # and every load of a checkpoint saved now; an empty one is made anew.
            state.clear()
            raise

    def _state_dtype(self, p: torch.Tensor, key: str, value: torch.Tensor) -> torch.dtype:
        return p.dtype if key == "exp_avg" else super()._state_dtype(p, key, value)

    def _gradient_limit(self, p: torch.Tensor) -> float:
        """``√max`` of the compute dtype (≈ 1.8e19 in fp32): a larger entry's square overflows
        ``V_t``, which for a dense V stays inf for good and freezes that weight (as AdamW's
        does), so the non-finite policy takes such a gradient: raised before anything changes,
        or skipped. (Smaller ones can still overflow S-RSI's products: see docs/algorithm.md.)"""
        return _SQRT_MAX[compute_dtype(p)]

    def _saved_shapes(self, p: torch.Tensor, state: dict[str, Any]) -> dict[str, tuple[int, ...] | EllipsisType | None]:
        shape = matrix_shape(p)
        if "Q" in state and shape is not None:  # factored, at the saved rank k
            # The width of a saved factor that is a matrix (a 0-d one has no last dimension):
            # Q's, else U's, so that a bad Q does not also fail a fitting U.
            k = next((t.shape[-1] for t in (state["Q"], state.get("U")) if torch.is_tensor(t) and t.dim()), None)
            need = {"step": None, "rank": None, "Q": (shape[0], k), "U": (shape[1], k)}
        else:
            need = {"step": None, "exp_avg_sq": tuple(p.shape)}
        if "exp_avg" in state:  # none while β1 = 0
            need["exp_avg"] = tuple(p.shape)
        return need

    def _saved_mismatches(self, p: torch.Tensor, state: dict[str, Any]) -> list[str]:
        """A saved rank that is a finite number >= 1 (the rank policy reads it as one)."""
        rank = state.get("rank")
        if not torch.is_tensor(rank) and "rank" in state and not (is_real(rank) and rank >= 1):
            return [f"'rank' is {rank!r}, not a finite number >= 1"]
        return []

    def _baked_hyperparameters(self, group: dict[str, Any]) -> tuple:
        """The group's hyperparameters that a captured step holds as constants, hashable: part
        of the graph key. All but α, λ and β1, which the update reads from the device
        (``transfer.update_scalars``); of β1 only whether it is 0 (no momentum at all) counts.
        Computed once a step per group (``_run_ahead`` empties the cache)."""
        baked = self._baked.get(id(group))
        if baked is None:
            values = {k: tuple(group[k]) if isinstance(group[k], list) else group[k] for k in self.defaults}
            values["betas"] = (values["betas"][0] > 0, *values["betas"][1:])
            baked = self._baked[id(group)] = tuple(
                (k, values[k]) for k in sorted(values) if k not in ("lr", "weight_decay")
            )
        return baked

    @staticmethod
    def _graphable(group: dict[str, Any], backend, q_prev: torch.Tensor, shards: RowShards | None) -> bool:
        """May this bucket's step run as a CUDA graph? Whole (unsharded) matrices with fp32 state on the
        current CUDA device with the Triton kernels, outside torch.compile. A capture records
        the current device's stream: the work of a bucket on another GPU would run eagerly
        while it is captured, leaving a graph that replays nothing (or, where it allocated, a
        failed capture after which the step ran again)."""
        return (
            group["cuda_graphs"] and q_prev.is_cuda and shards is None and q_prev.dtype == torch.float32
            and getattr(backend, "name", None) == "triton" and not torch.compiler.is_compiling()
            and q_prev.device.index == torch.cuda.current_device()
        )  # fmt: skip

    @staticmethod
    def _is_dense_matrix(shape: tuple[int, int], group: dict[str, Any]) -> bool:
        return group["exact_small_matrices"] and min(shape) <= group["k_max"] + group["oversample"]

    # ----------------------------------------------------------------------------------- step
    def _run_ahead(
        self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]
    ) -> list[tuple[list[torch.Tensor], torch.Tensor | list[float]]]:
        """S-RSI of the factored buckets whose first product also reduces the update's RMS
        (Triton kernels, whole matrices of fp32 factors, i.e. not of float64 parameters), and the sums
        pass of the dense buckets on the kernels, before the non-finite check: that sum is NaN exactly
        where a gradient holds NaN or inf (or entries whose squares overflow V), so the check needs
        no pass over G of its own; +inf is a finite gradient's sum overflowing (V underflowed to 0
        with a tiny ε), which the clip divisor's cap handles as the reference does. The updates wait for
        the check, or, where every bucket ran ahead, are launched behind a device gate
        (:meth:`_launch_gated`); what runs ahead changes nothing a user sees but the sketch
        RNG, the step counts and new state, which :meth:`_discard_run_ahead` restores."""
        self._ahead.clear()
        self._ahead_buckets.clear()
        self._baked.clear()
        self._pending.clear()  # left by a step that raised, if any
        self._graphs.discard_queued()
        self._sketches.clear()
        self._marks["ahead_undo"], self._marks["updates_launched"] = None, False
        plan, new = self._plan(groups)
        # Sketches are drawn in bucket order whatever runs ahead: a factored bucket that waits
        # for _step_group but comes before one that runs ahead draws its sketch here.
        last = max((i for i, (*_, key, _, _, _, ahead) in enumerate(plan) if ahead and key[0]), default=-1)
        rng = self._rng_state() if last >= 0 else None  # the sketch RNG before the first draw
        known = []
        moments = []  # states without a first moment that running ahead gives one (β1 turned on)
        stepped = []  # states whose step count running ahead advanced
        # Set before any work, so that an error midway (out of memory, Ctrl-C) undoes it too.
        self._marks["ahead_undo"] = (rng, new, moments, stepped)
        for i, (group, key, bucket, states, backend, ahead) in enumerate(plan):
            factored = key[0]
            if not ahead:
                if factored and i < last:
                    self._sketches[(id(group), key)] = self._draw_sketch(group, bucket, states)
                continue
            if group["betas"][0] > 0:
                moments += [s for s in states if "exp_avg" not in s]
            stepped += states
            for s in states:
                s["step"] += 1
            start = self._factored_srsi if factored else self._dense_start
            started = self._ahead[(id(group), key)] = start(group, bucket, states, backend)
            known.append((bucket, started))
            if factored:  # the GPU starts on it (and the queued dense sums) while the host
                self._graphs.flush()  # prepares the next: one graph each, for the overlap
        # The first read runs what is still queued (dense sums after the last factored bucket).
        known = [(bucket, started.sums()[:, 1], started) for bucket, started in known]
        if known and sum(len(b) for b, _, _ in known) == sum(len(ps) for _, ps in groups):
            return self._launch_gated(known)
        for _, _, started in known:  # while the GPU runs them
            started.prepare(None)
        return [(bucket, sums) for bucket, sums, _ in known]

    def _plan(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> tuple[list[tuple], list[torch.Tensor]]:
        """The step's buckets in order, ``(group, key, bucket, states, backend, runs ahead?)``,
        and the parameters whose state was made (see :meth:`~adapprox_kernels.buckets.BucketMixin._buckets`)."""
        new, plan = [], []
        backends = {}  # (name, device) -> backend: resolved once a step, not per bucket
        try:
            for group, params in groups:
                buckets, made = self._buckets(params, group)
                self._ahead_buckets[id(group)] = buckets
                new += made
                for key, (bucket, states) in buckets.items():
                    factored, _, dtype, device, _ = key
                    backend = backends.get((group["backend"], device))
                    if backend is None:
                        backend = backends[group["backend"], device] = resolve_backend(group["backend"], device)
                    ahead = not is_dtensor(bucket[0]) and (  # sharded buckets all-reduce their flags: the plain check
                        dtype != torch.float64 and getattr(backend, "name", None) == "triton"
                        if factored else self._dense_on_kernels(group, bucket, backend)
                    )  # fmt: skip
                    plan.append((group, key, bucket, states, backend, ahead))
        except BaseException:
            # A later group's state that no longer fits, or a backend that cannot run here: the
            # step raises before any work, so the states made for the earlier groups go too.
            for p in new:
                del self.state[p]
            self._marks["stale_scan_due"] = True  # the buckets remembered this step hold them
            self._ahead_buckets.clear()
            raise
        return plan, new

    def _launch_gated(
        self, known: list[tuple[list[torch.Tensor], torch.Tensor, _Started]]
    ) -> list[tuple[list[torch.Tensor], list[float]]]:
        """Every parameter's S-RSI or sums pass ran ahead, so the step needs one host sync, not
        two: the updates are launched before the non-finite check is read, behind a device gate
        (nothing is written unless every gradient of the step is finite), and the check, every
        ξ and the orthonormalizer's flags come back together. A failed check then finds nothing
        modified, and :meth:`_discard_run_ahead` undoes the rest."""
        values = [sums for _, sums, _ in known]
        gates = _step_gates(values)  # NaN marks a bad gradient (_run_ahead)
        # From here the device writes the updates unless the gate holds them: an error before
        # the check is read can no longer undo the step (see _run_ahead_failed).
        self._marks["updates_launched"] = True
        for _, sums, started in known:
            started.finish(gates[sums.device])
            started.done = True
        self._graphs.flush()  # the updates
        self._narrow_ahead()
        riders = [t for rec in self._pending for t in (rec.xi(), rec.failed)]
        host = to_host(values + riders)
        rest = iter(host[len(values) :])
        for rec in self._pending:
            rec.fetched = (next(rest), next(rest))
        return [(bucket, checks) for (bucket, _, _), checks in zip(known, host[: len(values)], strict=True)]

    def _discard_run_ahead(self) -> None:
        rng, new, moments, stepped = self._marks["ahead_undo"]
        self._marks["ahead_undo"] = None
        for s in moments:  # a first moment made for a step that does not happen (skipped or raised)
            s.pop("exp_avg", None)
        self._graphs.discard_queued()  # the prepared updates
        self._pending.clear()  # the gated ones' (see _launch_gated), which wrote nothing
        for s in stepped:
            s["step"] -= 1
        for p in new:
            del self.state[p]
        self._marks["stale_scan_due"] = True  # the states just deleted are in the buckets remembered this step
        self._ahead.clear()
        self._ahead_buckets.clear()
        self._sketches.clear()
        if rng is not None:
            self._restore_rng(rng)

    def _run_ahead_failed(self) -> None:
        """An error (out of memory, Ctrl-C at the check's sync) before the check was read: the
        step did not happen, unless the gated updates were launched, which the device may
        already have written (the run then stays as the error left it)."""
        if self._marks["ahead_undo"] is not None and not self._marks["updates_launched"]:
            self._discard_run_ahead()

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        # The buckets _run_ahead formed hold these very parameters unless it was discarded.
        # id() first: torch 2.8's dynamo breaks the graph at id() of a dict, and a break with the
        # bound method dict.pop on the stack (new every step) recompiled the rest every step.
        gid = id(group)
        buckets = self._ahead_buckets.pop(gid, None) or self._buckets(params, group)[0]
        for key, (bucket, states) in buckets.items():
            factored, _, _, device, _ = key
            started = self._ahead.pop((gid, key), None)
            if started is None:
                backend = resolve_backend(group["backend"], device)
                for s in states:
                    s["step"] += 1
                if factored:
                    sketch = self._sketches.pop((gid, key), None)
                    started = self._factored_srsi(group, bucket, states, backend, sketch)
                elif self._dense_on_kernels(group, bucket, backend):
                    started = self._dense_start(group, bucket, states, backend)
                else:
                    self._dense_step(group, bucket, states)
                    continue
            if not started.done:
                started.finish(None)

    def _step_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1 = group["betas"][0]
        return dict(
            eps=group["eps"], clip_threshold=signed_clip_threshold(group["clip_threshold"], group["maximize"]),
            lr=self._lr(group), beta1=beta1, weight_decay=group["weight_decay"],
            cosine_max_scale=group["cosine_max_scale"] if group["cosine_guidance"] and beta1 > 0 else None,
        )  # fmt: skip

    def _dense_on_kernels(self, group: dict[str, Any], bucket: list[torch.Tensor], backend) -> bool:
        """Does this dense bucket take the backend's fused passes (:meth:`_dense_start`)? Where
        it has them (Triton), for fp32 state and a parameter of a dtype they write (not fp64:
        a parameter cast to fp64 after its state was made), whole tensors, eager steps, without
        cosine guidance (whose sums only the factored kernels fuse); else :meth:`_dense_step`."""
        return (
            hasattr(backend, "dense_second_moment") and self.state[bucket[0]]["exp_avg_sq"].dtype == torch.float32
            and bucket[0].dtype != torch.float64 and not is_dtensor(bucket[0]) and not torch.compiler.is_compiling()
            and not (group["cosine_guidance"] and group["betas"][0] > 0)
        )  # fmt: skip

    def _dense_start(
        self, group: dict[str, Any], bucket: list[torch.Tensor], states: list[dict[str, Any]], backend
    ) -> _Started:
        """A dense bucket on the fused passes: the sums pass (the update's RMS and the
        non-finite check's values), then the update pass in ``finish()``, which also writes V;
        graphed, both are deferred to run with the other buckets' passes."""
        beta2 = group["betas"][1]
        grads = list(map(_grad, bucket))
        sqs = list(map(_exp_avg_sq, states))
        exp_avgs = _first_moments(bucket, states, group["betas"][0])
        kw = self._step_kwargs(group)
        eps = kw.pop("eps")
        del kw["cosine_max_scale"]  # None here (see _dense_on_kernels)
        rounding_keys = self._rounding_keys(group, bucket, states)
        rounding = {} if rounding_keys is None else {"rounding_keys": rounding_keys}
        if not self._graphable(group, backend, sqs[0], None):
            op = backend.dense_second_moment(grads, sqs, beta2, eps)
            sums = op.first_pass()

            def apply(gate: torch.Tensor | None) -> None:
                op.first_pass_sums = _gated_sums(sums, gate)
                backend.apply_dense_step(op, bucket, exp_avgs, **kw, **rounding)

            return _Started(states, lambda: sums, apply)

        def sums_graph():
            return (backend.dense_second_moment(grads, sqs, beta2, eps).first_pass(),)

        def update_graph(sums, scalars, *rest):
            keys, gate = _key_and_gate(rest, rounding_keys is not None)
            op = backend.dense_second_moment(grads, sqs, beta2, eps)
            op.first_pass_sums = _gated_sums(sums, gate)
            rounding = {} if keys is None else {"rounding_keys": keys}
            backend.apply_dense_step(op, bucket, exp_avgs, **kw, scalars=scalars, **rounding)
            return ()

        # Flat passes: the shape is in the key, since no input carries it.
        baked, read = self._baked_hyperparameters(group), (sqs[0].shape, _addresses([*grads, *sqs]))
        # Keyed by what it reads (β2, ε), not the clip, nor β1, which a scheduler may change
        # every step (OneCycleLR cycles it) and the update reads from the device.
        sums_call = self._graphs.defer(("dense sums", beta2, eps, read), sums_graph, ())
        queued = []

        def prepare(gate: torch.Tensor | None) -> None:
            key = ("dense", gate is not None, baked, read, _addresses([*bucket, *(exp_avgs or [])]))
            scalars = update_scalars(self._lr(group), group["weight_decay"], group["betas"][0], sqs[0].device)
            inputs = (sums_call.outputs[0], scalars, *_key_and_gate_inputs(rounding_keys, gate, sqs[0].device))
            queued.append(self._graphs.defer(key, update_graph, inputs))

        def finish(gate: torch.Tensor | None) -> None:
            if not queued:
                prepare(gate)

        return _Started(states, lambda: sums_call.outputs[0], finish, prepare)

    def _dense_step(self, group: dict[str, Any], bucket: list[torch.Tensor], states: list[dict[str, Any]]) -> None:
        """Unfactored V (vectors, small matrices): ``V = β2·V + (1−β2)·G²``, same update rule."""
        from .reference import apply_updates, clipped_update, in_place_ok, stack_as

        beta2 = group["betas"][1]
        # DTensor parameters: work on this rank's part; the RMS and cosine sums are all-reduced.
        shards = RowShards.of(bucket[0])
        reduce = None if shards is None else shards.all_reduce
        sqs = local_list([s["exp_avg_sq"] for s in states])
        grads = local_list([p.grad for p in bucket])
        # V in place by foreach ops where they are quicker (see in_place_ok); the clipped update
        # needs V and G stacked either way.
        if in_place_ok(sqs, sqs[0].dtype) and in_place_ok(grads, sqs[0].dtype):
            torch._foreach_mul_(sqs, beta2)
            torch._foreach_addcmul_(sqs, grads, grads, value=1 - beta2)
            v, g = torch.stack(sqs), torch.stack(grads)
        else:
            v = torch.stack(sqs)
            g = stack_as(grads, v.dtype)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            torch._foreach_copy_(sqs, v.unbind(0))
        kw = self._step_kwargs(group)
        upd = clipped_update(g, v, kw.pop("eps"), kw.pop("clip_threshold"), reduce)
        exp_avgs = _first_moments(bucket, states, kw["beta1"])
        exp_avgs = None if exp_avgs is None else local_list(exp_avgs)
        rounding_keys = self._rounding_keys(group, bucket, states)
        if rounding_keys is not None and shards is not None:  # each shard its own bits
            rounding_keys = shard_keys(rounding_keys, shards.local_rows.start)
        scalars = self._traced_scalars(group, upd.device, momentum=True)
        apply_updates(
            local_list(bucket), upd, exp_avgs, **kw, reduce=reduce, rounding_keys=rounding_keys, scalars=scalars
        )

    def _draw_sketch(self, group: dict[str, Any], bucket: list[torch.Tensor], states: list[dict[str, Any]]):
        """The bucket's Gaussian sketch ``(B, n, width)``, on its factors' device and in their
        dtype, from that device's sketch RNG; ``width`` covers the bucket's largest rank."""
        m, n = matrix_shape(bucket[0])
        # The largest rounded rank: rounding is monotonic, so round the largest rank only.
        width = sketch_width(_round_rank(max(map(_rank, states))), _sketch_oversample(group), m, n)
        q = local(states[0]["Q"])
        gen = self._generator(q.device)
        return torch.randn(len(bucket), n, width, generator=gen, device=q.device, dtype=q.dtype)

    def _factored_srsi(
        self,
        group: dict[str, Any],
        bucket: list[torch.Tensor],
        states: list[dict[str, Any]],
        backend,
        sketch: torch.Tensor | None = None,
    ) -> _Started:
        """S-RSI for every same-shaped matrix of the bucket at once, from ``sketch`` (drawn here
        if None: :meth:`_draw_sketch`); the update follows in ``finish()``, and the rank
        decisions and new factors wait in ``self._pending`` for :meth:`_end_step`."""
        m, n = matrix_shape(bucket[0])
        beta1, beta2, _ = group["betas"]
        shards = RowShards.of(bucket[0], local_backend=backend)
        if shards is not None:
            # DTensor (FSDP2) parameters: the same step on this rank's rows; see distributed.py.
            backend = shards
        q_prev, u_prev, prev_cols = self._previous_factors(states)
        # A bucket's parameters share their layout (see buckets.py): where the first is a plain
        # tensor, so are all, and their gradients and state; no per-tensor DTensor test.
        as_local = list if shards is None else local_list
        grads = as_local(map(_grad, bucket))
        if bucket[0].dim() > 2:  # folded to (m, n), as matrix_shape sees it
            grads = [g.flatten(1) for g in grads]
        params = as_local(bucket)
        exp_avgs = _first_moments(bucket, states, beta1)
        exp_avgs = None if exp_avgs is None else as_local(exp_avgs)

        if sketch is None:
            sketch = self._draw_sketch(group, bucket, states)
        width = sketch.shape[-1]
        warm = group["warm_start"] and min(prev_cols) > 0
        used = self._used_ranks(states, width)
        iters = group["warm_power_iters"] if warm else group["power_iters"]
        if warm and any(k > c for k, c in zip(used, prev_cols, strict=True)):
            # A rank that grew past last step's sketch (the sigmoid policy's growth beyond the
            # extra columns, or the step policy's by more than them) takes its new columns
            # straight from the Gaussian: one warm iteration left them raw (ξ far above the
            # optimum, and a sigmoid rank pushed up for good). Such a step runs the cold count
            # (test_warm_start_measures_a_rank_grown_past_the_sketch_after_full_iterations).
            iters = max(iters, group["power_iters"])
        # The sigmoid policy decides each matrix's rank on its own step count: same-shaped
        # matrices skip different steps (no gradient, a skipped non-finite step, added later).
        if group["rank_policy"] == "step":
            due = [True] * len(states)
        else:
            due = [s["step"] % group["rank_interval"] == 0 for s in states]
        measure = any(due)
        # Only the Triton kernels have a product precision to choose.
        precision = {"precision": group["product_precision"]} if getattr(backend, "name", None) == "triton" else {}
        eps = group["eps"]
        # The ranks enter as column masks (data, not shapes), so a graph serves any ranks.
        used_mask = column_mask(tuple(used), width, q_prev.device)
        prev_mask = column_mask(tuple(prev_cols), width, q_prev.device)

        def second_moment(q_prev: torch.Tensor, u_prev: torch.Tensor):
            return backend.second_moment(grads, q_prev, u_prev, beta2, eps=eps, **precision)

        def start(u_prev: torch.Tensor, sketch: torch.Tensor, prev_mask: torch.Tensor) -> torch.Tensor:
            return _warm_sketch(u_prev, sketch, prev_mask) if warm else sketch

        eigh = _sync_free_eigh(backend, q_prev.device, width, q_prev.dtype)

        def srsi(q_prev, u_prev, sketch, prev_mask):
            """``(operator for V_t, q, u, failure flags or None)``."""
            op = second_moment(q_prev, u_prev)
            failures: list[torch.Tensor] = []
            q, u = subspace_iteration(
                op, start(u_prev, sketch, prev_mask), iters, _deferred_orthonormalize(backend, failures)
            )
            q, u = truncate(q, u, group["truncation"], eigh)
            return op, q, u, torch.stack(failures).any(dim=0) if failures else None

        rounding_keys = self._rounding_keys(group, bucket, states)
        # Compiled, the update reads α, λ and β1 from a tensor (see _traced_scalars).
        traced = (
            self._traced_scalars(group, q_prev.device, True) if getattr(backend, "name", None) in _SCALARS else None
        )

        def update(op, q, u, used_mask, scalars=traced, keys=rounding_keys):
            """Updates W (and M) in place; ξ ``(B,)`` or None. It needs only V_t, so it runs
            before the rank decision; a fused backend also returns ξ's numerator from its pass."""
            factors = (q * used_mask.to(q.dtype), u * used_mask.to(u.dtype)) if measure else None
            kw = self._step_kwargs(group) | ({} if scalars is None else {"scalars": scalars})
            kw |= {} if keys is None else {"rounding_keys": keys}
            resid = backend.apply_step(op, params, exp_avgs, residual_factors=factors, **kw)
            return ratio_from_sq_norms(op.sq_norm(), resid) if measure else _finite_marks(u)

        # Not with a Rayleigh–Ritz truncation by torch.linalg.eigh, which reads its flag on the
        # host, which a capture cannot (the dense buckets, which have no S-RSI, are still graphed).
        if (group["truncation"] == "qr" or eigh is not None) and self._graphable(group, backend, q_prev, shards):
            # Two graphs, S-RSI and the update, since the non-finite check may come in between.
            # Everything but the inputs (among them α, λ and β1) is read or written where the
            # key says it is.
            def srsi_graph(q_prev, u_prev, sketch, prev_mask):
                op, q, u, failed = srsi(q_prev, u_prev, sketch, prev_mask)
                return q, u, op.first_pass_sums, failed

            def update_graph(q_prev, u_prev, sums, q, u, used_mask, scalars, *rest):
                keys, gate = _key_and_gate(rest, rounding_keys is not None)
                op = second_moment(q_prev, u_prev)
                op.first_pass_sums = _gated_sums(sums, gate)
                return (update(op, q, u, used_mask, scalars, keys),)

            # Deferred (see cuda_graphs.py): S-RSI runs with the dense sums passes queued before
            # it, the update with every other update, queued by prepare() while the GPU runs S-RSI.
            baked, read = self._baked_hyperparameters(group), _addresses(grads)
            # S-RSI reads β2, ε and the precision of the group (second_moment) and its
            # truncation, not β1 or the clip: keyed by those, it keeps replaying while a
            # scheduler changes β1 every step.
            srsi_key = ("srsi", m, n, warm, iters, beta2, eps, tuple(precision.values()), group["truncation"], read)
            srsi_call = self._graphs.defer(srsi_key, srsi_graph, (q_prev, u_prev, sketch, prev_mask))
            queued = []

            def srsi_outputs():
                return srsi_call.outputs

            def prepare(gate: torch.Tensor | None) -> None:
                q, u, sums, _ = srsi_call.outputs
                gated = gate is not None
                update_key = ("update", m, n, measure, gated, baked, read, _addresses([*params, *(exp_avgs or [])]))
                scalars = update_scalars(self._lr(group), group["weight_decay"], group["betas"][0], q_prev.device)
                keys_gate = _key_and_gate_inputs(rounding_keys, gate, q_prev.device)
                inputs = (q_prev, u_prev, sums, q, u, used_mask, scalars, *keys_gate)
                queued.append(self._graphs.defer(update_key, update_graph, inputs))

            def run_update(q, u, gate):
                if not queued:
                    prepare(gate)
                return lambda: queued[0].outputs[0]

        else:
            op, q, u, failed = srsi(q_prev, u_prev, sketch, prev_mask)
            first_sums = getattr(op, "first_pass_sums", None)

            def srsi_outputs():
                return q, u, first_sums, failed

            def prepare(gate: torch.Tensor | None) -> None:
                pass

            def run_update(q, u, gate):
                op.first_pass_sums = _gated_sums(first_sums, gate)
                xi = update(op, q, u, used_mask)
                return lambda: xi

        def redo() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            """S-RSI again with the checked orthonormalizer (V_t is unchanged by the update)."""
            again = second_moment(q_prev, u_prev)
            q2, u2 = subspace_iteration(again, start(u_prev, sketch, prev_mask), iters, backend.orthonormalize)
            q2, u2 = truncate(q2, u2, group["truncation"], eigh)
            if not measure:
                return q2, u2, _finite_marks(u2)
            resid2 = again.residual_sq_norm(truncate_columns(q2, used), truncate_columns(u2, used))
            return q2, u2, ratio_from_sq_norms(again.sq_norm(), resid2)

        def finish(gate: torch.Tensor | None) -> None:
            q, u, _, failed = srsi_outputs()
            xi = run_update(q, u, gate)
            cap = min(group["k_max"], m, n)
            self._pending.append(_Pending(group, bucket, states, shards, cap, q, u, used, due, xi, failed, redo))

        return _Started(states, lambda: srsi_outputs()[2], finish, prepare)

    def _used_ranks(self, states: list[dict[str, Any]], width: int) -> list[int]:
        """The ranks this step uses, :func:`_round_ranks` (eager inside torch.compile, which
        would guard each rank's value)."""
        return _round_ranks(states, width)

    def _previous_factors(self, states: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The bucket's previous factors ``(B, m, K)``, ``(B, n, K)``, zero-padded to a common
        width (zero columns add nothing to Q Uᵀ), and each matrix's own width. Where last
        step's rank decision stored them as the matrices of one tensor each, in this order, and
        they are still the state's, those tensors are the stacks: no copy."""
        stacks = None if torch.compiler.is_compiling() else self._factor_stacks.get(id(states))  # dynamo: no id()
        qs, us = [s["Q"] for s in states], [s["U"] for s in states]
        if stacks is not None and _is_each(qs, stacks[0]) and _is_each(us, stacks[1]):
            q_prev, u_prev = stacks[0][0]._base, stacks[1][0]._base
            # Views made under torch.inference_mode have no _base: stacked anew below.
            if q_prev is not None and u_prev is not None:
                return q_prev, u_prev, [u_prev.shape[2]] * len(us)  # one tensor: one width
        width_prev = max(q.shape[1] for q in qs)
        q_prev, u_prev = _stack_padded(local_list(qs), width_prev), _stack_padded(local_list(us), width_prev)
        return q_prev, u_prev, [u.shape[1] for u in us]

    def _end_step(self) -> None:
        """Rank decisions and new factors of every bucket of the step, after one host sync per
        device that fetches all ξ (and the orthonormalizer's failure flags) at once."""
        self._graphs.flush()  # the deferred updates, all at once
        self._graphs.next_step()
        pending = self._pending[:]
        self._pending.clear()
        unread = [rec for rec in pending if rec.fetched is None]  # not read with the check
        self._narrow_ahead(unread)
        host = iter(to_host([t for rec in unread for t in (rec.xi(), rec.failed)]))
        for rec in unread:
            rec.fetched = (next(host), next(host))
        self._factor_stacks.clear()
        for rec in pending:
            xis, failed = rec.fetched
            if failed is not None and any(failed):
                rec.q, rec.u, xi = rec.redo()  # only non-finite sketches fail: rare
                rec.narrowed = None
                xis = xi.tolist()
            self._decide_ranks(rec, xis)

    def _narrow_ahead(self, pending: list[_Pending] | None = None) -> None:
        """Copies the new factors at the ranks this step used (``rec.narrowed``), after the
        updates are launched and before the step's sync: the GPU is busy then, while after the
        sync it waits on the host. The rank decision keeps them unless round(k) moves, which it
        rarely does. Only where one rank serves the whole bucket (the usual case)."""
        for rec in self._pending if pending is None else pending:
            if rec.shards is None and len(set(rec.used)) == 1:
                rec.narrowed = (rec.used[0], *_narrowed(rec.q, rec.u, rec.used[0]))

    def _decide_ranks(self, rec: "_Pending", xis: list[float]) -> None:
        group, states, cap = rec.group, rec.states, rec.cap
        width = rec.q.shape[2]
        # A non-finite ξ: V_t's squares overflowed the factors' dtype (float32: finite gradients of ~1e9
        # and more; S-RSI squares V), and the new factors may hold inf or NaN. This step's update used
        # V_t from the previous factors, so it is sound; keep those factors and that rank.
        overflowed = [] if all(map(math.isfinite, xis)) else [b for b, xi in enumerate(xis) if not math.isfinite(xi)]
        kept = {b: (states[b]["Q"], states[b]["U"], states[b]["rank"]) for b in overflowed}
        if overflowed:
            self._warn_overflowed(rec, overflowed)
        thresh = group["xi_thresh"]
        lo = min(group["k_min"], cap)  # k_min and k_max may have changed since the last decision
        if group["rank_policy"] == "step":
            k_min, beta3 = group["k_min"], group["betas"][2]
            # The new rank depends on ξ only through ξ > threshold, and a bucket's matrices
            # mostly share their rank: computed once per distinct input, not per matrix (this
            # runs after the step's sync, while the GPU waits).
            new_rank: dict[tuple, float] = {}
            for s, used, xi in zip(states, rec.used, xis, strict=True):
                s["xi"] = xi
                key = (s["rank"], used, xi > thresh)
                rank = new_rank.get(key)
                if rank is None:
                    rank = rank_moment(key[0], next_rank_step(used, xi, thresh, k_min, cap), beta3)
                    rank = new_rank[key] = rank if lo <= rank <= cap else float(min(max(rank, lo), cap))
                s["rank"] = rank
        else:
            for s, due, xi in zip(states, rec.due, xis, strict=True):
                rank = s["rank"]
                if due:
                    s["xi"] = xi
                    rank += sigmoid_increment(xi, *group["sigmoid"]) if xi > thresh else 0.0
                s["rank"] = float(min(max(rank, lo), cap))
        for b, (_, _, rank) in kept.items():
            states[b]["rank"] = rank
        # Keep round(k_t) columns; growth past this sketch's width waits for the next step.
        self._store_factors(rec, _round_ranks(states, width))
        # Copies, each matrix's own: the kept factors are views of last step's stack, which
        # the others moved on from, and the others' of a stack that holds discarded columns.
        for b, s in enumerate(states if kept else ()):
            q, u = kept[b][:2] if b in kept else (s["Q"], s["U"])
            s["Q"], s["U"] = q.clone(), u.clone()
        if kept:  # the stack _store_factors remembered is no state's now: not kept alive to the next step
            self._factor_stacks.pop(id(states), None)

    def _warn_overflowed(self, rec: "_Pending", overflowed: list[int]) -> None:
        """The ``RuntimeWarning`` of :meth:`_decide_ranks` for the matrices ``overflowed``, named,
        at the user's call (eager inside torch.compile, where the step's dynamo frame is kept
        free of it)."""
        names = ", ".join(self._param_name(rec.params[b]) for b in overflowed[:3])
        # S-RSI squares V ≈ G² in the factors' dtype (fp64 for fp64 parameters): roughly max^(1/4).
        dtype, near = ("float64", "1e77") if rec.q.dtype == torch.float64 else ("float32", "1e9")
        warnings.warn(
            f"{type(self).__name__}: the second moment of {names}{' …' if len(overflowed) > 3 else ''} "
            f"overflowed {dtype} (gradient entries of ~{near} or more); its factors and rank were kept from "
            "the previous step. Scale the loss down or clip the gradients.",
            RuntimeWarning,
            stacklevel=_outside_stacklevel(),
        )

    def _store_factors(self, rec: "_Pending", keeps: list[int]) -> None:
        """Each matrix's new factors at its first ``keeps[b]`` columns, into its state."""
        states = rec.states
        if rec.shards is not None:
            for s, k, qb, ub in zip(states, keeps, rec.q, rec.u, strict=True):
                s["Q"], s["U"] = rec.shards.rows_of(qb[:, :k].clone()), rec.shards.replicated(ub[:, :k].clone())
            return
        # One copy per distinct rank; each state tensor is one matrix of it (no memory shared
        # between parameters beyond the copy's own storage, whose size is what they hold).
        k = keeps[0]
        if keeps.count(k) == len(keeps):  # the usual case, one rank for all: one narrowing copy
            ahead = rec.narrowed
            qs, us = ahead[1:] if ahead is not None and ahead[0] == k else _narrowed(rec.q, rec.u, k)
            if not torch.compiler.is_compiling():
                self._factor_stacks[id(states)] = (qs, us)
            for s, qb, ub in zip(states, qs, us, strict=True):
                s["Q"], s["U"] = qb, ub
            return
        by_keep: dict[int, list[int]] = defaultdict(list)
        for b, k in enumerate(keeps):
            by_keep[k].append(b)
        for k, idx in by_keep.items():
            # stack, not rec.q[idx]: a list index is copied to the device, which waits
            qs = torch.stack([rec.q[b, :, :k] for b in idx]).unbind(0)
            us = torch.stack([rec.u[b, :, :k] for b in idx]).unbind(0)
            for b, qb, ub in zip(idx, qs, us, strict=True):
                states[b]["Q"], states[b]["U"] = qb, ub

    # -------------------------------------------------------------------------- observability
    @property
    def cuda_graph_counts(self) -> dict[str, int]:
        """Graphable calls so far (a factored bucket's S-RSI and update, a dense bucket's sums
        and update passes on the Triton kernels; a batch of them counts once) that ran
        ``eager``, were ``captured`` or ``replayed`` from a CUDA graph, and captures that
        ``failed`` (empty without ``cuda_graphs``)."""
        return dict(self._graphs.counts)

    def state_report(self) -> StateReport:
        """Per parameter: kind, rank, last ξ and state bytes, with totals next to AdamW's."""
        return StateReport(report_rows(self))
