"""Adapprox on row-sharded parameters (FSDP2, DTensor ``Shard(0)``) without gathering matrices.

Under FSDP2 a weight ``W: (m, n)`` and its gradient are DTensors whose rows are split over the
ranks of a 1-D device mesh (``torch.chunk`` layout: uneven and empty shards allowed). Adapprox
keeps its state the same way: ``Q: (m, k)`` and the first moment by rows, ``U: (n, k)``
replicated. S-RSI then needs only

* ``V @ X``: local. Each rank rebuilds its own rows of ``V = β2·relu(Q Uᵀ) + (1−β2)·G²`` from its
  rows of ``Q`` and ``G`` and the replicated ``U``;
* ``Vᵀ @ Y``: a local product and one all-reduce of ``n×r``;
* ``‖V‖²``, ``‖V − Q Uᵀ‖²``, the update RMS and the cosine-guidance sums: all-reduced scalars;
* the orthonormalization of the row-sharded sketch: the robust CholeskyQR of
  :mod:`adapprox_kernels.cholqr` (the single-GPU path's), whose norm and ``r×r`` Gram matrices
  are all-reduced (:meth:`RowShards.orthonormalize`).

So one step communicates ``O((n + r)·r)`` numbers per matrix and never an ``m×n`` tensor. Every
rank sees the same all-reduced numbers, so ξ, the rank and the Gaussian sketch (drawn from the
optimizer's generator, seeded identically on every rank) are the same everywhere.

:class:`RowShards` has the three pieces of a backend (``second_moment``, ``orthonormalize``,
``apply_step``), so the optimizer runs a sharded bucket through the very code it runs a local
one through. The S-RSI and ξ code is :mod:`adapprox_kernels.srsi`'s, unchanged.

Checkpoints: :func:`optimizer_state_dict` and :func:`load_optimizer_state` save and load the
sharded state with ``torch.distributed.checkpoint`` on any number of ranks (resharding).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from . import reference
from ._extension import orthonormalize as default_orthonormalize
from .cholqr import cholqr_orthonormalize
from .linear_operator import LinearOperator

# Names of the per-parameter state tensors that are split by rows like the parameter itself.
ROW_SHARDED_STATE = ("Q", "exp_avg", "exp_avg_sq")


# ------------------------------------------------------------------------------ DTensor helpers
def is_dtensor(t: Any) -> bool:
    """Is ``t`` a DTensor? Without importing DTensor (a slow import): none exists until it is imported."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a view that writes through); ``t`` itself for plain tensors."""
    return t.to_local() if is_dtensor(t) else t


