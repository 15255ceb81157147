"""The ``"triton"`` backend: the Adapprox step with V never materialized (``docs/kernels.md``).

Layers: the kernels (:mod:`adapprox_kernels.kernels`, imported on first use, so this module
and the package import without triton) -> ``torch.library`` custom ops with fake
implementations (``adapprox_kernels::v_matmul`` …, so a compiled training loop sees opaque
ops with known output shapes instead of a graph break; eager steps skip their dispatch and
call the launchers directly) -> :class:`TritonSecondMoment`, the
:class:`~adapprox_kernels.linear_operator.LinearOperator` S-RSI runs on -> :class:`TritonBackend`.

Where it runs: CUDA tensors whenever triton imports (``"auto"`` picks it there, and only
there). CPU tensors run only under the Triton interpreter — ``TRITON_INTERPRET=1`` set before
triton is first imported (it decorates its own functions then) — and only when asked for by
name (``backend="triton"``): the interpreter is for testing, orders of magnitude slower than the reference.
"""

import functools
import sys
from typing import Optional, Sequence

import torch

from . import reference
from ._requirements import MIN_TRITON, too_old
from .backends import ReferenceBackend, register_backend
from .transfer import rounding_keys_tensor


_IMPORT_OUTCOME: list[Optional[str]] = []  # the import's error (None: none), once tried


def _triton_import_error() -> Optional[str]:
    # Memoized by hand, not by functools.lru_cache: a step under torch.compile calls this
    # (resolve_backend), and dynamo warns of every lru_cache it traces through.
    if not _IMPORT_OUTCOME:
        try:
            import triton

            if too_old(triton.__version__, MIN_TRITON):
                raise ImportError(
                    f"triton {triton.__version__} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, the oldest supported"
                )
            _IMPORT_OUTCOME.append(None)
        except Exception as exc:  # noqa: BLE001 - a broken install can raise more than ImportError
            _IMPORT_OUTCOME.append(f"{type(exc).__name__}: {exc}")
    return _IMPORT_OUTCOME[0]


def _kernels_interpreted() -> bool:
    """Whether the kernels run (or, not imported yet, would run) under the interpreter. Also
    triton.language's own jitted functions (``tl.sum``), which the kernels call, must be
    interpreted: they are decorated when triton is first imported, for good."""
    import triton.language.standard

    if type(triton.language.standard.sum).__name__ != "InterpretedFunction":
        return False
    module = sys.modules.get("adapprox_kernels.kernels.v_matmul")
    if module is None:
        from .kernels._launch import interpreted

        return interpreted()
    return type(module._v_matmul_kernel).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    import importlib

    return importlib.import_module(f"adapprox_kernels.kernels.{name}")


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


