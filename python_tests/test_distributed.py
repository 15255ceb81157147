"""Adapprox under torch.distributed on CPU (gloo): FSDP2 row shards, DDP, distributed checkpoints.

The workers run in processes spawned on loopback; they only compute and write their results, and
the checks run here, against the plain single-process optimizer: FSDP2 on any number of ranks
must reproduce its parameters, its factors (up to column signs, which CholeskyQR and Householder
QR choose differently) and exactly its ranks, all ranks sharing one Gaussian sketch.

One 2-rank spawn (module fixture) serves the default tests; 4 ranks are ``slow``.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from compiled_step import graphs_per_step
from torch import nn

from adapprox_kernels import AdaMeM, Adapprox, DenseOperator
from adapprox_kernels.backends import ReferenceBackend
from adapprox_kernels.cholqr import cholqr_orthonormalize
from adapprox_kernels.distributed import (
    RowShards,
    chunk_rows,
    load_optimizer_state,
    load_optimizer_state_dict,
    local,
    log_collectives,
    nonfinite_flags,
    optimizer_state_dict,
)
from adapprox_kernels.reference import clipped_update, second_moment
from adapprox_kernels.srsi import srsi
from adapprox_kernels.state_report import held_bytes, tensor_bytes

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")

STEPS = 6
SAVE_AT = 3  # the checkpoint holds the state after this many steps
BATCH = 8
SEED = 1234


# --------------------------------------------------------------------------- the training run
def _model() -> nn.Sequential:
    """Uneven and empty shards: 13 rows on 2 ranks are 7 + 6, on 4 ranks 4,4,4,1; the 1-row head
    leaves every rank but the first with nothing."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 13), nn.Tanh(), nn.Linear(13, 1))


# The options of the two param groups (layer 2's is the second) and those common to both.
GROUP_OPTIONS = (
    {"cosine_guidance": True},
    {"betas": (0.0, 0.999, 0.5), "warm_start": True, "rank_policy": "sigmoid", "rank_interval": 2},
)
OPTIONS = dict(
    lr=1e-2, betas=(0.9, 0.999, 0.5), k_init=2, k_max=5, oversample=2, power_iters=3, exact_small_matrices=False,
    xi_thresh=0.01,
)  # fmt: skip


def _groups(model: nn.Module) -> list[dict]:
    """:func:`_optimizer`'s param groups: layer 2's parameters and the others."""
    named = dict(model.named_parameters())
    first = [p for n, p in named.items() if not n.startswith("2.")]
    second = [p for n, p in named.items() if n.startswith("2.")]
    return [{"params": first, **GROUP_OPTIONS[0]}, {"params": second, **GROUP_OPTIONS[1]}]


def _optimizer(model: nn.Module, seed: int | None = SEED, backend: str = "auto", **options) -> Adapprox:
    """Two groups covering both rank policies, momentum with cosine guidance, warm starts, and
    a factored 1×13 matrix (exact_small_matrices=False)."""
    return Adapprox(_groups(model), **OPTIONS, seed=seed, backend=backend, **options)