def local_list(ts: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``[local(t) for t in ts]``, checked once rather than per tensor while no DTensor exists
    (a bucket may hold hundreds of small tensors)."""
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is None:
        return list(ts)
    return [t.to_local() if isinstance(t, mod.DTensor) else t for t in ts]


def chunk_rows(rows: int, parts: int) -> list[int]:
    """Rows per rank in ``torch.chunk`` layout (FSDP2's and DTensor ``Shard(0)``'s): ``ceil(rows /
    parts)`` each, the last ones shorter or empty."""
    size = -(-rows // parts)
    return [max(0, min(size, rows - i * size)) for i in range(parts)]


def group_size() -> int:
    """Ranks in the default process group; 1 without an initialized one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shared_seed(seed: int) -> int:
    """Rank 0's ``seed`` on every rank of the default process group (the sketch RNG must draw the
    same Gaussian sketch everywhere); ``seed`` itself without a process group of several ranks."""
    if group_size() == 1:
        return seed
    box = [seed]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def check_same_seed(seed: int, params: Iterable[torch.Tensor], owner: str) -> None:
    """``ValueError`` unless every rank sharing a DTensor of ``params`` (the process groups of its
    mesh, not the default group: other pipeline stages may use other seeds) has ``seed``. Each
    rank sketches its own rows of a sharded matrix: per-rank seeds would draw another Gaussian
    sketch on every rank, another algorithm, without an error. One ``all_gather_object`` per
    mesh and mesh dimension; none without DTensors."""
    for mesh in dict.fromkeys(p.device_mesh for p in params if is_dtensor(p)):
        for dim in range(mesh.ndim):
            group = mesh.get_group(dim)
            seeds = [None] * dist.get_world_size(group)
            dist.all_gather_object(seeds, seed, group=group)
            for i, other in enumerate(seeds):
                if other != seed:
                    raise ValueError(
                        f"{owner}: the ranks of a DTensor parameter's device mesh have different sketch seeds: "
                        f"rank {dist.get_rank()} (this one) seed={seed}, rank {dist.get_global_rank(group, i)} "
                        f"seed={other}. Each rank sketches its rows of a sharded matrix, so all must draw the same "
                        "sketch: pass the same seed on every rank (not seed + rank), or seed=None (rank 0's is used)."
                    )


def process_rank() -> dict[str, int] | None:
    """``{"rank", "world_size"}`` of this process in the default process group; None without an
    initialized one. Recorded with a plain state dict of DTensor state (whose shards are this
    rank's only: see ``CheckpointMixin.load_state_dict`` in checkpoint.py)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}


def nonfinite_flags(grads: Sequence[torch.Tensor], limits: Sequence[float] | None = None) -> list[bool]:
    """Per DTensor gradient (all on one mesh): does any rank's part hold inf or NaN, or an
    entry above its ``limits`` value (one per gradient, if given)?

    Each rank checks its own rows (an empty shard has nothing to check, and the max-norm of an
    empty tensor is undefined); one all-reduce of the flags (not of the norms: a NaN may not
    survive a max-reduction)."""
    parts = [local(g) for g in grads]
    norms = torch.zeros(len(parts), device=parts[0].device, dtype=torch.float64)
    nonempty = [i for i, t in enumerate(parts) if t.numel()]
    if nonempty:
        norms[nonempty] = torch.stack(torch._foreach_norm([parts[i] for i in nonempty], float("inf"))).double()
    ok = torch.isfinite(norms)
    if limits is not None:  # one number (the usual case) needs no copy to the device
        ok &= norms <= (limits[0] if len(set(limits)) == 1 else norms.new_tensor(limits))
    bad = (~ok).float()
    mesh = grads[0].device_mesh
    for dim in range(mesh.ndim):
        dist.all_reduce(bad, group=mesh.get_group(dim))
    return (bad > 0).tolist()


# ---------------------------------------------------------------------- communication accounting
_COLLECTIVE_WORDS = ("reduce", "gather", "scatter", "broadcast", "all_to_all", "alltoall")


class CollectiveLog(TorchDispatchMode):
    """Records every collective issued while active (c10d and functional collectives, including
    those DTensor and FSDP2 issue internally): ``records`` holds ``(op name, payload bytes)``.

    The payload is the whole tensor being communicated: the reduced tensor of an all-reduce,
    the gathered output of an all-gather, the unreduced input of a reduce-scatter. (A ring
    algorithm sends about ``2(P−1)/P`` times the payload per rank for an all-reduce and
    ``(P−1)/P`` times it for the other two.)"""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, name = func.namespace, func.__name__.split(".")[0]
        if ns in ("c10d", "_c10d_functional", "c10d_functional") and any(w in name for w in _COLLECTIVE_WORDS):
            self.records.append((name, _payload(ns, name, args)))
        return func(*args, **(kwargs or {}))

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.records)

    @property
    def count(self) -> int:
        return len(self.records)


def _payload(ns: str, name: str, args: tuple) -> int:
    if ns == "c10d":  # (tensors, process group, …) or (outputs, inputs, …): the larger side
        return max(_nbytes(args[0]), _nbytes(args[1]) if len(args) > 1 else 0)
    if "gather" in name and len(args) > 1 and isinstance(args[1], int):  # (input, group_size, …)
        return _nbytes(args[0]) * args[1]
    return _nbytes(args[0])


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


@contextmanager
def log_collectives() -> Iterator[CollectiveLog]:
    """``with log_collectives() as log: opt.step()``; then ``log.count``, ``log.bytes``."""
    mode = CollectiveLog()
    with mode:
        yield mode


# ------------------------------------------------------------------------------- row shards
class RowShards:
    """The layout of a DTensor parameter on a 1-D mesh: rows split (``Shard(0)``) or replicated.

    Acts as the backend of a sharded bucket: :meth:`second_moment`, :meth:`orthonormalize` and
    :meth:`apply_step` take and return this rank's rows of every ``(B, m, ·)`` tensor."""

    def __init__(self, mesh, placement, rows: int, local_backend=None):
        from .backends import ReferenceBackend

        # What computes on this rank's rows: the backend chosen for the parameters' device.
        self.local_backend = local_backend or ReferenceBackend
        self.mesh = mesh
        self.placement = placement
        self.rows = rows
        self.sharded = placement.is_shard()
        self.group = mesh.get_group(0) if self.sharded else None
        self.world = mesh.size(0) if self.sharded else 1
        self.rank = mesh.get_local_rank(0) if self.sharded else 0
        self.row_counts = chunk_rows(rows, self.world)
        first = sum(self.row_counts[: self.rank])
        self.local_rows = range(first, first + self.row_counts[self.rank])  # this rank's global rows

    @classmethod
    def of(cls, p: torch.Tensor, local_backend=None) -> "RowShards | None":
        """The layout of ``p``; ``None`` for a plain tensor. Raises for layouts we cannot serve.
        ``local_backend`` (default: the reference) computes on this rank's rows."""
        if not is_dtensor(p):
            return None
        from torch.distributed.tensor import Replicate, Shard

        placements = tuple(p.placements)
        if p.device_mesh.ndim != 1 or placements[0] not in (Shard(0), Replicate()):
            raise NotImplementedError(
                f"Adapprox supports DTensor parameters sharded by rows (Shard(0)) or replicated on a 1-D mesh "
                f"(FSDP2's default), got placements {placements} on a {p.device_mesh.ndim}-D mesh"
            )
        layout = cls(p.device_mesh, placements[0], p.shape[0] if p.dim() else 1, local_backend)
        if p.dim() and local(p).shape[0] != layout.row_counts[layout.rank]:
            raise NotImplementedError(
                f"unexpected row layout: rank {layout.rank} holds {local(p).shape[0]} of {p.shape[0]} rows, "
                f"torch.chunk would give {layout.row_counts[layout.rank]}"
            )
        return layout

    # ---- communication (every collective of the sharded step goes through these two)
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks holding the rows, in place (nothing to do when replicated)."""
        if self.sharded:
            dist.all_reduce(x, group=self.group)
        return x

    def _all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x.contiguous(), group=self.group)
        return out

    # ---- state as DTensors (so torch.distributed.checkpoint can reshard it)
    def rows_of(self, t: torch.Tensor):
        """A DTensor laid out like the parameter from this rank's rows ``t: (m_local, k)``."""
        from torch.distributed.tensor import DTensor

        shape = (self.rows, *t.shape[1:])
        return DTensor.from_local(t, self.mesh, [self.placement], shape=torch.Size(shape), stride=_contiguous(shape))

    def replicated(self, t: torch.Tensor):
        """A replicated DTensor holding ``t`` (the same on every rank)."""
        from torch.distributed.tensor import DTensor, Replicate

        return DTensor.from_local(t, self.mesh, [Replicate()])

    # ---- the backend interface on row shards
    @property
    def name(self) -> str:
        """The local backend's name (the optimizer asks it whether products have a precision)."""
        return self.local_backend.name

    def second_moment(
        self, grads: Sequence[torch.Tensor], q: torch.Tensor, u: torch.Tensor, beta2: float, *,
        eps: float | None = None, precision: str | None = None,
    ):  # fmt: skip
        """``V_t`` of a bucket from this rank's rows: ``grads`` ``B × (m_local, n)``, ``q: (B,
        m_local, K)``, ``u: (B, n, K)`` replicated. The local rows are the local backend's
        operator (the reference one on a rank without rows: kernels take no empty tensors);
        ``precision`` is the Triton products' (``Adapprox(product_precision=…)``)."""
        from .backends import ReferenceBackend

        if grads[0].shape[0] == 0:
            return RowShardedOperator(ReferenceBackend.second_moment(grads, q, u, beta2, eps=eps), self)
        kw = {"precision": precision} if precision is not None else {}
        return RowShardedOperator(self.local_backend.second_moment(grads, q, u, beta2, eps=eps, **kw), self)

    def orthonormalize(self, y: torch.Tensor) -> torch.Tensor:
        """Orthonormal basis of a row-sharded ``y`` (this rank's rows ``(B, m_local, r)``): the
        robust CholeskyQR of :mod:`adapprox_kernels.cholqr` with all-reduced norm and Gram
        matrices (3 passes; a rank-deficient or zero sketch is completed by its fixed basis, as
        on one GPU). Replicated: the single-device orthonormalizer."""
        if not self.sharded:
            return default_orthonormalize(y)
        return cholqr_orthonormalize(y, shards=self)

    def tsqr(self, y: torch.Tensor) -> torch.Tensor:
        """Householder TSQR of a row-sharded ``y``: local QR, all-gather of the ``r×r`` R
        factors, QR of their stack on every rank. The fallback of :meth:`orthonormalize` (for
        non-finite input), as Householder QR is on one device."""
        q_loc, r_loc = torch.linalg.qr(y, mode="reduced")  # (B, m_loc, h), (B, h, r); h = min(m_loc, r)
        width = y.shape[-1]
        send = torch.nn.functional.pad(r_loc, (0, 0, 0, width - r_loc.shape[1]))  # fixed size for transport
        heights = [min(rows, width) for rows in self.row_counts]
        # Strip the transport padding: zero rows would take part in the basis completion.
        stacked = torch.cat([r[:, :h] for r, h in zip(self._all_gather(send), heights, strict=True)], dim=1)
        q_top = torch.linalg.qr(stacked, mode="reduced").Q  # (B, Σh, r); Σh >= r because r <= m
        start = sum(heights[: self.rank])
        return q_loc @ q_top[:, start : start + r_loc.shape[1]]

    def apply_step(
        self, op, params, exp_avgs, *, eps, clip_threshold, lr, beta1, weight_decay, cosine_max_scale,
        residual_factors=None, rounding_keys=None, scalars=None,
    ):  # fmt: skip
        """The clipped update and the weight write on this rank's rows (``params`` and
        ``exp_avgs`` are local views); the RMS and cosine sums are all-reduced. With
        ``residual_factors=(q, u)`` (``q``: this rank's rows) returns ``‖V − q uᵀ‖²`` (``(B,)``).

        Either local operator issues the same all-reduces in the same order (RMS, cosine sums,
        residual), so ranks may differ in which one they run (see :meth:`second_moment`).
        ``rounding_keys``: bf16 stochastic rounding, a key per matrix; each shard mixes its
        first row into them (``reference.shard_keys``). ``scalars``: α, λ and β1 as a tensor in
        a compiled step, as the local backend's ``apply_step`` takes them."""
        local_op = op.local
        if rounding_keys is not None:  # each shard its own bits: element indices are local
            rounding_keys = reference.shard_keys(rounding_keys, self.local_rows.start)
        if not hasattr(local_op, "clipped_update"):  # a fused backend's operator
            return self.local_backend.apply_step(
                local_op, params, exp_avgs, eps=eps, clip_threshold=clip_threshold, lr=lr, beta1=beta1,
                weight_decay=weight_decay, cosine_max_scale=cosine_max_scale, residual_factors=residual_factors,
                reduce=self.all_reduce, **({} if rounding_keys is None else {"rounding_keys": rounding_keys}),
                **({} if scalars is None else {"scalars": scalars}),  # only where the optimizer passes them
            )  # fmt: skip
        resid = local_op.residual_sq_norm(*residual_factors) if residual_factors is not None else None
        upd = op.clipped_update(eps, clip_threshold)  # the RMS all-reduced (RowShardedOperator)
        reference.apply_updates(
            params, upd, exp_avgs, lr=lr, beta1=beta1, weight_decay=weight_decay,
            cosine_max_scale=cosine_max_scale, reduce=self.all_reduce, rounding_keys=rounding_keys, scalars=scalars,
        )  # fmt: skip
        return None if resid is None else self.all_reduce(resid)


def _contiguous(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


class RowShardedOperator:
    """``V`` of a bucket whose rows are split over ranks: a :class:`LinearOperator` for S-RSI.

    ``shape`` is the global ``(B, m, n)``; every ``(B, m, r)`` tensor it takes or returns is this
    rank's rows ``(B, m_local, r)``, every ``(B, n, r)`` one is replicated."""

    def __init__(self, local_op: LinearOperator, shards: RowShards):
        self.local = local_op
        self.shards = shards

    @property
    def shape(self) -> tuple[int, int, int]:
        b, _, n = self.local.shape
        return (b, self.shards.rows, n)

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.local.matmul(x)

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        return self.shards.all_reduce(self.local.rmatmul(y))

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """S-RSI's last ``Vᵀ y``, at the local operator's ``project`` precision where it has one."""
        return self.shards.all_reduce(getattr(self.local, "project", self.local.rmatmul)(y))

    def sq_norm(self) -> torch.Tensor:
        return self.shards.all_reduce(self.local.sq_norm())

    def residual_sq_norm(self, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.shards.all_reduce(self.local.residual_sq_norm(q, u))

    def clipped_update(self, eps: float, clip_threshold: float) -> torch.Tensor:
        """This rank's rows of the clipped update, scaled by the RMS of the whole matrix."""
        return self.local.clipped_update(eps, clip_threshold, reduce=self.shards.all_reduce)


# ------------------------------------------------------------------------------- checkpoints
# Wrappers that torch.distributed.checkpoint.state_dict leaves out of parameter FQNs (the keys of
# get_model_state_dict): (module defining the wrapper, wrapper class, attribute holding the wrapped
# module). torch has no public function for it (its own is private: state_dict._get_fqns).
_WRAPPERS = (
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "module"),
    ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),  # torch.compile
    ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "ActivationWrapper", "_checkpoint_wrapped_module"),
)