# ------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("adapprox_kernels::v_matmul", mutates_args=())
def v_matmul_op(
    grads: list[torch.Tensor],
    q: torch.Tensor,
    u: torch.Tensor,
    x: torch.Tensor,
    beta2: float,
    eps: float,
    with_sums: bool,
    precision: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``V @ x`` ``(B, m, r)`` and, with ``with_sums``, ``[‖V‖², Σ (G/(√V+ε))²]`` ``(B, 2)``;
    ``precision``: of the product's dots (see ``kernels.v_matmul``)."""
    y, sums = _kernel("v_matmul").v_matmul(grads, q, u, x, beta2, eps=eps if with_sums else None, precision=precision)
    return y, sums if sums is not None else _empty(y)


@v_matmul_op.register_fake
def _(grads, q, u, x, beta2, eps, with_sums, precision=None):
    b, m, r = q.shape[0], q.shape[1], x.shape[2]
    return x.new_empty(b, m, r), x.new_empty(b, 2) if with_sums else x.new_empty(0)


@torch.library.custom_op("adapprox_kernels::v_rmatmul", mutates_args=())
def v_rmatmul_op(
    grads: list[torch.Tensor],
    q: torch.Tensor,
    u: torch.Tensor,
    y: torch.Tensor,
    beta2: float,
    precision: Optional[str] = None,
) -> torch.Tensor:
    """``Vᵀ @ y``: ``(B, n, r)``; ``precision`` as in :func:`v_matmul_op`."""
    return _kernel("v_matmul").v_rmatmul(grads, q, u, y, beta2, precision=precision)


@v_rmatmul_op.register_fake
def _(grads, q, u, y, beta2, precision=None):
    return y.new_empty(u.shape[0], u.shape[1], y.shape[2])


@torch.library.custom_op("adapprox_kernels::v_norms", mutates_args=())
def v_norms_op(
    grads: list[torch.Tensor],
    q: torch.Tensor,
    u: torch.Tensor,
    q_new: Optional[torch.Tensor],
    u_new: Optional[torch.Tensor],
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """``[‖V‖², ‖V − q_new u_newᵀ‖², Σ (G/(√V+ε))²]`` per matrix: ``(B, 3)``."""
    return _kernel("v_norms").v_norms(grads, q, u, beta2, eps, q_new, u_new)


@v_norms_op.register_fake
def _(grads, q, u, q_new, u_new, beta2, eps):
    return q.new_empty(q.shape[0], 3)


@torch.library.custom_op("adapprox_kernels::update_cosine_sums", mutates_args=())
def update_cosine_sums_op(
    grads: list[torch.Tensor],
    q: torch.Tensor,
    u: torch.Tensor,
    exp_avgs: list[torch.Tensor],
    clip: torch.Tensor,
    beta2: float,
    eps: float,
    beta1: float,
) -> torch.Tensor:
    """``[Σ Upd·M_t, Σ Upd², Σ M_t²]`` per matrix: ``(B, 3)``."""
    return _kernel("update_cosine").update_cosine_sums(grads, q, u, exp_avgs, clip, beta2=beta2, eps=eps, beta1=beta1)


@update_cosine_sums_op.register_fake
def _(grads, q, u, exp_avgs, clip, beta2, eps, beta1):
    return q.new_empty(q.shape[0], 3)


@torch.library.custom_op("adapprox_kernels::apply_update", mutates_args=("params", "exp_avgs"))
def apply_update_op(
    grads: list[torch.Tensor],
    q: torch.Tensor,
    u: torch.Tensor,
    params: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    clip: torch.Tensor,
    scale: torch.Tensor,
    q_new: Optional[torch.Tensor],
    u_new: Optional[torch.Tensor],
    beta2: float,
    eps: float,
    lr: float,
    beta1: float,
    weight_decay: float,
    rounding_keys: Optional[torch.Tensor] = None,
    scalars: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Writes ``params`` (and ``exp_avgs``; an empty list means no momentum) in place;
    returns ``‖V − q_new u_newᵀ‖²`` ``(B,)`` when new factors are given, else an empty tensor.
    ``rounding_keys``: bf16 ``params`` are rounded at random with these, a key per matrix
    (``transfer.rounding_keys_tensor``). ``scalars``: ``[α, 1 − α·λ, β1, 1 − β1]``
    (``transfer.update_scalars``), read in place of ``lr``, ``weight_decay`` and ``beta1``."""
    resid = _kernel("apply_update").apply_update(
        grads, q, u, params, exp_avgs or None, clip, scale, q_new, u_new,
        beta2=beta2, eps=eps, lr=lr, beta1=beta1, weight_decay=weight_decay, rounding_keys=rounding_keys,
        scalars=scalars,
    )  # fmt: skip
    return resid if resid is not None else _empty(clip)


@apply_update_op.register_fake
def _(
    grads, q, u, params, exp_avgs, clip, scale, q_new, u_new, beta2, eps, lr, beta1, weight_decay, rounding_keys=None,
    scalars=None,
):  # fmt: skip
    return clip.new_empty(clip.shape[0]) if q_new is not None else clip.new_empty(0)


# ------------------------------------------------------------------------------ operator
def _stage(tensors: Sequence[torch.Tensor], m: int, n: int) -> tuple[list[torch.Tensor], list[tuple]]:
    """2-D ``(m, n)`` views of one dtype for a kernel, and the ``(original, staged copy)`` pairs
    to copy back afterwards (only for non-contiguous tensors or mixed dtypes, both rare)."""
    from .kernels._launch import SUPPORTED_DTYPES

    dtype = tensors[0].dtype
    if dtype not in SUPPORTED_DTYPES or any(t.dtype != dtype for t in tensors):
        dtype = torch.float32
    views, staged = [], []
    for t in tensors:
        if t.dtype == dtype and t.is_contiguous():
            views.append(t.view(m, n))
        else:
            copy = t.reshape(m, n).to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
            views.append(copy)
            staged.append((t, copy))
    return views, staged


class TritonSecondMoment:
    """``V_t = β2·relu(Q Uᵀ) + (1−β2)·G²`` of ``B`` same-shaped matrices, as a
    :class:`~adapprox_kernels.linear_operator.LinearOperator` that never stores V.

    ``grads``: ``B`` tensors ``(m, n)``; ``q: (B, m, K)``, ``u: (B, n, K)`` fp32 previous
    factors (zero-padded to a common ``K``). The first :meth:`matmul` also reduces ``‖V‖²``
    and ``Σ (G/(√V+ε))²`` into ``first_pass_sums`` ``(B, 2)``, which :meth:`sq_norm` and the
    update's RMS reuse (a caller that already has them, from an earlier operator on the same
    V, may set them instead: a CUDA-graphed update does).

    ``precision`` is the tensor-core precision of the products' dots (None: the device default,
    see ``kernels._launch.dot_precision``); ``range_precision``, when given, replaces it in the
    products that only choose S-RSI's subspace (:meth:`matmul`, :meth:`rmatmul`), while
    :meth:`project`, S-RSI's last ``Vᵀ Q``, keeps ``precision``.

    ``g_passes`` counts the passes over G made so far (a product with ``r`` columns reads G
    once per ``PRODUCT_BLOCKS.r``-wide column block), for benchmarks and docs/kernels.md."""

    def __init__(
        self, grads: Sequence[torch.Tensor], q: torch.Tensor, u: torch.Tensor, beta2: float, eps: float,
        precision: Optional[str] = None, range_precision: Optional[str] = None,
    ):  # fmt: skip
        m, n = grads[0].shape
        self.grads, _ = _stage(grads, m, n)  # read-only: nothing to copy back
        # Eager calls go straight to the launchers with one matrix table for the whole step (a
        # step makes ~12 launches over the same gradients); traced code goes through the custom
        # ops, which torch.compile sees as opaque calls with known output shapes.
        self._eager = not torch.compiler.is_compiling()
        self.precision = precision
        self.range_precision = range_precision or precision
        self.table = _kernel("_launch").MatrixTable(self.grads, "grads") if self._eager else None
        self.q, self.u = q, u
        self.beta2, self.eps = float(beta2), float(eps)
        self.first_pass_sums: Optional[torch.Tensor] = None  # (B, 2): ‖V‖², Σ Upd² (unclipped)
        self.g_passes = 0

    def _product_passes(self, r: int) -> int:
        from .kernels._launch import PRODUCT_BLOCKS

        return -(-r // PRODUCT_BLOCKS.r)

    @property
    def shape(self) -> tuple[int, int, int]:
        m, n = self.grads[0].shape
        return len(self.grads), m, n

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.q.device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        first = self.first_pass_sums is None
        if self._eager:
            y, sums = _kernel("v_matmul").v_matmul(
                self.table, self.q, self.u, x, self.beta2, eps=self.eps if first else None,
                precision=self.range_precision,
            )  # fmt: skip
        else:
            y, sums = torch.ops.adapprox_kernels.v_matmul(
                self.grads, self.q, self.u, x, self.beta2, self.eps, first, self.range_precision
            )
        self.g_passes += self._product_passes(x.shape[-1])
        if first:
            self.first_pass_sums = sums
        return y

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        return self._rmatmul(y, self.range_precision)

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """``Vᵀ @ y`` at ``precision``: S-RSI's last product, whose result is the factor U."""
        return self._rmatmul(y, self.precision)

    def _rmatmul(self, y: torch.Tensor, precision: Optional[str]) -> torch.Tensor:
        self.g_passes += self._product_passes(y.shape[-1])
        if self._eager:
            return _kernel("v_matmul").v_rmatmul(self.table, self.q, self.u, y, self.beta2, precision=precision)
        return torch.ops.adapprox_kernels.v_rmatmul(self.grads, self.q, self.u, y, self.beta2, precision)

    def _norms(self, q_new: Optional[torch.Tensor] = None, u_new: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._eager:
            sums = _kernel("v_norms").v_norms(self.table, self.q, self.u, self.beta2, self.eps, q_new, u_new)
        else:
            sums = torch.ops.adapprox_kernels.v_norms(self.grads, self.q, self.u, q_new, u_new, self.beta2, self.eps)
        self.g_passes += 1
        if self.first_pass_sums is None:
            self.first_pass_sums = sums[:, [0, 2]]
        return sums

    def sq_norm(self) -> torch.Tensor:
        """``‖V‖_F²`` ``(B,)``, from the first product's pass when there was one."""
        if self.first_pass_sums is None:
            self._norms()
        return self.first_pass_sums[:, 0]

    def update_sq_norm(self) -> torch.Tensor:
        """``Σ (G/(√V+ε))²`` ``(B,)`` before clipping (the RMS numerator)."""
        if self.first_pass_sums is None:
            self._norms()
        return self.first_pass_sums[:, 1]

    def residual_sq_norm(self, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``‖V − q uᵀ‖_F²`` ``(B,)`` as a pass of its own (the optimizer fuses it into the update)."""
        return self._norms(q, u)[:, 1]


class TritonDenseMoment:
    """``V_t = β2·V_{t−1} + (1−β2)·G²`` of ``B`` same-shaped parameters whose ``V_{t−1}`` is
    stored (the optimizer's dense buckets: vectors, and matrices too small to factor), for the
    two passes of :mod:`adapprox_kernels.kernels.dense_moment`, which read every tensor as a
    flat array (non-contiguous ones are staged, and written back after the update).

    ``grads`` (fp32, bf16 or fp16; others, or mixed dtypes, as fp32 copies) and ``exp_avg_sqs``
    (fp32): ``B`` tensors of one shape. :meth:`first_pass` runs the sums pass, which writes
    nothing; :meth:`TritonBackend.apply_dense_step` then writes ``V_t`` over ``exp_avg_sqs``.
    Eager launches only: a compiled step keeps the reference's dense path."""

    def __init__(self, grads: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], beta2: float, eps: float):
        from .kernels._launch import SUPPORTED_DTYPES, MatrixTable

        dtype = grads[0].dtype
        if dtype not in SUPPORTED_DTYPES or any(g.dtype != dtype for g in grads):  # rare: one fp32 copy each
            grads = [g.float() for g in grads]
        self.table = MatrixTable(grads, "grads", flat=True)
        self.sqs = MatrixTable(exp_avg_sqs, "exp_avg_sqs", flat=True)
        self.numel = self.table.numel
        self.beta2, self.eps = float(beta2), float(eps)
        self.first_pass_sums: Optional[torch.Tensor] = None  # (B, 2): ‖V_t‖², Σ Upd² (unclipped)

    def first_pass(self) -> torch.Tensor:
        """``[‖V_t‖², Σ (G/(√V_t+ε))²]`` ``(B, 2)``, from the sums pass (run once)."""
        if self.first_pass_sums is None:
            self.first_pass_sums = _kernel("dense_moment").dense_sums(self.table, self.sqs, self.beta2, self.eps)
        return self.first_pass_sums


# ------------------------------------------------------------------------------ backend
class TritonBackend:
    """Fused Triton kernels; float64 buckets fall back to the reference (see ``docs/kernels.md``)."""

    name = "triton"
    orthonormalize = ReferenceBackend.orthonormalize  # the extension's CholeskyQR2 on CUDA when built
    orthonormalize_unchecked = ReferenceBackend.orthonormalize_unchecked
    auto_device_types = ("cuda",)  # "auto" picks it for CUDA tensors only: never the CPU interpreter

    @staticmethod
    def available(device: torch.device) -> Optional[str]:
        error = _triton_import_error()
        if error is not None:
            return f"triton cannot be imported ({error})"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if _kernels_interpreted():
                return None
            return "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is first imported"
        return f"no Triton kernels for {device.type} tensors"

    @staticmethod
    def second_moment(
        grads: Sequence[torch.Tensor], q: torch.Tensor, u: torch.Tensor, beta2: float, *, eps: Optional[float] = None,
        precision: Optional[str] = None,
    ):  # fmt: skip
        """``grads``: ``B`` tensors ``(m, n)``; ``q: (B, m, K)``, ``u: (B, n, K)``; ``precision``:
        of the products' tensor-core dots (``"tf32x3"``, ``"tf32"``, ``"tf32_rn"``, ``"ieee"``;
        None: the device default, see ``kernels._launch.dot_precision``), or ``"tf32_range"``:
        tf32 in the products that choose S-RSI's subspace, the device default in its last
        ``Vᵀ Q``."""
        if q.dtype != torch.float32:  # float64 parameters keep float64 factors: no fused path
            return ReferenceBackend.second_moment(grads, q, u, beta2, eps=eps)
        if precision == "tf32_range":
            precision, range_precision = None, "tf32"
        else:
            range_precision = None
        return TritonSecondMoment(grads, q, u, beta2, 0.0 if eps is None else eps, precision, range_precision)

    @staticmethod
    def dense_second_moment(
        grads: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], beta2: float, eps: float
    ) -> TritonDenseMoment:
        """The stored second moment of a dense bucket (fp32 ``exp_avg_sqs``; the launchers check
        it), see :class:`TritonDenseMoment`."""
        return TritonDenseMoment(grads, exp_avg_sqs, beta2, eps)

    @staticmethod
    def apply_dense_step(
        op: TritonDenseMoment, params, exp_avgs, *, clip_threshold, lr, beta1, weight_decay,
        scalars: Optional[torch.Tensor] = None, rounding_keys: Sequence[int] | torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """A dense bucket's update in one pass: ``V_t`` written over the stored ``V_{t−1}``, the
        clipped update (its RMS from :meth:`TritonDenseMoment.first_pass`), momentum of updates
        and decoupled weight decay; ``scalars`` and ``rounding_keys`` as in :meth:`apply_step`."""
        clip = reference.clip_divisor(op.first_pass()[:, 1], op.numel, clip_threshold)
        _kernel("dense_moment").dense_apply(
            op.table, op.sqs, params, exp_avgs, clip, beta2=op.beta2, eps=op.eps, lr=lr, beta1=beta1,
            weight_decay=weight_decay, scalars=scalars, rounding_keys=_keys_on(rounding_keys, op.table.device),
        )  # fmt: skip

    @staticmethod
    def apply_step(
        op, params, exp_avgs, *, eps, clip_threshold, lr, beta1, weight_decay, cosine_max_scale, residual_factors=None,
        reduce: Optional[reference.Reduce] = None, scalars: Optional[torch.Tensor] = None,
        rounding_keys: Sequence[int] | torch.Tensor | None = None,
    ):  # fmt: skip
        """Clipping, momentum of updates, optional cosine guidance and weight decay in one pass
        over G (two with cosine guidance); returns ``‖V − q uᵀ‖²`` for ``residual_factors``.

        ``reduce``: the matrices are this rank's rows of row-sharded ones (see distributed.py);
        the RMS sums, the cosine sums and the residual are summed over the ranks with it.
        ``scalars``: ``[α, 1 − α·λ, β1, 1 − β1]`` on the device (``transfer.update_scalars``),
        read by the fused passes in place of ``lr``, ``weight_decay`` and ``beta1`` (a
        CUDA-graphed step, or a traced one: see ``SketchOptimizer._traced_scalars``; cosine
        guidance's sums still read ``beta1`` when traced). ``rounding_keys``: bf16 weights are rounded at
        random with these keys, one per matrix (``reference.stochastic_round_bf16``): ints or,
        in a graphed step, ``transfer.rounding_keys_tensor``'s device tensor."""
        if reduce is not None and not isinstance(op, TritonSecondMoment):
            raise TypeError("a row-sharded step needs the Triton operator on every rank with rows")
        if not isinstance(op, TritonSecondMoment):
            return ReferenceBackend.apply_step(
                op, params, exp_avgs, eps=eps, clip_threshold=clip_threshold, lr=lr, beta1=beta1,
                weight_decay=weight_decay, cosine_max_scale=cosine_max_scale, residual_factors=residual_factors,
                rounding_keys=rounding_keys, scalars=scalars,
            )  # fmt: skip
        if eps != op.eps:
            raise ValueError(f"apply_step got eps={eps}, the operator was built with eps={op.eps}")
        _, m, n = op.shape
        sq_sum, numel = op.update_sq_norm(), m * n
        if reduce is not None:  # the RMS of the whole matrix
            sq_sum, numel = reduce(torch.stack([sq_sum, torch.full_like(sq_sum, numel)]))
        clip = reference.clip_divisor(sq_sum, numel, clip_threshold)
        weights, staged = _stage(params, m, n)
        moms: list[torch.Tensor] = []
        if exp_avgs is not None:
            moms, staged_moms = _stage(exp_avgs, m, n)
            staged += staged_moms
        scale = torch.ones_like(clip)
        if cosine_max_scale is not None and moms:
            if op._eager:
                sums = _kernel("update_cosine").update_cosine_sums(
                    op.table, op.q, op.u, moms, clip, beta2=op.beta2, eps=op.eps, beta1=beta1, scalars=scalars
                )
            else:
                sums = torch.ops.adapprox_kernels.update_cosine_sums(
                    op.grads, op.q, op.u, moms, clip, op.beta2, op.eps, beta1
                )
            if reduce is not None:
                sums = reduce(sums.t().contiguous()).t()
            dot, upd_sq, avg_sq = sums.unbind(dim=1)
            scale = reference.cosine_scale(dot, upd_sq.sqrt(), avg_sq.sqrt(), cosine_max_scale)
            op.g_passes += 1
        q_new, u_new = residual_factors if residual_factors is not None else (None, None)
        if op._eager:
            resid = _kernel("apply_update").apply_update(
                op.table, op.q, op.u, weights, moms or None, clip, scale, q_new, u_new,
                beta2=op.beta2, eps=op.eps, lr=lr, beta1=beta1, weight_decay=weight_decay, scalars=scalars,
                rounding_keys=_keys_on(rounding_keys, op.table.device),
            )  # fmt: skip
        else:
            # With scalars, no Python number that a scheduler changes is an argument of the op
            # (dynamo would compile the step anew for each).
            numbers = (lr, beta1, weight_decay) if scalars is None else (0.0, 0.0, 0.0)
            resid = torch.ops.adapprox_kernels.apply_update(
                op.grads, op.q, op.u, weights, moms, clip, scale, q_new, u_new, op.beta2, op.eps, *numbers,
                _keys_on(rounding_keys, op.q.device), scalars,
            )  # fmt: skip
        op.g_passes += 1
        for original, copy in staged:
            original.copy_(copy.view_as(original))
        if residual_factors is None:
            return None
        return resid if reduce is None else reduce(resid)


def _keys_on(keys: Sequence[int] | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Stochastic-rounding keys as the kernels read them: a device tensor."""
    return keys if keys is None or torch.is_tensor(keys) else rounding_keys_tensor(keys, device)


register_backend(TritonBackend, prefer=True)