def _loss(model: nn.Module, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Step ``step``'s batch, this rank's equal slice of it (FSDP2 and DDP average gradients),
    in the model's dtype."""
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(BATCH, 16, generator=gen), torch.randn(BATCH, 1, generator=gen)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    dtype = next(model.parameters()).dtype
    return nn.functional.mse_loss(model(x[rows].to(dtype)).float(), y[rows])


def _train(model, opt, steps, rank=0, world=1, after_step=None) -> list:
    """Train; returns the collectives each ``opt.step()`` issued."""
    logs = []
    for step in steps:
        _loss(model, step, rank, world).backward()
        with log_collectives() as log:
            opt.step()
        opt.zero_grad()
        logs.append(log.records)
        if after_step is not None:
            after_step(step)
    return logs


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _snapshot(model, opt) -> dict:
    """Whole parameters and state (gathered outside the measured steps)."""
    snap = {"params": {n: _full(p).detach().clone() for n, p in model.named_parameters()}, "state": {}}
    for n, p in model.named_parameters():
        snap["state"][n] = {k: _full(v).clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
    return snap


def _plain_run(steps, seed=SEED) -> dict:
    model = _model()
    opt = _optimizer(model, seed)
    _train(model, opt, steps)
    return _snapshot(model, opt)


@contextmanager
def _single_gpu_orthonormalizer():
    """The single-process optimizer with the orthonormalizer it uses on a GPU (the robust
    CholeskyQR, which the row-sharded path runs with all-reduced Gram matrices) instead of the
    CPU's Householder QR."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ReferenceBackend, "orthonormalize", staticmethod(cholqr_orthonormalize))
        patch.setattr(
            ReferenceBackend, "orthonormalize_unchecked", staticmethod(lambda y: (cholqr_orthonormalize(y), None))
        )
        yield


@pytest.fixture(scope="module")
def reference_run() -> dict:
    """The oracle: one process, same algorithm (including the orthonormalizer)."""
    with _single_gpu_orthonormalizer():
        return _plain_run(range(STEPS))


def _assert_same_run(got: dict, want: dict, rtol=2e-4, atol=2e-6, columns=True) -> None:
    """Same parameters, moments, steps and ranks (exactly); ξ and the factors: with ``columns``,
    Q and U column by column (up to signs), else only their product Q Uᵀ."""
    for name, p in want["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=rtol, atol=atol, msg=f"parameter {name}")
    for name, s in want["state"].items():
        g = got["state"][name]
        assert set(g) == set(s), name
        for key, v in s.items():
            if key in ("Q", "U"):
                continue
            if torch.is_tensor(v):
                # Moments of the update (RMS ~1): rounding of the gradient reductions moves small
                # entries of G/√V by ~1e-5 of the largest, so the tolerance scales with the tensor.
                scale = atol + 1e-4 * v.abs().max().item()
                torch.testing.assert_close(g[key], v, rtol=rtol, atol=scale, msg=f"{name}.{key}")
            elif key == "xi":
                assert g[key] == pytest.approx(v, rel=1e-3 if columns else 1e-2, abs=1e-6), f"{name}.xi"
            else:
                assert g[key] == v, f"{name}.{key}: {g[key]} != {v}"  # step, rank: exactly
        if "Q" in s:
            q, u, q_ref, u_ref = g["Q"], g["U"], s["Q"], s["U"]
            assert q.shape == q_ref.shape and u.shape == u_ref.shape, name
            torch.testing.assert_close(q @ u.T, q_ref @ u_ref.T, rtol=rtol, atol=atol, msg=f"{name}: Q Uᵀ")
            if not columns:
                continue
            signs = torch.sign((q * q_ref).sum(0))
            torch.testing.assert_close(q * signs, q_ref, rtol=1e-3, atol=1e-4, msg=f"{name}: Q")
            torch.testing.assert_close(u * signs, u_ref, rtol=1e-3, atol=1e-4, msg=f"{name}: U")


# ------------------------------------------------------------------------------ process set-up
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    """``fn(rank, world, port, *args)`` on ``world`` processes. A process killed by a signal is
    retried once, on a new port: on the 2-core CI machine a gloo rank has rarely (2 runs in ~25
    of this file) aborted with "terminate called without an active exception", in no
    particular job. An error the code raises, or a crash that repeats, still fails."""
    try:
        mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)
    except mp.ProcessExitedException as crash:
        if crash.signal_name is None:
            raise
        warnings.warn(f"a rank ended by {crash.signal_name}; running the ranks again", RuntimeWarning, stacklevel=2)
        mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


def _fsdp(
    world: int, backend: str = "auto", dtype: torch.dtype = torch.float32, **options
) -> tuple[nn.Module, Adapprox]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model().to(dtype)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, _optimizer(model, backend=backend, **options)


def _fsdp_job(rank, world, out, first, last, save_at=None, load=None, backend="auto", **options) -> None:
    """FSDP2 training of steps ``first..last-1`` (after loading checkpoint ``load``); saves a
    checkpoint after step ``save_at``; rank 0 writes the snapshot, collective logs, state report
    and held bytes to ``out``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model, opt = _fsdp(world, backend, **options)
    if load is not None:
        sd = {"model": get_model_state_dict(model)}
        dcp.load(sd, checkpoint_id=load)
        set_model_state_dict(model, sd["model"])
        load_optimizer_state(model, opt, load)

    def save(step):
        if step + 1 == save_at:
            sd = {"model": get_model_state_dict(model), "optim": optimizer_state_dict(model, opt)}
            dcp.save(sd, checkpoint_id=os.path.join(os.path.dirname(out), "ckpt"))

    logs = _train(model, opt, range(first, last), rank, world, save)
    snap = _snapshot(model, opt)
    if rank == 0:
        report = opt.state_report()
        tensors = [local(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        torch.save(
            {
                "snapshot": snap, "logs": logs, "report": str(report), "state_bytes": report.state_bytes,
                "held": _attempt(held_bytes, opt), "local_bytes": sum(t.numel() * t.element_size() for t in tensors),
            },
            out,
        )  # fmt: skip


def _operator_job(rank, world, out) -> None:
    """The sharded operator, S-RSI and the orthonormalizer on fixed inputs (same on every rank);
    each rank writes its rows of the outputs and the collectives it issued."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(7)
    b, m, n, k = 2, 11, 9, 3
    g, q, u = (torch.randn(b, rows, cols, generator=gen) for rows, cols in ((m, n), (m, k), (n, k)))
    x, y = torch.randn(b, n, 4, generator=gen), torch.randn(b, m, 4, generator=gen)
    q2, u2 = torch.randn(b, m, 2, generator=gen), torch.randn(b, n, 2, generator=gen)

    def rows_of(total):
        counts = chunk_rows(total, world)
        start = sum(counts[:rank])
        return slice(start, start + counts[rank])

    shards = RowShards(mesh, Shard(0), m)
    r = rows_of(m)
    op = shards.second_moment(list(g[:, r]), q[:, r], u, 0.9)
    res = {
        "inputs": {"g": g, "q": q, "u": u, "x": x, "y": y, "q2": q2, "u2": u2},
        "matmul": op.matmul(x),
        "rmatmul": op.rmatmul(y[:, r]),
        "sq_norm": op.sq_norm(),
        "residual": op.residual_sq_norm(q2[:, r], u2),
        "clipped": op.clipped_update(1e-8, 0.5),
        "shape": op.shape,
    }
    res["srsi_q"], res["srsi_u"] = srsi(op, 3, 2, 3, torch.Generator().manual_seed(3), shards.orthonormalize)

    a, c = torch.randn(13, generator=gen), torch.randn(13, generator=gen)
    cases = {
        "random": torch.randn(1, 13, 5, generator=gen),
        "ill": torch.randn(1, 13, 5, generator=gen) @ torch.diag(torch.logspace(0, -5, 5)),
        "deficient": torch.stack([a, a, torch.zeros(13), c, a + c], dim=1)[None],
        "zero": torch.zeros(2, 13, 5),
        "short": torch.randn(1, 5, 4, generator=gen),  # 5 rows: 3,2 on 2 ranks (2,2,1,0 on 4) < 4 columns
        "short_zero": torch.zeros(1, 5, 4),
        "nonfinite": torch.stack([torch.randn(13, 5, generator=gen), torch.full((13, 5), float("nan"))]),
    }
    for name, full in cases.items():
        sh = RowShards(mesh, Shard(0), full.shape[1])
        mine = full[:, rows_of(full.shape[1])]
        with log_collectives() as log:
            res[f"orth_{name}"] = sh.orthonormalize(mine)
        res[f"orth_{name}_ops"] = log.records
        res[f"tsqr_{name}"] = sh.tsqr(mine)
    res["cases"] = cases
    # A bad entry in the last rank's rows only: every rank must skip (or raise) alike.
    from torch.distributed.tensor import DTensor

    bad_rows = torch.zeros(m, n)
    bad_rows[-1, 0] = float("nan")
    res["nonfinite_flags"] = nonfinite_flags(
        [DTensor.from_local(full[r], mesh, [Shard(0)]) for full in (bad_rows, torch.ones(m, n), 3 * torch.ones(m, n))],
        [2.0] * 3,
    )
    torch.save(res, f"{out}.{rank}")


def _comm_job(rank, world, out) -> None:
    """One step on a single tall DTensor weight per size: the collectives of the step; and a
    replicated DTensor weight."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    logs = {}
    for m in (256, 1024):
        gen = torch.Generator().manual_seed(m)
        w = nn.Parameter(distribute_tensor(torch.randn(m, 32, generator=gen), mesh, [Shard(0)]))
        w.grad = distribute_tensor(torch.randn(m, 32, generator=gen), mesh, [Shard(0)])
        opt = Adapprox([w], k_init=4, k_max=4, oversample=2, power_iters=5, seed=SEED)
        with log_collectives() as log:
            opt.step()
        logs[m] = log.records
    gen = torch.Generator().manual_seed(5)
    w = nn.Parameter(distribute_tensor(torch.randn(64, 32, generator=gen), mesh, [Replicate()]))
    w.grad = distribute_tensor(torch.randn(64, 32, generator=gen), mesh, [Replicate()])
    opt = Adapprox([w], k_init=4, k_max=4, oversample=2, seed=SEED)
    with log_collectives() as log:
        opt.step()
    replicated = {"w": w.to_local(), "Q": opt.state[w]["Q"].to_local(), "records": log.records}
    if rank == 0:
        torch.save({"logs": logs, "replicated": replicated}, out)


def _ddp_job(rank, world, out) -> None:
    """DDP, untouched optimizer; each rank's global RNG differs, the default seed is shared."""
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    ddp = DistributedDataParallel(model)
    torch.manual_seed(1000 + rank)
    opt = _optimizer(model, seed=None)
    logs = _train(ddp, opt, range(STEPS), rank, world)
    names = sorted(optimizer_state_dict(ddp, opt)["state"])  # of the wrapper: "module." is no part of an FQN
    torch.save({"snapshot": _snapshot(model, opt), "seed": opt._seed, "logs": logs, "names": names}, f"{out}.{rank}")


ADAMEM_OPTIONS = dict(lr=1e-2, rank=2, update_proj_gap=2, oversample=2, power_iters=2)


def _zero_setup(cls, model: nn.Module) -> tuple[list[dict], dict]:
    """The param groups and options ZeRO hands ``cls``: :func:`_optimizer`'s for Adapprox, one
    group for AdaMeM; seed ``SEED``."""
    if cls is Adapprox:
        return _groups(model), dict(OPTIONS, seed=SEED)
    return [{"params": list(model.parameters())}], dict(ADAMEM_OPTIONS, seed=SEED)


def _zero_job(rank, world, out) -> None:
    """ZeRO-1: ``ZeroRedundancyOptimizer(optimizer_class=Adapprox)`` on a DDP model, steps
    0..SAVE_AT-1; ``consolidate_state_dict(to=0)``, rank 0 saves ``state_dict()``, every rank
    loads it and steps on to STEPS ("continued"). The checkpoint resumed by a new model and
    ZeRO optimizer, as a new process would ("new"), and by one that then also loads this rank's
    own ``zero.optim.state_dict()`` ("own"). AdaMeM, STEPS steps. Per run, each rank writes its
    partition (names per param group), the parameters and the state its optimizer holds."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    def make(cls, model_state=None):
        model = _model()
        if model_state is not None:
            model.load_state_dict(model_state)
        ddp = DistributedDataParallel(model)
        groups, options = _zero_setup(cls, model)
        return model, ddp, ZeroRedundancyOptimizer(groups, optimizer_class=cls, **options)

    def held(model, zero):
        names = {p: n for n, p in model.named_parameters()}
        return {
            "partition": [[names[p] for p in group["params"]] for group in zero.optim.param_groups],
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state": {
                names[p]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                for p, s in zero.optim.state.items() if s
            },
        }  # fmt: skip

    ckpt, res = f"{out}.ckpt", {}
    model, ddp, zero = make(Adapprox)
    _train(ddp, zero, range(SAVE_AT), rank, world)
    zero.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": model.state_dict(), "optim": zero.state_dict()}, ckpt)
    torch.save(zero.optim.state_dict(), f"{ckpt}.{rank}")  # this rank's partition, with its sketch RNG
    dist.barrier()
    saved = torch.load(ckpt, weights_only=False)
    res["saved keys"] = sorted(saved["optim"])
    # (ZeRO's load_state_dict empties the other ranks' entries of the dict it is given: a new copy each time.)
    zero.load_state_dict(torch.load(ckpt, weights_only=False)["optim"])
    _train(ddp, zero, range(SAVE_AT, STEPS), rank, world)
    res["continued"] = held(model, zero)
    for how in ("new", "own"):
        model, ddp, zero = make(Adapprox, saved["model"])
        zero.load_state_dict(torch.load(ckpt, weights_only=False)["optim"])
        if how == "own":
            zero.optim.load_state_dict(torch.load(f"{ckpt}.{rank}", weights_only=False))
        _train(ddp, zero, range(SAVE_AT, STEPS), rank, world)
        res[how] = held(model, zero)
    model, ddp, zero = make(AdaMeM)
    _train(ddp, zero, range(STEPS), rank, world)
    res["adamem"] = held(model, zero)
    torch.save(res, f"{out}.{rank}")


def _triton_shards_job(rank, world, out) -> None:
    """FSDP2 with the Triton backend on each rank's rows (the interpreter on CPU), with
    ``product_precision="tf32_range"`` (exact fp32 under the interpreter); counts the sharded
    steps that ran the fused update kernels, and records the precisions the operators got and
    how many last products went through ``project``."""
    from adapprox_kernels.triton_backend import TritonBackend, TritonSecondMoment

    fused, precisions, projected = [], set(), []
    real_apply, real_build, real_project = (
        TritonBackend.apply_step,
        TritonBackend.second_moment,
        TritonSecondMoment.project,
    )

    def counting(op, *args, reduce=None, **kwargs):
        fused.append(reduce is not None)
        return real_apply(op, *args, reduce=reduce, **kwargs)

    def building(*args, precision=None, **kwargs):
        precisions.add(precision)
        return real_build(*args, precision=precision, **kwargs)

    def projecting(self, y):
        projected.append(y.shape)
        return real_project(self, y)

    TritonBackend.apply_step, TritonBackend.second_moment = staticmethod(counting), staticmethod(building)
    TritonSecondMoment.project = projecting
    try:
        _fsdp_job(rank, world, out, 0, STEPS, backend="triton", product_precision="tf32_range")
    finally:
        TritonBackend.apply_step, TritonBackend.second_moment = staticmethod(real_apply), staticmethod(real_build)
        TritonSecondMoment.project = real_project
    torch.save({"fused": sum(fused), "precisions": precisions, "projected": len(projected)}, f"{out}.fused.{rank}")


def _bf16_rounding_job(rank, world, out) -> None:
    """FSDP2 on bf16 weights with ``bf16_stochastic_round``, ``SAVE_AT`` steps: per step, the
    fp32 rows of each parameter this rank rounded (what ``reference.stochastic_round_bf16``
    got) and the bf16 rows it held after the step."""
    from adapprox_kernels import reference

    model, opt = _fsdp(world, "reference", dtype=torch.bfloat16, bf16_stochastic_round=True)
    # Each bucket holds one parameter and its local shape is unique: the shape names it.
    name_of = {(1, *local(p).shape): n for n, p in model.named_parameters()}
    assert len(name_of) == len(list(model.parameters()))
    real, calls, steps = reference.stochastic_round_bf16, [], []

    def recording(x, keys, *args, **kwargs):
        calls.append((name_of[tuple(x.shape)], x.clone()))
        return real(x, keys, *args, **kwargs)

    def after_step(step):
        held = {n: local(p).detach().clone() for n, p in model.named_parameters()}
        steps.append({"rounded": list(calls), "held": held})
        calls.clear()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference, "stochastic_round_bf16", recording)
        _train(model, opt, range(SAVE_AT), rank, world, after_step)
    torch.save(steps, f"{out}.{rank}")


MIXED_SHAPE = (12, 10)


def _mixed_run(placements, mesh=None, grouped=False) -> list[dict]:
    """``STEPS`` steps of same-shaped weights, one per placement (None: a plain tensor), in one
    param group (or, with ``grouped``, each in a group of its own: the order in which the
    buckets of one group draw their sketches); each weight's whole value, rank and ξ after."""
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(11)
    params = []
    for placement in placements:
        tensors = [torch.randn(MIXED_SHAPE, generator=gen) for _ in range(STEPS + 1)]  # the weight, its gradients
        if placement is not None:
            tensors = [distribute_tensor(t, mesh, [placement]) for t in tensors]
        params.append((nn.Parameter(tensors[0]), tensors[1:]))
    groups = [{"params": [w]} for w, _ in params] if grouped else [w for w, _ in params]
    opt = Adapprox(
        groups, lr=1e-2, k_init=2, k_max=4, oversample=2, power_iters=3, exact_small_matrices=False, seed=SEED
    )
    for step in range(STEPS):
        for w, grads in params:
            w.grad = grads[step]
        opt.step()
    return [{"w": _full(w).detach(), "rank": opt.state[w]["rank"], "xi": opt.state[w]["xi"]} for w, _ in params]


def _attempt(fn, *args):
    """``fn(*args)``, or the error it raised as text, for the test to report (raised in a
    worker, it would end the whole spawn)."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - reported to the test, whatever it is
        return f"{type(err).__name__}: {err}"


def _mixed_layout_job(rank, world, out) -> None:
    """Same-shaped Replicate(), Shard(0) and plain weights in one param group (each layout is a
    bucket of its own)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    torch.save(_attempt(_mixed_run, [Replicate(), Shard(0), None], mesh), f"{out}.{rank}")


def _eval_checkpoint_job(rank, world, out, ckpt) -> None:
    """Checkpointing after a forward without backward (validation) on a model sharded at the
    root only (FSDP2 leaves the root's parameters unsharded then): ``optimizer_state_dict``
    before ``get_model_state_dict`` does anything, then ``load_optimizer_state`` of ``ckpt``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = _optimizer(model)
    _train(model, opt, range(1), rank, world)

    def validate():
        with torch.no_grad():
            _loss(model, 0, rank, world)

    def load():
        load_optimizer_state(model, opt, ckpt)
        return [s["step"] for s in opt.state.values()]

    validate()
    saved = _attempt(lambda: sorted(optimizer_state_dict(model, opt)["state"]))
    validate()
    loaded = _attempt(load)
    _train(model, opt, range(SAVE_AT, SAVE_AT + 1), rank, world)  # training goes on
    torch.save({"saved": saved, "loaded": loaded}, f"{out}.{rank}")


def _plain_state_dict_job(rank, world, out) -> None:
    """A plain ``opt.state_dict()`` under FSDP2 (with ``torch.save``), loaded into the same
    model and optimizer: each rank its own, each rank rank 0's, and a single process's."""
    model, opt = _fsdp(world)
    _train(model, opt, range(1), rank, world)
    torch.save(opt.state_dict(), f"{out}.{rank}")
    dist.barrier()
    plain_model = _model()
    plain_opt = _optimizer(plain_model)
    _train(plain_model, plain_opt, range(1))

    def load(state_dict):
        _optimizer(model).load_state_dict(state_dict)
        return "loaded"

    res = {
        "own": _attempt(load, torch.load(f"{out}.{rank}", weights_only=False)),
        "rank 0's": _attempt(load, torch.load(f"{out}.0", weights_only=False)),
        "single process's": _attempt(load, plain_opt.state_dict()),
    }
    torch.save(res, f"{out}.res.{rank}")


def _early_optimizers(rank: int) -> list[tuple[nn.Module, Adapprox]]:
    """Made before the process group exists, with ``seed=None``: each rank draws its own seed
    (from a global RNG seeded per rank, as per-rank augmentation does)."""
    models = [_model(), _model()]
    torch.manual_seed(1000 + rank)
    return [(model, _optimizer(model, seed=None)) for model in models]


def _late_group_job(rank, world, out, early) -> None:
    """:func:`_early_optimizers`' two, once the process group exists: the first steps; the second
    first loads a state dict saved with ``seed=SEED``. Their seeds and first steps' collectives."""
    (model, opt), (loading_model, loading) = early
    drawn = opt._seed
    logs = _train(model, opt, range(1), rank, world)
    saved_model = _model()
    saved = _optimizer(saved_model)
    _train(saved_model, saved, range(1))
    loading.load_state_dict(saved.state_dict())
    loaded_logs = _train(loading_model, loading, range(1, 2), rank, world)
    res = {"drawn": drawn, "seed": opt._seed, "logs": logs, "loaded": loading._seed, "loaded_logs": loaded_logs}
    torch.save(res, f"{out}.{rank}")


def _seed_check_job(rank, world, out) -> None:
    """Per-rank seeds (``SEED + rank``) with a DTensor parameter, given to the constructor and to
    ``add_param_group``; the same seed; per-rank seeds with plain parameters (DDP); per-rank
    seeds with DTensor parameters the optimizer refuses anyway (AdaMeM's, a ``Shard(1)`` one)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    w = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
    columns = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(1)]))

    def construct(seed):
        Adapprox([w], seed=seed)
        return "constructed"

    with log_collectives() as log:
        opt = Adapprox([nn.Parameter(torch.randn(8, 4))], seed=SEED + rank)
    res = {
        "constructor": _attempt(construct, SEED + rank),
        "add_param_group": _attempt(opt.add_param_group, {"params": [w]}),
        "groups": len(opt.param_groups),
        "same seed": _attempt(construct, SEED),
        "plain": log.records,
    }
    with log_collectives() as log:
        res["refused"] = [
            _attempt(lambda: AdaMeM([w], rank=2, seed=SEED + rank)),
            _attempt(lambda: Adapprox([columns], seed=SEED + rank)),
        ]
    res["refused collectives"] = log.records
    torch.save(res, f"{out}.{rank}")


def _init_group(rank: int, world: int, port: int) -> None:
    # A bounded timeout: ranks that disagree (a bug) then fail a collective instead of hanging.
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )


def _two_rank_worker(rank, world, port, tmp) -> None:
    torch.set_num_threads(1)
    early = _early_optimizers(rank)
    _init_group(rank, world, port)
    try:
        _fsdp_job(rank, world, os.path.join(tmp, "fsdp.pt"), 0, STEPS, save_at=SAVE_AT)
        _late_group_job(rank, world, os.path.join(tmp, "late_group.pt"), early)
        _seed_check_job(rank, world, os.path.join(tmp, "seed_check.pt"))
        _bf16_rounding_job(rank, world, os.path.join(tmp, "bf16_rounding.pt"))
        if _triton_on_cpu():
            _triton_shards_job(rank, world, os.path.join(tmp, "fsdp_triton.pt"))
        _operator_job(rank, world, os.path.join(tmp, "operator.pt"))
        _comm_job(rank, world, os.path.join(tmp, "comm.pt"))
        _ddp_job(rank, world, os.path.join(tmp, "ddp.pt"))
        _eval_checkpoint_job(rank, world, os.path.join(tmp, "eval_ckpt.pt"), os.path.join(tmp, "ckpt"))
        _plain_state_dict_job(rank, world, os.path.join(tmp, "plain_sd.pt"))
        _zero_job(rank, world, os.path.join(tmp, "zero.pt"))
        _mixed_layout_job(rank, world, os.path.join(tmp, "mixed.pt"))  # last: a failure may leave ranks apart
    finally:
        dist.destroy_process_group()


def _four_rank_worker(rank, world, port, tmp, ckpt) -> None:
    torch.set_num_threads(1)
    _init_group(rank, world, port)
    try:
        _fsdp_job(rank, world, os.path.join(tmp, "fsdp.pt"), 0, STEPS)
        _fsdp_job(rank, world, os.path.join(tmp, "resumed.pt"), SAVE_AT, STEPS, load=ckpt)
        _operator_job(rank, world, os.path.join(tmp, "operator.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_ranks")
    _spawn(_two_rank_worker, 2, str(tmp))
    return tmp


def _per_rank(path, world=2) -> list:
    return [torch.load(f"{path}.{r}", weights_only=False) for r in range(world)]


# ------------------------------------------------------------------------------------ tests
def test_fsdp2_two_ranks_matches_single_process(two_ranks, reference_run):
    got = torch.load(two_ranks / "fsdp.pt", weights_only=False)
    _assert_same_run(got["snapshot"], reference_run)
    # Against the CPU default (Householder QR): columns inside near-equal singular values differ
    # (warm starts with one iteration do not separate them), everything the step uses agrees.
    _assert_same_run(got["snapshot"], _plain_run(range(STEPS)), columns=False)
    ranks = {n: s["rank"] for n, s in reference_run["state"].items() if "rank" in s}
    assert ranks["0.weight"] != 2.0 and ranks["2.weight"] != 2.0, "the test should see ranks move"


def _triton_on_cpu() -> bool:
    """The Triton kernels can run on CPU tensors here (the interpreter: no GPU)."""
    from adapprox_kernels.triton_backend import TritonBackend

    return TritonBackend.available(torch.device("cpu")) is None


def test_fsdp2_triton_on_row_shards_matches_single_process(two_ranks, reference_run):
    """Item 4 of the distributed issue: the fused kernels on each rank's rows (rank 1 holds no
    row of the 1-row head, so it runs the reference operator there while rank 0 runs the
    kernels: both issue the same collectives)."""
    if not (two_ranks / "fsdp_triton.pt").exists():
        pytest.skip("the Triton kernels cannot run on CPU tensors here (a GPU machine: no interpreter)")
    got = torch.load(two_ranks / "fsdp_triton.pt", weights_only=False)
    _assert_same_run(got["snapshot"], reference_run)
    counts = _per_rank(two_ranks / "fsdp_triton.pt.fused")
    # Per step: three factored matrices on rank 0, two on rank 1 (no rows of the head).
    assert [c["fused"] for c in counts] == [3 * STEPS, 2 * STEPS], counts
    # product_precision reaches the kernels on the rows, and S-RSI's last product is `project`.
    assert all(c["precisions"] == {"tf32_range"} for c in counts), counts
    assert [c["projected"] for c in counts] == [3 * STEPS, 2 * STEPS], counts


def test_sharded_operator_matches_dense(two_ranks):
    _check_operator(_per_rank(two_ranks / "operator.pt"))


def _check_operator(res):
    g, q, u, x, y, q2, u2 = (res[0]["inputs"][key] for key in ("g", "q", "u", "x", "y", "q2", "u2"))
    v = second_moment(g, q, u, 0.9)
    dense = DenseOperator(v)

    def rows(key):
        return torch.cat([r[key] for r in res], dim=1)

    torch.testing.assert_close(rows("matmul"), dense.matmul(x))
    torch.testing.assert_close(rows("clipped"), clipped_update(g, v, 1e-8, 0.5))
    for r in res:  # replicated results: every rank has the whole, identical
        assert r["shape"] == (2, 11, 9)  # global: S-RSI sizes its sketch by it on every rank alike
        torch.testing.assert_close(r["rmatmul"], dense.rmatmul(y))
        torch.testing.assert_close(r["sq_norm"], dense.sq_norm())
        torch.testing.assert_close(r["residual"], dense.residual_sq_norm(q2, u2))
        assert torch.equal(r["srsi_u"], res[0]["srsi_u"])
    q_ref, u_ref = srsi(dense, 3, 2, 3, torch.Generator().manual_seed(3))
    torch.testing.assert_close(rows("srsi_q") @ res[0]["srsi_u"].mT, q_ref @ u_ref.mT, rtol=1e-4, atol=1e-5)


def test_a_bad_gradient_on_one_ranks_rows_is_flagged_on_every_rank(two_ranks):
    # NaN on the last rank's rows; entries of 1 within the limit of 2, entries of 3 above it.
    assert [r["nonfinite_flags"] for r in _per_rank(two_ranks / "operator.pt")] == [[True, False, True]] * 2


def test_row_sharded_orthonormalize(two_ranks):
    _check_orthonormalize(_per_rank(two_ranks / "operator.pt"))


def _check_orthonormalize(res):
    world = len(res)
    for name, y in res[0]["cases"].items():
        qo = torch.cat([r[f"orth_{name}"] for r in res], dim=1)
        ops = [{op for op, _ in r[f"orth_{name}_ops"]} for r in res]
        finite = torch.isfinite(y).flatten(1).all(dim=1)
        assert qo.shape == y.shape and qo.dtype == y.dtype, name
        eye = torch.eye(y.shape[-1]).expand(y.shape[0], -1, -1)
        if name == "nonfinite":
            # Cholesky fails for the NaN matrix only: TSQR recomputes it (as Householder QR does
            # on one device); the all-gather carries one r×r R factor per rank.
            assert all("allgather_" in o for o in ops), ops
            gathered = [b for op, b in res[0][f"orth_{name}_ops"] if op == "allgather_"]
            assert gathered == [world * 1 * y.shape[-1] ** 2 * 4], gathered
            assert not torch.isfinite(qo[~finite]).all()
        else:
            # The robust CholeskyQR: only all-reduces (a norm, three Gram matrices).
            assert ops == [{"allreduce_"}] * world, ops
        q, y_ok = qo[finite], y[finite]
        assert torch.isfinite(q).all(), name
        torch.testing.assert_close(q.mT @ q, eye[finite], rtol=0, atol=1e-5, msg=f"{name}: QᵀQ")
        torch.testing.assert_close(q @ (q.mT @ y_ok), y_ok, rtol=1e-4, atol=1e-5, msg=f"{name}: QQᵀy = y")
        # Row-sharded = the single-device robust CholeskyQR, completion directions included.
        torch.testing.assert_close(q, cholqr_orthonormalize(y_ok), rtol=0, atol=1e-5, msg=f"{name}: vs one device")
        if name in ("random", "ill", "short"):  # full rank: Householder's Q up to column signs
            q_ref = torch.linalg.qr(y_ok.double()).Q.float()
            torch.testing.assert_close(q * torch.sign((q * q_ref).sum(1, keepdim=True)), q_ref, rtol=0, atol=1e-5)
        # TSQR on its own (the fallback): an orthonormal basis spanning y, whatever y's rank.
        t = torch.cat([r[f"tsqr_{name}"] for r in res], dim=1)[finite]
        torch.testing.assert_close(t.mT @ t, eye[finite], rtol=0, atol=1e-5, msg=f"{name}: TSQR QᵀQ")
        torch.testing.assert_close(t @ (t.mT @ y_ok), y_ok, rtol=1e-4, atol=1e-5, msg=f"{name}: TSQR span")


def test_communication_volume_is_independent_of_rows(two_ranks):
    """Per matrix and step: l all-reduces of n×r (Vᵀ Y), and per orthonormalization one of a
    float64 norm and three of the r×r float64 Gram; scalars. The same for 256 and 1024 rows,
    and below the m×n a gather would move."""
    logs = torch.load(two_ranks / "comm.pt", weights_only=False)["logs"]
    n, r, iters = 32, 6, 5  # r = k + p
    expected = iters * (n * r * 4 + 8 + 3 * r * r * 8) + 4 * (1 + 2 + 2)  # + nonfinite, ξ (2), RMS (sum, count)
    for m, records in logs.items():
        total = sum(b for _, b in records)
        assert {name for name, _ in records} == {"allreduce_"}, records
        assert total == expected, (m, total, expected)
        assert max(b for _, b in records) == n * r * 4
        assert total < m * n * 4 / 3
    assert logs[256] == logs[1024]


# torch.distributed.checkpoint warns that it loads in a single process: that is the point here.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_checkpoint_from_two_ranks_continues_in_one_process(two_ranks, reference_run):
    """Saved on 2 FSDP2 ranks after step 3, loaded into a plain model and optimizer (no process
    group): steps 4..6 give the uninterrupted run."""
    import torch.distributed.checkpoint as dcp

    ckpt = str(two_ranks / "ckpt")
    model = _model()
    opt = _optimizer(model, seed=0)  # the checkpoint's seed and generator state replace it
    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=ckpt)
    model.load_state_dict(sd["model"])
    load_optimizer_state(model, opt, ckpt)
    assert opt._seed == SEED
    assert all(not hasattr(v, "full_tensor") for s in opt.state.values() for v in s.values())
    with _single_gpu_orthonormalizer():
        _train(model, opt, range(SAVE_AT, STEPS))
    _assert_same_run(_snapshot(model, opt), reference_run)


def test_ddp_replicas_agree_with_single_process(two_ranks):
    per_rank = _per_rank(two_ranks / "ddp.pt")
    assert per_rank[0]["seed"] == per_rank[1]["seed"], "the default seed must be shared"
    assert all(records == [] for r in per_rank for records in r["logs"]), "DDP: the step communicates nothing"
    a, b = per_rank[0]["snapshot"], per_rank[1]["snapshot"]
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    _assert_same_run(a, _plain_run(range(STEPS), seed=per_rank[0]["seed"]))
    assert all(r["names"] == sorted(a["params"]) for r in per_rank), per_rank[0]["names"]


def _zero_emulation(cls, partitions, steps, fresh_at=None, world=2) -> dict:
    """What ZeRO on ``world`` DDP ranks computes, in one process: one ``cls`` optimizer per
    partition (``partitions[rank]``: names per param group, in ZeRO's order), all seeded ``SEED``,
    stepping on the gradient DDP all-reduces (each rank's gradient of its slice of the batch
    over ``world``, summed in rank order). With ``fresh_at``, before that step each is replaced
    by a new one that loads its state dict without the sketch RNG, as a new process loads
    ZeRO's consolidated dict. Run on one thread, as the ranks are."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        named = dict(model.named_parameters())
        groups, options = _zero_setup(cls, model)

        def make(partition):
            return cls([{**g, "params": [named[n] for n in names]} for g, names in zip(groups, partition)], **options)

        opts = [make(partition) for partition in partitions]
        for step in steps:
            if step == fresh_at:
                saved = [{k: v for k, v in opt.state_dict().items() if k != "sketch_rng"} for opt in opts]
                opts = [make(partition) for partition in partitions]
                for opt, state_dict in zip(opts, saved):
                    with pytest.warns(UserWarning, match="the checkpoint has no sketch RNG"):
                        opt.load_state_dict(state_dict)
            per_rank = []
            for rank in range(world):
                _loss(model, step, rank, world).backward()
                per_rank.append([p.grad for p in model.parameters()])
                model.zero_grad()
            for p, *grads in zip(model.parameters(), *per_rank):
                p.grad = sum(g / world for g in grads)
            for opt in opts:
                opt.step()
            model.zero_grad()
        state = {}
        for opt in opts:
            for p, s in opt.state.items():
                state[next(n for n, q in named.items() if q is p)] = s
        return {"params": named, "state": state}
    finally:
        torch.set_num_threads(threads)


def _assert_identical(got: dict, want: dict, what: str) -> None:
    """Bit-identical parameters and optimizer state."""
    for name, p in want["params"].items():
        assert torch.equal(got["params"][name], p), f"{what}: parameter {name}"
    assert sorted(got["state"]) == sorted(want["state"]), what
    for name, s in want["state"].items():
        assert got["state"][name].keys() == s.keys(), f"{what}: {name}"
        for key, v in s.items():
            g = got["state"][name][key]
            assert torch.equal(g, v) if torch.is_tensor(v) else g == v, f"{what}: {name}.{key}: {g} != {v}"


def test_zero_redundancy_optimizer_partitions_the_state_and_matches_per_partition_optimizers(two_ranks):
    """``ZeroRedundancyOptimizer(optimizer_class=Adapprox)`` on 2 DDP ranks: the replicas stay
    bit-identical; each parameter's state is on the one rank ZeRO assigned it to; the run is,
    bit for bit, one Adapprox per partition in one process (each with the seed, stepping on DDP's
    averaged gradient), before and after ``consolidate_state_dict`` + ``load_state_dict``. The
    consolidated dict has no sketch RNG: resumed by a new optimizer, each partition's sketches
    restart from the seed (other numbers than the uninterrupted run); loading this rank's own
    ``zero.optim.state_dict()`` as well resumes bit for bit. AdaMeM (no checkpoint) likewise."""
    per_rank = _per_rank(two_ranks / "zero.pt")
    names = sorted(n for n, _ in _model().named_parameters())
    runs = ("continued", "new", "own", "adamem")
    for run in runs:
        mine = [r[run] for r in per_rank]
        for name in names:
            assert torch.equal(mine[0]["params"][name], mine[1]["params"][name]), f"{run}: replicas differ at {name}"
        for r in mine:  # the state of exactly the parameters of the rank's partition, on every rank some
            assert r["state"] and sorted(r["state"]) == sorted(n for group in r["partition"] for n in group), run
        assert sorted([*mine[0]["state"], *mine[1]["state"]]) == names, f"{run}: each parameter on one rank"

    def run_of(run):
        rank0, rank1 = (r[run] for r in per_rank)
        return {"params": rank0["params"], "state": {**rank0["state"], **rank1["state"]}}

    partitions = [r["continued"]["partition"] for r in per_rank]
    assert all(r[run]["partition"] == r["continued"]["partition"] for r in per_rank for run in ("new", "own"))
    want = _zero_emulation(Adapprox, partitions, range(STEPS))
    _assert_identical(run_of("continued"), want, "continued")
    _assert_identical(run_of("own"), want, "own")
    # A new optimizer loading the consolidated dict: the same state, the sketches drawn anew from the seed.
    assert per_rank[0]["saved keys"] == ["param_groups", "state"]
    _assert_identical(run_of("new"), _zero_emulation(Adapprox, partitions, range(STEPS), fresh_at=SAVE_AT), "new")
    assert not all(torch.equal(run_of("new")["params"][n], want["params"][n]) for n in names), "other sketches"
    adamem_partitions = [r["adamem"]["partition"] for r in per_rank]
    _assert_identical(run_of("adamem"), _zero_emulation(AdaMeM, adamem_partitions, range(STEPS)), "adamem")


@pytest.mark.slow
def test_fsdp2_four_ranks_and_checkpoint_from_two(two_ranks, reference_run, tmp_path):
    """4 ranks (13 rows: 4,4,4,1; 1 row: 1,0,0,0) == one process; the 2-rank
    checkpoint resumed on 4 ranks == the uninterrupted run; the operator and the orthonormalizer
    (5 rows: 2,2,1,0, fewer than the 4 columns, an empty shard) on 4 ranks."""
    _spawn(_four_rank_worker, 4, str(tmp_path), str(two_ranks / "ckpt"))
    _check_operator(_per_rank(tmp_path / "operator.pt", 4))
    _check_orthonormalize(_per_rank(tmp_path / "operator.pt", 4))
    _assert_same_run(torch.load(tmp_path / "fsdp.pt", weights_only=False)["snapshot"], reference_run)
    _assert_same_run(torch.load(tmp_path / "resumed.pt", weights_only=False)["snapshot"], reference_run)


def test_seed_drawn_before_the_process_group_is_rank_0s_from_the_first_step(two_ranks):
    """``seed=None`` with the optimizer made before ``init_process_group``: each rank drew its
    own seed (DDP replicas drifted apart); the first step takes rank 0's (one broadcast), unless
    a checkpoint loaded before it brought its own (common to the ranks): no collective then."""
    per_rank = _per_rank(two_ranks / "late_group.pt")
    assert per_rank[0]["drawn"] != per_rank[1]["drawn"]
    assert [r["seed"] for r in per_rank] == [per_rank[0]["drawn"]] * 2
    assert all({op for op, _ in r["logs"][0]} == {"broadcast_"} for r in per_rank), per_rank[0]["logs"]
    assert [r["loaded"] for r in per_rank] == [SEED, SEED]
    assert [r["loaded_logs"] for r in per_rank] == [[[]], [[]]]


def test_per_rank_seeds_are_refused_for_dtensor_parameters(two_ranks):
    """``seed=SEED + rank`` would sketch each rank's rows of a matrix with another Gaussian
    sketch: with DTensor parameters the constructor and ``add_param_group`` (which leaves no group
    behind) raise on every rank, naming both seeds. Plain parameters (DDP) are not checked: no
    collective (docs/distributed.md says every rank must pass the same seed)."""
    for rank, r in enumerate(_per_rank(two_ranks / "seed_check.pt")):
        for how in ("constructor", "add_param_group"):
            assert r[how].startswith("ValueError: Adapprox: the ranks of a DTensor parameter's device mesh"), r[how]
            assert f"rank {rank} (this one) seed={SEED + rank}, rank {1 - rank} seed={SEED + 1 - rank}" in r[how]
            assert "pass the same seed on every rank (not seed + rank), or seed=None" in r[how]
        assert r["groups"] == 1
        assert r["same seed"] == "constructed"
        assert r["plain"] == []


def test_dtensor_parameters_an_optimizer_refuses_are_refused_before_the_seed_check(two_ranks):
    """AdaMeM's DTensor parameters and Adapprox's ``Shard(1)`` ones raise the documented
    ``NotImplementedError`` whatever the seeds: with per-rank seeds they raised the seed check's
    ``ValueError`` (which for AdaMeM spoke of sharded sketches it never draws), and with any
    given seed they issued its ``all_gather_object`` first."""
    for r in _per_rank(two_ranks / "seed_check.pt"):
        adamem, columns = r["refused"]
        assert adamem.startswith("NotImplementedError: AdaMeM does not support DTensor parameters"), adamem
        assert columns.startswith("NotImplementedError: Adapprox supports DTensor parameters sharded by rows"), columns
        assert r["refused collectives"] == []


def test_fsdp2_bf16_stochastic_rounding_folds_each_shards_first_row_into_the_key(two_ranks):
    """Under FSDP2 each rank numbers its rows' elements from 0 and folds the single process's key
    of the parameter and step (``SketchOptimizer._rounding_keys``) and its first row together: the
    bf16 rows each rank holds after each step are its fp32 rows rounded at random with that
    key, bit for bit, so the shards of a matrix draw bits of their own."""
    from adapprox_kernels.reference import mix32, stochastic_round_bf16

    model = _model().to(torch.bfloat16)
    plain = _optimizer(model, bf16_stochastic_round=True)
    per_rank = _per_rank(two_ranks / "bf16_rounding.pt")
    names = sorted(n for n, _ in model.named_parameters())
    unsharded_differs = False
    for step, ranks in enumerate(zip(*per_rank), start=1):
        assert all(sorted(n for n, _ in r["rounded"]) == names for r in ranks), "each parameter rounded once"
        for name, p in model.named_parameters():
            group = next(g for g in plain.param_groups if any(q is p for q in g["params"]))
            key = plain._rounding_keys(group, [p], [{"step": step}])[0]
            first = 0  # the shard's first row: the rows of the ranks before it (7 + 6 of 13, 1 + 0 of 1)
            for rank, r in enumerate(ranks):
                x, held = dict(r["rounded"])[name], r["held"][name]
                # shard_keys written out, so that the test does not take the rule from the code it checks
                want = stochastic_round_bf16(x, [mix32((key, first))])[0].to(torch.bfloat16)
                assert torch.equal(held, want), f"step {step}, rank {rank}: {name}"
                unsharded_differs |= not torch.equal(held, stochastic_round_bf16(x, [key])[0].to(torch.bfloat16))
                first += held.shape[0]
            assert first == p.shape[0], name
    assert unsharded_differs, "the whole matrix's key should round some shard otherwise"


def test_state_report_and_held_bytes_under_fsdp2(two_ranks, reference_run):
    """Under FSDP2 ``state_report()`` counts the state at its global sizes, as one process
    holds it, and says so; ``held_bytes`` counts this rank's shards (it failed on DTensors)."""
    got = torch.load(two_ranks / "fsdp.pt", weights_only=False)
    assert got["state_bytes"] == sum(tensor_bytes(s) for s in reference_run["state"].values())
    assert got["report"].splitlines()[-1].startswith("(DTensor state, FSDP2: global sizes"), got["report"]
    assert got["held"] == got["local_bytes"] < got["state_bytes"], got


def test_replicated_dtensor_parameter(two_ranks):
    """A Replicate() DTensor weight steps like a plain one; only the non-finite flag is reduced."""
    got = torch.load(two_ranks / "comm.pt", weights_only=False)["replicated"]
    gen = torch.Generator().manual_seed(5)
    w = nn.Parameter(torch.randn(64, 32, generator=gen))
    w.grad = torch.randn(64, 32, generator=gen)
    opt = Adapprox([w], k_init=4, k_max=4, oversample=2, seed=SEED)
    opt.step()
    torch.testing.assert_close(got["w"], w.detach())
    torch.testing.assert_close(got["Q"], opt.state[w]["Q"])
    assert got["records"] == [("allreduce_", 4)]


def test_mixed_layouts_in_one_group_step_as_laid_out(two_ranks):
    """Same-shaped Replicate(), Shard(0) and plain weights in one param group on 2 ranks step
    as in one process (each layout is a bucket of its own, drawing its sketch in turn)."""
    want = _mixed_run([None] * 3, grouped=True)
    for got in _per_rank(two_ranks / "mixed.pt"):
        assert not isinstance(got, str), got
        for layout, g, w in zip(("Replicate()", "Shard(0)", "plain"), got, want):
            torch.testing.assert_close(g["w"], w["w"], rtol=2e-4, atol=2e-6, msg=layout)
            assert g["rank"] == w["rank"], layout
            assert g["xi"] == pytest.approx(w["xi"], rel=1e-2, abs=1e-6), layout


def test_checkpoint_after_a_forward_without_backward(two_ranks):
    """After a validation forward (FSDP2 leaves the root's parameters unsharded), the optimizer
    state saves, by FQN, and the 2-rank checkpoint loads, before ``get_model_state_dict``."""
    names = sorted(n for n, _ in _model().named_parameters())
    for r in _per_rank(two_ranks / "eval_ckpt.pt"):
        assert r["saved"] == names, r["saved"]
        assert r["loaded"] == [SAVE_AT] * len(names), r["loaded"]


def test_plain_state_dict_loads_only_on_the_rank_that_saved_it(two_ranks):
    """``opt.state_dict()`` under FSDP2 holds the rank's shards: it loads on that rank only;
    another rank's (same global shapes: it would load silently) and a single process's raise,
    as does a rank's in a single process."""
    rank0, rank1 = _per_rank(two_ranks / "plain_sd.pt.res")
    assert rank0["own"] == rank1["own"] == rank0["rank 0's"] == "loaded", (rank0, rank1)
    assert "holds DTensor shards of rank 0 of 2, this process needs DTensor shards of rank 1 of 2" in rank1["rank 0's"]
    for r in (rank0, rank1):
        assert r["single process's"].startswith("ValueError") and "holds whole tensors" in r["single process's"]
    opt = _optimizer(_model())
    with pytest.raises(ValueError, match="holds DTensor shards of rank 0 of 2, this process needs whole tensors"):
        opt.load_state_dict(torch.load(two_ranks / "plain_sd.pt.0", weights_only=False))
    assert not opt.state


def _save_optimizer(path, model, opt) -> None:
    """The optimizer's DCP checkpoint at ``path`` (one process)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"optim": optimizer_state_dict(model, opt)}, checkpoint_id=str(path))


def _assert_same_state(opt, want) -> None:
    """The same state, parameter by parameter in the groups' order."""
    for p, q in zip(*([p for g in o.param_groups for p in g["params"]] for o in (opt, want))):
        assert opt.state[p].keys() == want.state[q].keys()
        for key, v in want.state[q].items():
            torch.testing.assert_close(opt.state[p][key], v, rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_checkpoint_param_groups_with_other_keys(tmp_path):
    """The checkpoint's param groups load as saved whatever keys the optimizer's have: saved
    without ``param_names``, loaded by named parameters (which keep their names); saved before
    an option existed (it takes its default, as torch.optim does); a group count that differs
    is a ``ValueError`` before anything is read; no folder and no reader, a ``TypeError`` saying
    so."""
    options = dict(k_init=2, exact_small_matrices=False, seed=SEED)
    model = _model()
    saved = Adapprox(model.parameters(), **options)
    _train(model, saved, range(1))
    _save_optimizer(tmp_path / "plain", model, saved)
    named = Adapprox(model.named_parameters(), **options)
    load_optimizer_state(model, named, tmp_path / "plain")
    _assert_same_state(named, saved)
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]

    old = Adapprox(model.parameters(), **options, warm_power_iters=3)
    _train(model, old, range(1))
    del old.param_groups[0]["warm_power_iters"]  # as written before the option existed
    _save_optimizer(tmp_path / "old", model, old)
    new = Adapprox(model.parameters(), **options, warm_power_iters=3)
    load_optimizer_state(model, new, tmp_path / "old")
    _assert_same_state(new, old)
    assert new.param_groups[0]["warm_power_iters"] == 3

    params = list(model.parameters())
    two = Adapprox([{"params": params[:2]}, {"params": params[2:]}], **options)
    with pytest.raises(ValueError, match="checkpoint has 1 param groups, the optimizer 2"):
        load_optimizer_state(model, two, tmp_path / "plain")
    with pytest.raises(TypeError, match=r"needs the checkpoint's folder \(checkpoint_id\) or a storage_reader"):
        load_optimizer_state(model, two)

    # Saved by named parameters in one order, loaded in another: each name stays its parameter's.
    _save_optimizer(tmp_path / "named", model, named)
    backwards = Adapprox(list(model.named_parameters())[::-1], **options)
    load_optimizer_state(model, backwards, tmp_path / "named")
    assert backwards.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()][::-1]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_checkpoint_names_are_the_fqns_of_get_model_state_dict(tmp_path):
    """Saved from a compiled model with an activation-checkpointed layer, the optimizer state
    is keyed by ``get_model_state_dict``'s FQNs (without ``_orig_mod.`` and
    ``_checkpoint_wrapped_module.``), so it loads into the plain model. (DDP's ``module.``:
    :func:`test_ddp_replicas_agree_with_single_process`.)"""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model = _model()
    model[2] = checkpoint_wrapper(model[2])
    wrapped = torch.compile(model)  # its names only: the training runs `model`, uncompiled
    opt = _optimizer(model)
    _train(model, opt, range(1))
    assert sorted(optimizer_state_dict(wrapped, opt)["state"]) == sorted(get_model_state_dict(wrapped))
    _save_optimizer(tmp_path / "ckpt", wrapped, opt)
    plain = _model()
    loaded = _optimizer(plain)
    load_optimizer_state(plain, loaded, tmp_path / "ckpt")
    _assert_same_state(loaded, opt)


class _Tied(nn.Module):
    """An embedding and an output head sharing one weight, as GPT-2's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed, self.mid = nn.Embedding(11, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.embed(tokens))))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_tied_weights_go_by_their_first_name(tmp_path):
    """A tied weight is keyed by its first name, as ``get_optimizer_state_dict`` keys it, so a
    checkpoint written by either loads (it was keyed by its last name: torch's was refused as
    state for a parameter the optimizer does not have). Those older checkpoints still load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = _Tied()
    opt = Adapprox(model.parameters(), k_init=2, exact_small_matrices=False, seed=SEED)
    model(torch.arange(11)).square().mean().backward()
    opt.step()
    ours, torchs = optimizer_state_dict(model, opt), get_optimizer_state_dict(model, opt)
    assert list(ours["state"]) == list(torchs["state"]) == ["embed.weight", "mid.weight", "mid.bias"]
    assert ours["param_groups"][0]["params"] == torchs["param_groups"][0]["params"]

    older = dict(ours, state={{"embed.weight": "head.weight"}.get(n, n): s for n, s in ours["state"].items()})
    older["param_groups"] = [dict(g, params=["head.weight", *g["params"][1:]]) for g in ours["param_groups"]]
    for name, saved in (("ours", ours), ("torch", torchs), ("older", older)):
        dcp.save({"optim": saved}, checkpoint_id=str(tmp_path / name))
        loaded = Adapprox(model.parameters(), k_init=2, exact_small_matrices=False, seed=SEED)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*the checkpoint has no sketch RNG")
            load_optimizer_state(model, loaded, tmp_path / name)
        _assert_same_state(loaded, opt)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_checkpoint_of_a_wrapped_model_written_before_fqns_loads(tmp_path):
    """Checkpoints written before the FQNs left the wrappers' segments out name a compiled (or
    DDP) model's parameters ``_orig_mod.0.weight``: they must still load into that model (they
    were refused as state for parameters the optimizer does not have)."""
    import torch.distributed.checkpoint as dcp

    model = _model()
    wrapped = torch.compile(model)  # its names only
    opt = _optimizer(model)
    _train(model, opt, range(1))
    saved = optimizer_state_dict(wrapped, opt)
    old = dict(
        saved,
        state={f"_orig_mod.{n}": s for n, s in saved["state"].items()},
        param_groups=[dict(g, params=[f"_orig_mod.{n}" for n in g["params"]]) for g in saved["param_groups"]],
    )
    dcp.save({"optim": old}, checkpoint_id=str(tmp_path / "old"))
    loaded = _optimizer(model)
    load_optimizer_state(wrapped, loaded, tmp_path / "old")
    _assert_same_state(loaded, opt)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_checkpoint_without_optimizer_state_or_sketch_rng(tmp_path):
    """No optimizer state under ``key`` (a model-only checkpoint, another key) is a ``ValueError``
    listing the checkpoint's keys, before anything is loaded. A checkpoint written with torch's
    ``get_optimizer_state_dict`` has no sketch RNG: its state loads with a warning, and the
    optimizer keeps its own seed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = _model()
    opt = _optimizer(model)
    _train(model, opt, range(1))
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "model"))
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path / "torch"))
    loaded = _optimizer(model, seed=0)
    with pytest.raises(ValueError, match=r"no optimizer state under key='optim' \(its top-level keys: \['model'\]\)"):
        load_optimizer_state(model, loaded, tmp_path / "model")
    with pytest.raises(ValueError, match=r"no optimizer state under key='optimizer' \(.*\['optim'\]\)"):
        load_optimizer_state(model, loaded, tmp_path / "torch", key="optimizer")
    assert not loaded.state
    with pytest.warns(UserWarning, match="the checkpoint has no sketch RNG"):
        load_optimizer_state(model, loaded, tmp_path / "torch")
    assert loaded._seed == 0
    _assert_same_state(loaded, opt)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_state_of_a_parameter_the_optimizer_lacks_is_refused_by_name(tmp_path):
    """State for an FQN that is no parameter of the optimizer: a ``ValueError`` naming it, before
    anything is loaded, whether it comes from ``torch.distributed.checkpoint`` or as a dict."""
    import torch.distributed.checkpoint as dcp

    model = _model()
    opt = _optimizer(model)
    _train(model, opt, range(1))
    saved = optimizer_state_dict(model, opt)
    head = nn.Sequential(*model[:2])  # the first layer alone: "2.weight" and on are none of its parameters
    fresh = Adapprox(head.parameters(), seed=0)
    dcp.save({"optim": saved}, checkpoint_id=str(tmp_path / "ckpt"))
    unknown = r"optimizer state for '[24]\.(weight|bias)', not a parameter of this optimizer"
    with pytest.raises(ValueError, match=unknown):
        load_optimizer_state(head, fresh, tmp_path / "ckpt")
    extra = {**saved, "param_groups": [{**saved["param_groups"][0], "params": ["0.weight", "0.bias"]}]}
    with pytest.raises(ValueError, match=unknown):  # a KeyError naming only the FQN before
        load_optimizer_state_dict(head, fresh, extra)
    assert not fresh.state


def test_checkpoint_of_other_parameters_is_refused_before_anything_loads():
    """A parameter the model lacks has no FQN to save its state under; a checkpoint whose group
    lists other parameters would put their state on these: both ``ValueError``, nothing loaded."""
    model = _model()
    opt = _optimizer(model)
    _train(model, opt, range(1))
    stray = Adapprox([*model.parameters(), nn.Parameter(torch.zeros(3))], seed=0)
    with pytest.raises(ValueError, match="holds a parameter that is not in the model"):
        optimizer_state_dict(model, stray)
    saved = optimizer_state_dict(model, opt)
    fresh = _optimizer(model, seed=0)
    saved["param_groups"][0]["params"] = saved["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="param group parameters differ"):
        load_optimizer_state_dict(model, fresh, saved)
    assert not fresh.state and fresh._seed == 0


@pytest.mark.parametrize("rows", [0, 1, 5, 13])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_chunk_rows_is_torch_chunks_layout(rows, parts):
    """Rows per rank as ``torch.chunk`` (FSDP2's ``Shard(0)``) gives them: the last ranks' short
    or empty, never negative (5 rows on 4 ranks: 2, 2, 1, 0)."""
    chunks = [len(c) for c in torch.arange(rows).chunk(parts)]
    assert chunk_rows(rows, parts) == chunks + [0] * (parts - len(chunks))


def test_unsupported_dtensor_layouts_are_refused_before_any_state():
    """HSDP's 2-D mesh and ``Shard(1)`` raise ``NotImplementedError`` when they are given (to the
    constructor or ``add_param_group``), leaving no group nor state behind; they were refused
    in the first step, after part of their state was written (more on every retry). A 1-rank
    process group in this process suffices."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        hsdp = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
        for mesh, placements in ((hsdp, [Replicate(), Shard(0)]), (init_device_mesh("cpu", (1,)), [Shard(1)])):
            w = nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, placements))
            with pytest.raises(NotImplementedError, match="sharded by rows"):
                Adapprox([w], seed=SEED)
            opt = Adapprox([nn.Parameter(torch.randn(4, 4))], seed=SEED)
            for _ in range(2):
                with pytest.raises(NotImplementedError, match="sharded by rows"):
                    opt.add_param_group({"params": [w]})
            assert len(opt.param_groups) == 1 and not opt.state
    finally:
        dist.destroy_process_group()


def test_gradient_limit_holds_for_dtensor_parameters():
    """Gradient entries whose squares overflow V (above √max ≈ 1.8e19 in fp32) take the
    non-finite policy on DTensor parameters too, as on plain ones (their check is each rank's
    own, all-reduced); smaller ones step. A 1-rank process group in this process suffices."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    inf, nan = float("inf"), float("nan")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, [Shard(0)]))
        opt = Adapprox([w], seed=SEED, k_max=2, exact_small_matrices=False)
        for entry in (1e19, 2e19):
            g = torch.randn(8, 6)
            g[3, 4] = entry
            w.grad = distribute_tensor(g, mesh, [Shard(0)])
            if entry < 1.8e19:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", ".*overflowed float32")  # S-RSI squares V
                    opt.step()
            else:
                with pytest.raises(FloatingPointError, match="above 1.84e"):
                    opt.step()
        assert opt.state[w]["step"] == 1
        # inf and NaN are flagged with or without limits (inf <= inf would pass a limit of inf)
        values = ([1.0, inf], [-inf, 0.0], [nan, 1.0], [1.0, 2.0])
        grads = [distribute_tensor(torch.tensor(v), mesh, [Shard(0)]) for v in values]
        assert nonfinite_flags(grads) == [True, True, True, False]
        assert nonfinite_flags(grads, [1.5, inf, inf, 1.5]) == [True, True, True, True]
        assert nonfinite_flags(grads[3:], [2.0]) == [False]  # at the limit: steps, as a plain tensor's gradient
        assert nonfinite_flags(grads[3:] * 2, [1.5, 2.0]) == [True, False]  # each gradient its own limit
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-stochastic-round"])
def test_compiled_step_on_dtensor_parameters_matches_the_eager_one(dtype):
    """``torch.compile(opt.step)`` with DTensor (FSDP2) parameters: the factored update passed the
    compiled step's tensor of α, λ and β1 to the row shards' update, which took none (a
    ``TypeError`` at the first step); it now takes it, as the dense buckets' does (they took the
    numbers, constants of the compiled update), and the step follows the eager one, a scheduler's
    lr included. The lr, a new number every step, is read from that tensor by the factored
    matrix's update and the dense vector's: after the second step nothing is compiled (as a
    number, either update was compiled anew every step). With bf16 weights rounded at random,
    the row shards fold the compiled step's tensor of rounding keys, not a list of ints, and
    round to the eager step's bits. A 1-rank process group in this process suffices."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        scheds = []

        def make(ws):
            opt = Adapprox(ws, seed=SEED, k_max=2, bf16_stochastic_round=dtype == torch.bfloat16)
            scheds.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1)))
            return opt

        shapes = [(40, 30), (30,)]  # a factored matrix and a dense vector
        per_step, eager, compiled = graphs_per_step(
            make, shapes, "aot_eager", 4, dtype=dtype, after_step=lambda opt: scheds[-1].step(),
            place=lambda t: distribute_tensor(t, mesh, [Shard(0)]),
        )  # fmt: skip
        assert [new for new, _ in per_step[2:]] == [0, 0], per_step
        if dtype == torch.bfloat16:
            assert all(torch.equal(c.full_tensor(), e.full_tensor()) for c, e in zip(compiled, eager))
        else:
            torch.testing.assert_close([w.full_tensor() for w in compiled], [w.full_tensor() for w in eager])
    finally:
        torch._dynamo.reset()
        dist.destroy_process_group()