def _wrapped_attribute(module: torch.nn.Module) -> str | None:
    """The attribute through which ``module`` wraps another if it is one of :data:`_WRAPPERS`.
    A wrapper's class is looked up only once its module is imported (torch.compile's takes
    seconds): no instance can exist before."""
    for where, cls, attribute in _WRAPPERS:
        mod = sys.modules.get(where)
        if mod is not None and isinstance(module, getattr(mod, cls)):
            return attribute
    return None


def _fqn(model: torch.nn.Module, name: str) -> str:
    """``name`` (of ``model.named_parameters()``) without the wrappers' segments: the FQN that
    ``get_model_state_dict`` gives, so that a model saved compiled, under DDP or with activation
    checkpointing loads into the plain one and back."""
    kept, module = [], model
    for part in name.split("."):
        if part != _wrapped_attribute(module):
            kept.append(part)
        module = getattr(module, part)
    return ".".join(kept)


def _reshard(model: torch.nn.Module) -> None:
    """Registers the sharded parameters of every FSDP2 module of ``model`` (what
    ``get_model_state_dict`` does first). A forward without backward (validation under
    ``no_grad``) leaves the root module's parameters unsharded: plain tensors in
    ``named_parameters()`` that the optimizer does not hold. No communication."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:  # no FSDP2 module exists before it is imported
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


def _named_params(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """``(FQN, parameter)`` in the optimizer's order (the index torch.optim's state dict uses);
    FQNs as :func:`_fqn` makes them. A tied parameter goes by its first name, as in
    ``get_optimizer_state_dict``."""
    _reshard(model)
    names: dict[torch.Tensor, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p, n)
    out = []
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        if p not in names:
            raise ValueError("the optimizer holds a parameter that is not in the model")
        out.append((_fqn(model, names[p]), p))
    return out


def _saved_names(model: torch.nn.Module, named: list[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """Name in a checkpoint -> FQN (of ``named``, :func:`_named_params`' list): the FQN itself,
    or a name older checkpoints used: the parameter's ``named_parameters()`` name with the
    wrappers' segments (``_orig_mod.0.weight``), and for a tied parameter any of its names (they
    keyed it by its last). An FQN wins where names coincide."""
    fqn_of = {p: fqn for fqn, p in named}
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if p in fqn_of:
            names.setdefault(n, fqn_of[p])
            names.setdefault(_fqn(model, n), fqn_of[p])
    return {**names, **{fqn: fqn for fqn, _ in named}}


def optimizer_state_dict(model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """The Adapprox state keyed by parameter FQN, ready for ``torch.distributed.checkpoint.save``.

    Same layout as ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (``state``
    by FQN, ``param_groups`` listing FQNs) plus ``sketch_rng`` (the seed and the generator state
    per device type; identical on every rank). Factors of sharded parameters are DTensors (``Q``
    by rows, ``U`` replicated). Unlike ``get_optimizer_state_dict`` it never runs a step to create
    missing state, and it keeps the sketch RNG."""
    sd = optimizer.state_dict()
    names = [n for n, _ in _named_params(model, optimizer)]
    rng = sd["sketch_rng"]
    return {
        "state": {names[i]: dict(s) for i, s in sd["state"].items()},
        "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]],
        "sketch_rng": {"seed": rng["seed"], **{torch.device(k).type: v for k, v in rng["states"].items()}},
    }


def _load_target(model, optimizer, metadata, key: str) -> dict[str, Any]:
    """What ``dcp.load`` fills: :func:`optimizer_state_dict`'s layout holding exactly the
    checkpoint's entries (``dcp.load`` refuses to fill one the checkpoint lacks): the state at the
    saved shapes (the factors have the saved rank) laid out for this run's sharding, and the saved
    param groups' options (options added since the checkpoint was written are filled from the
    defaults by ``load_state_dict``, as torch.optim does)."""
    saved = metadata.state_dict_metadata
    named = _named_params(model, optimizer)
    params, fqns = dict(named), _saved_names(model, named)
    state, groups, rng = {}, {}, {}
    for k, md in saved.items():
        if not k.startswith(f"{key}."):
            continue
        section, _, rest = k[len(key) + 1 :].partition(".")
        if section == "state":
            fqn, name = rest.rsplit(".", 1)  # state names have no dots, FQNs may
            if fqn not in fqns:
                raise ValueError(f"the checkpoint has optimizer state for {fqn!r}, not a parameter of this optimizer")
            p = params[fqns[fqn]]
            state.setdefault(fqn, {})[name] = _empty_like_saved(p, name, md) if hasattr(md, "size") else 0
        elif section == "param_groups":
            index, name = rest.split(".", 1)
            groups.setdefault(int(index), {})[name] = _placeholder(md)
        elif section == "sketch_rng":
            rng[rest] = _placeholder(md)
    if not groups:  # every optimizer has a param group: a model-only checkpoint, or another key
        tops = sorted({k.split(".", 1)[0] for k in saved})
        raise ValueError(
            f"the checkpoint has no optimizer state under key={key!r} (its top-level keys: {tops}); pass the key "
            "that optimizer_state_dict(...) was saved under"
        )
    _check_group_count(len(groups), optimizer)
    return {"state": state, "param_groups": [groups[i] for i in range(len(groups))], "sketch_rng": rng}


def _placeholder(md) -> torch.Tensor | None:
    """What ``dcp.load`` fills with a saved entry: a tensor of its size and dtype, or None for
    any other object (which it replaces)."""
    return torch.empty(md.size, dtype=md.properties.dtype) if hasattr(md, "size") else None


def _check_group_count(saved: int, optimizer) -> None:
    """``ValueError`` unless the checkpoint has ``saved`` param groups as the optimizer does."""
    if saved != len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {saved} param groups, the optimizer {len(optimizer.param_groups)}")


def _empty_like_saved(p: torch.Tensor, name: str, md) -> torch.Tensor:
    """A zero tensor of the saved global size and dtype, laid out for ``p`` in this run."""
    size, dtype = tuple(md.size), md.properties.dtype
    shards = RowShards.of(p)
    if shards is None:
        return torch.zeros(size, dtype=dtype, device=p.device)
    device = local(p).device
    if name in ROW_SHARDED_STATE:
        rows = shards.row_counts[shards.rank] if shards.sharded else size[0]
        return shards.rows_of(torch.zeros(rows, *size[1:], dtype=dtype, device=device))
    return shards.replicated(torch.zeros(size, dtype=dtype, device=device))


def load_optimizer_state_dict(model: torch.nn.Module, optimizer, state_dict: dict[str, Any]) -> None:
    """Load :func:`optimizer_state_dict`'s layout (FQN keys) into ``optimizer``, matching
    parameters by FQN; the sketch RNG state goes to this rank's device of the saved type.
    Without a sketch RNG (``get_optimizer_state_dict``'s layout) the optimizer keeps its own,
    with a warning: the state resumes, the sketches differ from the uninterrupted run's.

    DTensor state is taken as this rank's (as :func:`optimizer_state_dict` or ``dcp.load`` in
    this process give it): a dict that another rank wrote with ``torch.save`` would load its
    shards here."""
    named = _named_params(model, optimizer)
    position = {n: i for i, (n, _) in enumerate(named)}
    # By the saved name: an FQN, or an older checkpoint's name with the wrappers' segments.
    fqns = _saved_names(model, named)
    index = {saved: position[fqn] for saved, fqn in fqns.items()}
    groups = state_dict["param_groups"]
    _check_group_count(len(groups), optimizer)
    new_groups, offset = [], 0
    for saved, group in zip(groups, optimizer.param_groups, strict=True):
        mine = [n for n, _ in named[offset : offset + len(group["params"])]]
        if sorted(fqns.get(n, n) for n in saved["params"]) != sorted(mine):
            raise ValueError(f"param group parameters differ: checkpoint {saved['params']}, optimizer {mine}")
        # The saved names are in the checkpoint's order: this optimizer's own (if any) stay.
        options = {k: v for k, v in saved.items() if k != "param_names"}
        new_groups.append(dict(options, params=[index[n] for n in mine]))
        offset += len(group["params"])
    unknown = [n for n in state_dict["state"] if n not in index]
    if unknown:  # as _load_target says it (a KeyError naming only the FQN before)
        raise ValueError(f"the checkpoint has optimizer state for {unknown[0]!r}, not a parameter of this optimizer")
    loaded = {
        "state": {index[n]: s for n, s in state_dict["state"].items()},
        "param_groups": new_groups,
        "dtensor_rank": process_rank(),
    }
    rng = dict(state_dict.get("sketch_rng") or {})
    if "seed" in rng:
        seed = rng.pop("seed")
        devices = {str(local(p).device) for _, p in named}
        states = {dev: rng[torch.device(dev).type] for dev in devices if torch.device(dev).type in rng}
        loaded["sketch_rng"] = {"seed": seed, "states": states}
    optimizer.load_state_dict(loaded)  # without it, that warns: the sketches will differ


def load_optimizer_state(
    model: torch.nn.Module, optimizer, checkpoint_id=None, *, storage_reader=None, key: str = "optim"
) -> None:
    """Load the optimizer part (``key``) of a ``torch.distributed.checkpoint`` written with
    ``{key: optimizer_state_dict(model, optimizer)}``, on any number of ranks (resharding), or in
    a single process without a process group. ``checkpoint_id``: the folder, unless a
    ``storage_reader`` is given."""
    import torch.distributed.checkpoint as dcp

    if storage_reader is None:
        if checkpoint_id is None:  # else os.fspath(None) deep in the reader: a TypeError naming neither
            raise TypeError("load_optimizer_state needs the checkpoint's folder (checkpoint_id) or a storage_reader")
        storage_reader = dcp.FileSystemReader(checkpoint_id)
    target = {key: _load_target(model, optimizer, storage_reader.read_metadata(), key)}
    dcp.load(target, checkpoint_id=checkpoint_id, storage_reader=storage_reader)
    load_optimizer_state_dict(model, optimizer, target[key])


__all__ = [
    "CollectiveLog",
    "RowShardedOperator",
    "RowShards",
    "check_same_seed",
    "chunk_rows",
    "group_size",
    "is_dtensor",
    "load_optimizer_state",
    "load_optimizer_state_dict",
    "local",
    "log_collectives",
    "nonfinite_flags",
    "optimizer_state_dict",
    "process_rank",
    "shared_seed",
]