def test_zero_checkpoint_resumed_with_another_seed_is_refused():
    """ZeroRedundancyOptimizer copies the seed into its groups and saves them, not the sketch
    RNG: loaded into one built with another seed, the groups' seed was ignored and the run went
    on with other sketches than its seed says. The first step refuses it before any change; the
    checkpoint's seed resumes. A 1-rank process group."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def make(seed):
        torch.manual_seed(0)
        model = nn.Linear(8, 6)
        return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Adapprox, k_max=2, seed=seed)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, zero = make(SEED)
        model(torch.randn(4, 8)).sum().backward()
        zero.step()
        zero.consolidate_state_dict(to=0)
        saved = zero.state_dict()
        for seed in (SEED + 1, SEED):
            model, zero = make(seed)
            zero.load_state_dict(copy.deepcopy(saved))
            model(torch.randn(4, 8)).sum().backward()
            kept = model.weight.detach().clone()
            if seed != SEED:
                refused = rf"seed {SEED} is not Adapprox's \(seed={seed}\).*nothing was updated"
                with pytest.raises(ValueError, match=refused):
                    zero.step()
                assert torch.equal(model.weight, kept)
            else:
                zero.step()
                assert not torch.equal(model.weight, kept)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "make", [lambda ps: Adapprox(ps, seed=SEED, k_max=2), lambda ps: AdaMeM(ps, seed=SEED, rank=2)]
)
def test_parameters_flattened_by_fsdp1_are_warned_of(make):
    """FSDP1 (``FullyShardedDataParallel``) hands the optimizer 1-D tensors, a ``FlatParameter``
    (or each parameter's 1-D shard with ``use_orig_params=True`` on several ranks): stepped as
    vectors, no matrix was factored (Adapprox held 100% of AdamW's state, AdaMeM was Adafactor
    without momentum), silently. A ``RuntimeWarning`` says so; FSDP1 keeping the shapes (one
    rank, ``use_orig_params=True``: ``NO_SHARD``) is not warned of. A 1-rank process group.
    The warning names the user's call (from ``add_param_group`` it named the caller's caller)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # FSDP1's deprecation
            warnings.filterwarnings("ignore", ".*FSDP.*", UserWarning)
            flat = FSDP(_model(), use_orig_params=False, device_id=torch.device("cpu"))
            kept = FSDP(_model(), use_orig_params=True, device_id=torch.device("cpu"))
        assert all(p.dim() == 1 for p in flat.parameters())
        assert any(p.dim() == 2 for p in kept.parameters())
        with pytest.warns(RuntimeWarning, match="flattened by FSDP1") as warned:
            make(list(flat.parameters()))
        opt = make([nn.Parameter(torch.randn(4, 4))])  # a later group of flattened parameters
        with pytest.warns(RuntimeWarning, match="flattened by FSDP1") as warned_later:
            opt.add_param_group({"params": list(flat.parameters())})
        ours = [w for w in [*warned, *warned_later] if "flattened by FSDP1" in str(w.message)]
        assert [w.filename for w in ours] == [__file__] * 2, [(w.filename, w.lineno) for w in ours]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            make(list(kept.parameters()))
            make(list(_model().parameters()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ≈ 15 s: two torchrun jobs
def test_the_fsdp2_example_saves_on_2_ranks_and_resumes_on_4(tmp_path):
    """``examples/fsdp2_train.py`` as its docstring runs it (``torchrun``, gloo, small sizes)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}

    def torchrun(ranks: int, *args: str) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "examples/fsdp2_train.py",
               "--width", "32", "--depth", "1", "--steps", "2", *args]  # fmt: skip
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        # As _spawn: a rank killed by a signal is run again once. Here, 4 gloo ranks on 2 cores: after
        # its last step a rank aborted ("terminate called without an active exception") in ~1 of 8
        # runs, on torch 2.14 and 2.15, with a barrier before destroy_process_group or without the
        # package's collective logging alike.
        if done.returncode != 0 and "received by PID" in done.stderr:
            warnings.warn(f"a rank of {ranks} ended by a signal; running them again", RuntimeWarning, stacklevel=2)
            done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    ckpt = str(tmp_path / "ckpt")
    assert f"saved {ckpt} after step 2 on 2 ranks" in torchrun(2, "--save", ckpt)
    assert "step    3  loss" in torchrun(4, "--resume", ckpt)
