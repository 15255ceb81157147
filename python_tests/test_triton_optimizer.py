"""The whole optimizer on the Triton backend against the reference backend, same sketch seed:
parameters and every state tensor after several steps, with a state_dict round trip halfway.

Two same-shaped matrices share one batched launch but get different gradient structure, so
their ranks drift apart (the factors are zero-padded to a common width inside the batch)."""

import contextlib
import copy
import functools
import importlib
import warnings

import pytest
import torch
from compiled_step import eager_and_compiled, graphs_per_step
from host_reads import NoHostReads
from triton_env import DEVICE, triton_kernels  # noqa: F401  (autouse fixture)

from adapprox_kernels import Adapprox
from adapprox_kernels.cuda_graphs import CallGraphs

# 3-D folds to 2×45: dense (too small to factor); () a 0-d scalar
SHAPES = [(20, 33), (20, 33), (9, 40), (2, 5, 9), (7,), ()]


def _params(dtype):
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(DEVICE)) for s in SHAPES]


def _grads(step, dtype):
    """Random gradients, except matrix 1: a smooth row×column scale with 1% noise, whose V is
    nearly rank 1, so ξ is small and its rank shrinks while matrix 0's stays at k_max."""
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    rows, cols = torch.rand(20, 1, generator=gen) + 0.5, torch.rand(1, 33, generator=gen) + 0.5
    grads[1] = rows * cols * (1 + 0.01 * torch.randn(20, 33, generator=gen))
    return [g.to(dtype).to(DEVICE) for g in grads]


def _run(backend, dtype, options, steps, round_trip_at):
    params = _params(dtype)
    opt = Adapprox(params, backend=backend, seed=3, **options)
    for step in range(steps):
        if step == round_trip_at:  # a fresh optimizer continues from the saved state
            saved = copy.deepcopy(opt.state_dict())
            opt = Adapprox(params, backend=backend, seed=99, **options)
            opt.load_state_dict(saved)
        for p, g in zip(params, _grads(step, dtype)):
            p.grad = g
        opt.step()
    return params, opt


# ξ of matrix 0 stays above 0.25 and of matrix 1 below 0.1 whatever the sketch (CPU or CUDA RNG),
# so the threshold between them drives their ranks apart on every device.
BASE = dict(lr=1e-2, k_max=4, oversample=2, power_iters=2, betas=(0.9, 0.9, 0.0), xi_thresh=0.15)

CONFIGS = {
    "fp32-cold": (torch.float32, {}),
    "bf16-warm-cosine": (torch.bfloat16, dict(warm_start=True, cosine_guidance=True)),
    "fp16-no-momentum-sigmoid-unclipped": (
        torch.float16,
        dict(
            betas=(0.0, 0.9, 0.0),
            rank_policy="sigmoid",
            rank_interval=2,
            k_init=2,
            weight_decay=0.0,
            clip_threshold=None,
        ),
    ),
}

# Factors and ξ agree to fp32 rounding amplified by a few QR/power steps; the parameters and
# momenta within one unit in the last place of their dtype: a ulp is 2^-8..2^-7 of the value
# for bf16 (8 significant bits) and 2^-11..2^-10 for fp16, so a value rounded the other way on
# one backend sits up to 2^-7 (bf16) away (seen on an H100 without the CUDA extension).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_matches_reference(name):
    dtype, extra = CONFIGS[name]
    options = {**BASE, **extra}
    ref_params, ref_opt = _run("reference", dtype, options, steps=4, round_trip_at=2)
    tri_params, tri_opt = _run("triton", dtype, options, steps=4, round_trip_at=2)
    ranks = {ref_opt.state[ref_params[i]]["Q"].shape[1] for i in (0, 1)}
    if name == "fp32-cold":
        assert len(ranks) == 2, "the batched pair should end at different ranks"
    _assert_same_run(ref_params, ref_opt, tri_params, tri_opt, dtype)


@pytest.mark.parametrize("jacobi", [False, True])
@pytest.mark.parametrize("warm", [False, True])
def test_rayleigh_ritz_truncation_matches_reference(monkeypatch, warm, jacobi):
    """``truncation="rayleigh_ritz"`` on the kernels: the rotation by the eigenvectors of
    ``UᵀU`` (torch ops on the kernels' factors) gives the reference's run, across a resume;
    also with the eigenvectors from the fp32 Jacobi kernel, as CUDA buckets take them (the
    reference keeps float64 ``torch.linalg.eigh``)."""
    if jacobi:
        from adapprox_kernels import adapprox as adapprox_module
        from adapprox_kernels.kernels.jacobi_eigh import jacobi_eigh

        kernel, chosen = functools.partial(jacobi_eigh, descending=True), adapprox_module._sync_free_eigh

        def on_cuda(backend, device, width, dtype):
            return kernel if getattr(backend, "name", None) == "triton" else chosen(backend, device, width, dtype)

        monkeypatch.setattr(adapprox_module, "_sync_free_eigh", on_cuda)
    options = {**BASE, "truncation": "rayleigh_ritz", "warm_start": warm}
    ref_params, ref_opt = _run("reference", torch.float32, options, steps=4, round_trip_at=2)
    tri_params, tri_opt = _run("triton", torch.float32, options, steps=4, round_trip_at=2)
    _assert_same_run(ref_params, ref_opt, tri_params, tri_opt, torch.float32)


def test_cosine_guidance_factor_below_its_bound_matches_reference():
    """The configs above run cosine guidance at the default bound 2, where these 4-step runs
    have c = cos(Upd, M_t) >= 0.5 on every step of the factored pair, so the factor is 2 and c
    itself is never checked (the cosine sums could, e.g., use the unclipped update). Bound 10:
    matrix 0's factor is 4.1, 2.8, 2.3 after the first step, and c reaches the weights. The
    backends agree to ~1e-7 here, against the 1e-5 of fp32's TOL."""
    options = {**BASE, "cosine_guidance": True, "cosine_max_scale": 10.0}
    ref_params, ref_opt = _run("reference", torch.float32, options, steps=4, round_trip_at=2)
    tri_params, tri_opt = _run("triton", torch.float32, options, steps=4, round_trip_at=2)
    _assert_same_run(ref_params, ref_opt, tri_params, tri_opt, torch.float32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_maximize_steps_as_the_negated_gradient(name):
    """``maximize=True`` on G gives the bits of the step on −G: parameters and every state
    entry, factored and dense buckets (the clip divisor carries the sign into the kernels)."""
    dtype, extra = CONFIGS[name]
    runs = []
    for maximize, sign in ((True, 1), (False, -1)):
        params = _params(dtype)
        opt = Adapprox(params, backend="triton", seed=3, maximize=maximize, **{**BASE, **extra})
        for step in range(3):
            for p, g in zip(params, _grads(step, dtype)):
                p.grad = sign * g
            opt.step()
        runs.append((params, opt))
    _assert_same_bits(*runs[0], *runs[1])


def test_a_non_contiguous_parameter_is_written_on_triton():
    """A parameter whose storage is not row-major (a transposed view, a channels_last conv
    weight) is staged into a contiguous copy for the kernels and copied back: it steps as on
    the reference backend, its momentum too."""
    runs = {}
    for backend in ("reference", "triton"):
        w = torch.nn.Parameter(torch.randn(33, 20, generator=torch.Generator().manual_seed(0)).to(DEVICE).t())
        assert not w.is_contiguous()
        opt = Adapprox([w], backend=backend, seed=0, **BASE)
        for step in range(2):
            w.grad = torch.randn(20, 33, generator=torch.Generator().manual_seed(step)).to(DEVICE)
            opt.step()
        runs[backend] = w, opt.state[w]["exp_avg"]
    (tw, tm), (rw, rm) = runs["triton"], runs["reference"]
    torch.testing.assert_close(tw, rw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tm, rm, rtol=1e-5, atol=1e-6)


# Thin and odd matrices, factored (exact_small_matrices=False), a batched 7×13 pair, a folded
# 3-D weight stored permuted, a vector.
EDGE_SHAPES = [(1, 9), (9, 1), (7, 13), (7, 13), (3, 4, 5), (6,)]


def _laid_out(tensors, layout):
    """The same values in another memory layout: ``"transposed"`` (column-major: other strides),
    ``"strided"`` (every other entry of a wider tensor: not dense), ``"flat"`` (views of one
    buffer, one element apart, so most are not 16-byte aligned: DDP's gradient bucket views)."""
    if layout == "transposed":
        return [t.mT.contiguous().mT if t.dim() >= 2 else t for t in tensors]
    if layout == "strided":
        return [torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0] for t in tensors]
    buffer = torch.zeros(sum(t.numel() + 1 for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    views, start = [], 1
    for t in tensors:
        views.append(buffer[start : start + t.numel()].view(t.shape).copy_(t))
        start += t.numel() + 1
    return views


@pytest.mark.parametrize(
    "layout,dtype",
    [("transposed", torch.float32), ("strided", torch.float16), ("flat", torch.float32), ("flat", torch.bfloat16)],
)
def test_edge_shapes_layouts_and_groups_match_reference(layout, dtype):
    """1×n, n×1 and odd factored matrices whose gradients come in ``layout`` (the kernels read
    them through their own strides and offsets, or staged copies), a permuted 3-D parameter,
    a member of the batched pair without a gradient for a step (its factors then trail the
    other's by a step: zero-padded in the batch), and a second group with its own options
    (maximize, no clipping, no decay, a tensor lr): the reference backend's run, with a
    state_dict round trip."""
    options = {**BASE, "exact_small_matrices": False}
    runs = {}
    for backend in ("reference", "triton"):
        gen = torch.Generator().manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(DEVICE)) for s in EDGE_SHAPES]
        params[4] = torch.nn.Parameter(params[4].detach().permute(2, 0, 1).contiguous().permute(1, 2, 0))
        groups = [
            {"params": params[:4]},
            {"params": params[4:], "maximize": True, "clip_threshold": None, "weight_decay": 0.0, "lr": 0.02},
        ]
        opt = Adapprox(groups, backend=backend, seed=3, **options)
        for step in range(4):
            if step == 2:
                saved = copy.deepcopy(opt.state_dict())
                opt = Adapprox(groups, backend=backend, seed=99, **options)
                opt.load_state_dict(saved)
            opt.param_groups[1]["lr"] = torch.tensor(0.02 / (1 + step))
            gen = torch.Generator().manual_seed(300 + step)
            grads = _laid_out([torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in EDGE_SHAPES], layout)
            for i, (p, g) in enumerate(zip(params, grads)):
                p.grad = None if (step, i) == (1, 3) else g
            opt.step()
        runs[backend] = params, opt
    assert [runs["triton"][1].state[p]["step"] for p in runs["triton"][0]] == [4, 4, 4, 3, 4, 4]
    _assert_same_run(*runs["reference"], *runs["triton"], dtype)


class _LargeOutputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records each op that makes a new floating-point tensor whose matrices (its last two
    dimensions: a bucket stacks its members) hold at least ``numel`` elements. Not views, and
    not the interpreter's own staging (``set_`` / byte copies of its arguments)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket not in (torch.ops.aten.set_, torch.ops.aten.view, torch.ops.aten._unsafe_view):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if (
                    torch.is_tensor(t) and t.is_floating_point() and t.shape[-2:].numel() >= self.numel
                    and not t._is_view()
                ):  # fmt: skip
                    self.seen.append((str(func), tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options",
    [dict(betas=(0.0, 0.999, 0.9)), dict(cosine_guidance=True, warm_start=True), dict(bf16_stochastic_round=True)],
    ids=["no-momentum", "cosine-warm", "stochastic-round"],
)
def test_the_triton_step_makes_no_m_by_n_tensor(dtype, options):
    """The design's promise: V (m×n fp32) is never materialized, nor any other m×n temporary
    (a stacked or upcast copy of G): every new tensor of a step is as thin as the factors. The
    reference backend, which materializes V, is caught by the same check."""
    m, n = 40, 56
    for backend in ("triton", "reference"):
        params = [torch.nn.Parameter(torch.randn(m, n, device=DEVICE).to(dtype)) for _ in range(3)]
        opt = Adapprox(params, backend=backend, seed=0, k_max=4, exact_small_matrices=False, **options)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(m, n, device=DEVICE).to(dtype)
            with _LargeOutputs(m * n // 2) as seen:
                opt.step()
        if backend == "triton":
            assert seen.seen == [], seen.seen
        else:
            assert any(shape[-2:] == (m, n) and dt == torch.float32 for _, shape, dt in seen.seen)


def test_bf16_stochastic_round_on_triton_draws_the_references_bits():
    """bf16 weights rounded at random: the kernels hash the same key and element indices as the
    reference, so where the two backends' fp32 weights agree (all but a few ulps of fp32) the
    bf16 weights are the same bits; rounded to nearest on one side only, about half would
    differ. Through a state_dict round trip (the bits follow the step count)."""
    options = {**BASE, "bf16_stochastic_round": True}
    ref_params, _ = _run("reference", torch.bfloat16, options, steps=4, round_trip_at=2)
    tri_params, _ = _run("triton", torch.bfloat16, options, steps=4, round_trip_at=2)
    near_params, _ = _run("triton", torch.bfloat16, BASE, steps=4, round_trip_at=2)
    same = sum(int((r == t).sum()) for r, t in zip(ref_params, tri_params))
    near = sum(int((r == t).sum()) for r, t in zip(ref_params, near_params))
    total = sum(p.numel() for p in ref_params)
    assert same >= 0.99 * total and near < 0.9 * total, (same, near, total)


def test_bf16_stochastic_round_under_torch_compile():
    """``torch.compile(opt.step)`` with bf16 weights rounded at random on the Triton backend: the
    update goes through the ``apply_update`` custom op, which takes the keys too (it used to
    refuse, in mid-step), so the compiled steps give the eager bits, matrix by matrix of a
    bucket of two (rounded to nearest, about a tenth of the weights differ after two steps); and dynamo traces no id()
    nor lru_cache on the way (``eager_and_compiled`` fails on its warning)."""

    def make(params, stochastic=True):
        return Adapprox(params, backend="triton", bf16_stochastic_round=stochastic, k_max=4, seed=0)

    shapes = [(20, 33), (20, 33), (7,)]
    eager, compiled = eager_and_compiled(make, shapes, "eager", 2, torch.bfloat16, DEVICE)
    nearest, _ = eager_and_compiled(lambda ps: make(ps, False), shapes, "eager", 2, torch.bfloat16, DEVICE)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert all((a != b).float().mean() > 0.05 for a, b in zip(eager[:2], nearest[:2]))  # ~0.1 here


def test_a_compiled_step_on_the_kernels_compiles_nothing_after_its_second_step():
    """``torch.compile(opt.step)`` on the Triton backend with a scheduler's lr and bf16 weights
    rounded at random: after two steps nothing is compiled, and the compiled steps give the
    eager bits. The update's custom op took the lr as a number and the keys were made from
    Python ints in the trace: both were constants, compiled anew every step until dynamo's
    recompile limit, after which the update ran eagerly; now both arrive as tensors."""

    def decay(opt):
        opt.param_groups[0]["lr"] *= 0.9

    make = lambda ps: Adapprox(ps, backend="triton", bf16_stochastic_round=True, k_max=4, seed=0)  # noqa: E731
    shapes = [(20, 33), (20, 33), (7,)]
    per_step, eager, compiled = graphs_per_step(
        make, shapes, "eager", 5, torch.bfloat16, after_step=decay, device=DEVICE
    )
    assert [new for new, _ in per_step[2:]] == [0, 0, 0], per_step
    assert len({ran for _, ran in per_step[1:]}) == 1, per_step
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_compiled_step_takes_a_nonfinite_gradient_as_the_eager_one(policy):
    """``torch.compile(opt.step)`` on the Triton backend with a NaN in one matrix's gradient at
    the second step: the step that ran ahead is undone, the sketch RNG restored (attributes of
    the optimizer, which the dynamo of torch 2.11 refuses to set: pytorch#171590), and with
    ``"skip"`` the matrix sits out (see test_adapprox's sitting-out test). Both raised an
    internal error inside the compiled step; now it skips, or raises FloatingPointError, as
    the eager step does."""
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in [(24, 20), (5,)]]
        opt = Adapprox(params, lr=1e-2, k_max=2, seed=0, backend="triton", nonfinite=policy)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for i in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            if i == 1:
                params[0].grad[0, 0] = float("nan")
                if policy == "raise":
                    with pytest.raises(FloatingPointError, match="non-finite gradient"):
                        step()
                    break
            step()
        assert [opt.state[p].get("nonfinite_skips", 0) for p in params] == ([1, 0] if policy == "skip" else [0, 0])
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_product_precision_under_torch_compile():
    """``torch.compile(opt.step)`` with a ``product_precision``: the compiled products go
    through the custom ops, which take the precision too (they used to drop it, and a guard
    meant to refuse it never fired: dynamo crashed inside the Triton launcher instead), so the
    compiled steps give the eager bits; tf32_rn rounds the operands even on the interpreter, so
    its second step (the first whose V has factors) differs from the default's. The vector's
    compiled step is the reference backend's torch ops, its eager one a Triton pass: on a GPU
    (approximate square root and division) they differ by a few ulp."""

    def make(params, precision="tf32_rn"):
        return Adapprox(params, backend="triton", product_precision=precision, k_max=4, seed=0)

    shapes = [(20, 33), (7,)]
    eager, compiled = eager_and_compiled(make, shapes, "eager", 2, device=DEVICE)
    default, _ = eager_and_compiled(lambda ps: make(ps, None), shapes, "eager", 2, device=DEVICE)
    assert torch.equal(eager[0], compiled[0])
    torch.testing.assert_close(eager[1], compiled[1], rtol=0 if DEVICE.type == "cpu" else 1e-6, atol=0)
    assert not torch.equal(eager[0], default[0])


def test_beta1_turned_on_mid_run_matches_reference():
    """β1 = 0 for two steps, then 0.9: each backend makes the first moments then (zeros) and
    the runs agree, factored and dense buckets alike."""
    runs = {}
    for backend in ("reference", "triton"):
        params = _params(torch.float32)
        opt = Adapprox(params, backend=backend, seed=3, **{**BASE, "betas": (0.0, 0.9, 0.0)})
        for step in range(4):
            if step == 2:
                opt.param_groups[0]["betas"] = (0.9, 0.9, 0.0)
            for p, g in zip(params, _grads(step, torch.float32)):
                p.grad = g
            opt.step()
        runs[backend] = (params, opt)
    assert all("exp_avg" in runs["triton"][1].state[p] for p in runs["triton"][0])
    _assert_same_run(*runs["reference"], *runs["triton"], torch.float32)


@pytest.mark.parametrize("layout", ["fp64 first in a group", "reference group first"])
def test_buckets_that_do_not_run_ahead_draw_their_sketch_in_order(layout):
    """An fp64 matrix (the reference path on any backend) or a group on the reference backend
    before a Triton bucket: the same seed must give the same run as the reference backend
    alone. The Triton buckets run ahead of the others, and used to draw their sketches first."""

    def run(backend):
        gen = torch.Generator().manual_seed(1)
        first = torch.nn.Parameter(torch.randn(20, 33, generator=gen, dtype=torch.float64).to(DEVICE))
        second = torch.nn.Parameter(torch.randn(20, 33, generator=gen).to(DEVICE))
        if layout == "fp64 first in a group":
            opt = Adapprox([first, second], backend=backend, seed=3, **BASE)
        else:
            first.data = first.data.float()
            groups = [{"params": [first], "backend": "reference"}, {"params": [second]}]
            opt = Adapprox(groups, backend=backend, seed=3, **BASE)
        for step in range(3):
            gen = torch.Generator().manual_seed(100 + step)
            for p in (first, second):
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(DEVICE)
            opt.step()
        return [first, second], opt

    (ref_params, ref_opt), (tri_params, tri_opt) = run("reference"), run("triton")
    for i, (rp, tp) in enumerate(zip(ref_params, tri_params)):
        torch.testing.assert_close(tp, rp, rtol=1e-5, atol=1e-6, msg=f"param {i}")
        assert tri_opt.state[tp]["xi"] == pytest.approx(ref_opt.state[rp]["xi"], rel=1e-4)


def test_parameters_cast_after_their_state_was_made_step_as_on_the_reference():
    """``p.data = p.data.to(dtype)`` mid-run keeps the fp32 state: a dense bucket cast to fp64
    took the fused passes, which write no fp64 parameter (a ValueError from the launcher),
    while factored buckets and the reference backend step on; bf16 stays on the kernels."""
    for dtype in (torch.float64, torch.bfloat16):
        weights = {}
        for backend in ("reference", "triton"):
            params = _params(torch.float32)
            opt = Adapprox(params, backend=backend, seed=3, k_max=2)
            for step in range(3):
                if step == 1:
                    for p in params:
                        p.grad, p.data = None, p.data.to(dtype)
                for p, g in zip(params, _grads(step, dtype if step else torch.float32)):
                    p.grad = g
                opt.step()
            weights[backend] = params
        for ref, got in zip(weights["reference"], weights["triton"]):
            assert got.dtype == dtype and got.shape == ref.shape
            torch.testing.assert_close(
                got.float(), ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-5
            )


def test_a_bucket_of_states_made_before_and_after_a_cast_steps_on_triton():
    """``model.to(torch.bfloat16)`` after some steps, where one member of a bucket had no
    gradient (no state) until then: its first moment is made in bf16, the other's (fp32 before)
    takes the cast's dtype too, so the fused passes get one dtype a table; the dense bucket
    raised from the launcher ("a table needs one shape, dtype, device") after its step counts
    had moved."""
    shapes = [(7,), (7,), (8, 6), (8, 6)]
    weights = {}
    for backend in ("triton", "reference"):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in shapes]
        opt = Adapprox(params, backend=backend, seed=3, k_max=2, oversample=1, power_iters=1)
        for step in range(4):
            if step == 2:
                for p in params:
                    p.data = p.data.to(torch.bfloat16)
            for i, p in enumerate(params):
                grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)
                p.grad = grad if step >= 2 or i % 2 == 0 else None
            opt.step()
        assert [opt.state[p]["exp_avg"].dtype for p in params] == [torch.bfloat16] * 4
        weights[backend] = params
    for ref, got in zip(weights["reference"], weights["triton"]):
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-5)


def test_a_tensor_lr_changed_in_place_reaches_the_kernels():
    """``group["lr"]`` as a 0-d tensor that a scheduler fills in place (torch.optim's habit with
    tensor learning rates): the update passes must take each step's value. A cache keyed by the
    tensor object used to keep the first one."""
    runs = {}
    for backend in ("reference", "triton"):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(DEVICE))
                  for i, s in enumerate([(20, 33), (7,)])]  # fmt: skip
        opt = Adapprox(params, backend=backend, seed=0, **BASE)
        lr = opt.param_groups[0]["lr"] = torch.tensor(0.01)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i)).to(DEVICE)
            opt.step()
            lr.fill_(lr.item() * 10)
        runs[backend] = params
    for tp, rp in zip(runs["triton"], runs["reference"]):
        torch.testing.assert_close(tp, rp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("graphs", [False, True])
def test_an_lr_tensor_is_read_once_a_step_on_triton(monkeypatch, graphs):
    """Reading a CUDA lr tensor syncs with the device: the step reads it once (its check), not
    again for each bucket's update, eager or through the graphs (a stand-in here)."""
    params = _params(torch.float32)
    opt = Adapprox(params, backend="triton", seed=3, cuda_graphs=graphs, **BASE)
    if graphs:
        _use_graphs(opt, _CallsThrough())
    lr = opt.param_groups[0]["lr"] = torch.tensor(BASE["lr"])
    reads, real = [], torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(t) or real(t))
    for step in range(3):
        for p, g in zip(params, _grads(step, torch.float32)):
            p.grad = g
        reads.clear()
        opt.step()
        assert sum(t is lr for t in reads) == 1


def _assert_same_run(ref_params, ref_opt, tri_params, tri_opt, dtype):
    """Parameters and every state entry of the two optimizers agree (TOL for the dtype)."""
    for i, (rp, tp) in enumerate(zip(ref_params, tri_params)):
        assert tp.dtype == dtype
        torch.testing.assert_close(tp.float(), rp.float(), rtol=TOL[dtype], atol=1e-5, msg=f"param {i}")
        ref_state, tri_state = ref_opt.state[rp], tri_opt.state[tp]
        assert ref_state.keys() == tri_state.keys()
        for key, want in ref_state.items():
            got = tri_state[key]
            if torch.is_tensor(want):
                assert got.dtype == want.dtype and got.shape == want.shape, (i, key)
                if key in ("Q", "U"):
                    # Rounding differences (compiled tf32x3 products vs cuBLAS fp32 on a GPU, FMA
                    # order anywhere) turn the basis of near-equal small singular values by more
                    # than rounding (seen: 1.7e-5 in the 2nd column of the nearly rank-1 matrix 1
                    # under the interpreter): compare what the factors stand for, Q Uᵀ.
                    if key == "Q":
                        rebuilt = tri_state["Q"] @ tri_state["U"].T, ref_state["Q"] @ ref_state["U"].T
                        torch.testing.assert_close(*rebuilt, rtol=1e-4, atol=1e-5, msg=f"param {i} Q Uᵀ")
                    continue
                tol = TOL[dtype] if key == "exp_avg" else 1e-4
                torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=1e-5, msg=f"param {i} {key}")
            elif isinstance(want, float):
                assert got == pytest.approx(want, rel=1e-4, abs=1e-6, nan_ok=True), (i, key)
            else:
                assert got == want, (i, key)


@pytest.mark.parametrize(
    "options,passes,shape",
    [
        (dict(power_iters=5), 11, (12, 10)),  # 2 per iteration (the first also reduces ‖V‖² and the RMS) + the update
        (dict(warm_start=True, warm_power_iters=1), 3, (12, 10)),
        (dict(power_iters=2, cosine_guidance=True), 6, (12, 10)),  # + the cosine reduction
        (dict(power_iters=1, k_max=64), 5, (66, 67)),  # a 65-column sketch: each product reads G twice
        (dict(power_iters=1, k_max=63), 3, (66, 67)),  # a 64-column sketch: once
    ],
)
def test_passes_over_g_per_step(monkeypatch, options, passes, shape):
    """The kernels' own count, and bench/traffic_bound.py's, on which its byte floors rest."""
    from bench.traffic_bound import Step, g_passes

    from adapprox_kernels.triton_backend import TritonBackend

    ops = []
    build = TritonBackend.second_moment

    def recording(*args, **kwargs):
        ops.append(build(*args, **kwargs))
        return ops[-1]

    monkeypatch.setattr(TritonBackend, "second_moment", staticmethod(recording))
    p = torch.nn.Parameter(torch.randn(shape, device=DEVICE))
    options = {"k_max": 2, **options}
    opt = Adapprox([p], backend="triton", oversample=1, **options)
    for _ in range(2):  # the second step is warm when warm_start is on
        p.grad = torch.randn(shape, device=DEVICE)
        opt.step()
    assert ops[-1].g_passes == passes
    warm = options.get("warm_start", False)
    iters = options["warm_power_iters"] if warm else options["power_iters"]
    step = Step("", iters, options["k_max"], cosine=options.get("cosine_guidance", False), oversample=1)
    assert g_passes(step, *shape) == passes


NO_MOMENTUM = dict(betas=(0.0, 0.999, 0.0))


@pytest.mark.parametrize(
    "options,factored,dense",
    [
        ({}, [11, 11], [2, 2]),  # cold l = 5: 2 products per iteration + the update; dense: sums + update
        (NO_MOMENTUM, [11, 11], [2, 2]),
        (dict(warm_start=True), [11, 3], [2, 2]),  # the first step has no factors: cold
        (dict(power_iters=2, cosine_guidance=True), [6, 6], [0, 0]),  # + the cosine sums; dense: plain PyTorch
        (dict(power_iters=2, cosine_guidance=True, **NO_MOMENTUM), [5, 5], [2, 2]),  # no momentum: no cosine
    ],
)
def test_kernel_launches_over_g_per_step(monkeypatch, options, factored, dense):
    """docs/kernels.md's passes over G per step, counted as launches of the kernels that read G
    (not ``g_passes``, the operator's own count): a 12×10 matrix (3 sketch columns: one launch
    per pass) and a vector, two steps."""
    from adapprox_kernels.kernels.v_matmul import _v_matmul_kernel

    launched = []
    kernel_class = type(_v_matmul_kernel)  # the interpreter's or the JIT's: both launch through run()
    run = kernel_class.run

    def recording(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", recording)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in ((12, 10), (7,))]
    opt = Adapprox(params, backend="triton", k_max=2, oversample=1, **options)
    got_factored, got_dense = [], []
    for _ in range(2):
        launched.clear()
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        got_dense.append(sum(name.startswith("_dense_") for name in launched))
        got_factored.append(len(launched) - got_dense[-1])
    assert (got_factored, got_dense) == (factored, dense)


@pytest.mark.parametrize("cosine", [False, True])
def test_nonfinite_check_rides_on_the_first_pass(monkeypatch, cosine):
    """Every gradient is checked by the RMS sum that the first pass over it reduces anyway
    (S-RSI's first product, the dense buckets' sums pass), not by a pass of its own; only dense
    buckets with cosine guidance, which take the plain-PyTorch path, reach the max-norm check."""
    import adapprox_kernels.optim_base as base_module

    params = _params(torch.float32)
    opt = Adapprox(params, backend="triton", seed=3, **BASE, cosine_guidance=cosine)
    checked = []
    max_norms = base_module._max_norms
    monkeypatch.setattr(base_module, "_max_norms", lambda ts: checked.extend(t.shape for t in ts) or max_norms(ts))
    for p, g in zip(params, _grads(0, torch.float32)):
        p.grad = g
    opt.step()
    dense = sorted(p.shape for p in params if "Q" not in opt.state[p])
    assert len(dense) == 3  # the folded 2×5×9, the vector and the scalar
    assert sorted(checked) == (dense if cosine else [])


@pytest.mark.parametrize("cosine", [False, True])
def test_one_host_read_per_step_when_every_bucket_runs_ahead(monkeypatch, cosine):
    """Where every gradient's check rides on a first pass, the updates are launched behind the
    device gate and the step reads the device once: the check, ξ and the orthonormalizer's
    flags together. Dense buckets with cosine guidance take the plain path, whose check must
    be read before their update: two reads."""
    import adapprox_kernels.adapprox as adapprox_module
    import adapprox_kernels.optim_base as base_module

    reads = []
    to_host = base_module.to_host

    def counting(values):
        reads.append(sum(torch.is_tensor(v) for v in values))
        return to_host(values)

    monkeypatch.setattr(base_module, "to_host", counting)
    monkeypatch.setattr(adapprox_module, "to_host", counting)
    params = _params(torch.float32)
    groups = [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}]
    opt = Adapprox(groups, backend="triton", seed=3, **BASE, cosine_guidance=cosine)
    for step in range(3):
        for p, g in zip(params, _grads(step, torch.float32)):
            p.grad = g
        reads.clear()
        with NoHostReads():  # and no read but those: no scalar read, no solver's check
            opt.step()
        assert len([n for n in reads if n]) == (2 if cosine else 1), reads


def _run_with_bad_gradient(backend, policy, bad, steps=3, bad_step=1, graphs_stand_in=None):
    """``steps`` steps of ``_grads``; at ``bad_step`` gradient ``bad[0]`` gets ``bad[1]`` at
    one entry. With ``"raise"`` that step raises and is taken again with clean gradients."""
    params = _params(torch.float32)
    opt = Adapprox(params, backend=backend, seed=3, nonfinite=policy, **BASE, cuda_graphs=graphs_stand_in is not None)
    if graphs_stand_in is not None:
        _use_graphs(opt, graphs_stand_in)
    for step in range(steps):
        grads = _grads(step, torch.float32)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if step == bad_step:
            index, value = bad
            params[index].grad.view(-1)[3] = value
            if policy == "raise":
                with pytest.raises(FloatingPointError, match=rf"\[{index}\]"):
                    opt.step()
                for p, g in zip(params, grads):
                    p.grad = g
        opt.step()
    return params, opt


# A matrix batched with another, a lone factored matrix, a dense (too small) one, a vector.
# (parameter, entry): NaN and inf, and finite entries whose squares overflow V (above √max ≈
# 1.8e19 in fp32), which would freeze a dense V at inf: the kernels flag them from the RMS sum.
BAD = [(0, float("nan")), (2, float("inf")), (3, float("-inf")), (4, float("nan")), (0, 2e19), (4, -3e19)]


@pytest.mark.parametrize("index", [0, 4])
def test_gradients_just_below_the_limit_step_alike(index):
    """An entry of 1.8e19 (its square still fits in fp32) is a gradient like any other: both
    backends step, with finite state, and agree."""
    runs = []
    for backend in ("reference", "triton"):
        params = _params(torch.float32)
        opt = Adapprox(params, backend=backend, seed=3, **BASE)
        for step in range(2):
            for p, g in zip(params, _grads(step, torch.float32)):
                p.grad = g
            params[index].grad.view(-1)[3] = 1.8e19
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*overflowed float32")  # matrix 0: S-RSI squares V
                opt.step()
        assert all(torch.isfinite(v).all() for v in opt.state[params[index]].values() if torch.is_tensor(v))
        runs.append((params, opt))
    _assert_same_run(*runs[0], *runs[1], torch.float32)


def test_a_finite_gradient_whose_update_squares_overflow_steps_as_on_the_reference():
    """Entries of 3e-20 with β2 = 1 − 1e-7: (1 − β2)·G² underflows, V is 0, each update entry is
    G/ε ≈ 2.5e18 and the RMS sum overflows to +inf in every matrix and the dense one. That is
    no bad gradient (the clip divisor's cap takes it, as on the reference); the kernels' sums
    flagged it, and the step raised "gradient entries above 1.84e+19" on the Triton backend."""
    runs = []
    for backend in ("reference", "triton"):
        params = _params(torch.float32)
        opt = Adapprox(params, backend=backend, seed=3, **{**BASE, "betas": (0.9, 1 - 1e-7, 0.0), "eps": 1.2e-38})
        for step in range(2):
            for p, g in zip(params, _grads(step, torch.float32)):
                p.grad = 3e-20 * g.sign()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*overflowed float32")
                warnings.filterwarnings("ignore", "overflow encountered")  # the interpreter's sums
                opt.step()
        assert all(s["nonfinite_skips"] == 0 and s["step"] == 2 for s in opt.state.values())
        runs.append((params, opt))
    _assert_same_run(*runs[0], *runs[1], torch.float32)


@pytest.mark.parametrize("bad", BAD)
def test_nonfinite_raise_on_triton_changes_nothing(bad):
    """S-RSI ran before the check found the bad gradient; the raised step leaves parameters,
    state and the sketch RNG as they were, so the run goes on bit for bit as if it never came."""
    clean_params, clean_opt = _run_with_bad_gradient("triton", "raise", bad, bad_step=-1)
    params, opt = _run_with_bad_gradient("triton", "raise", bad)
    for i, (cp, p) in enumerate(zip(clean_params, params)):
        assert torch.equal(cp, p), f"param {i}"
        for key, want in clean_opt.state[cp].items():
            got = opt.state[p][key]
            assert torch.equal(got, want) if torch.is_tensor(want) else got == want or want != want, (i, key)


@pytest.mark.parametrize("fail_step", [0, 1])
@pytest.mark.parametrize(
    "where,error", [("_factored_srsi", torch.OutOfMemoryError), ("_dense_start", KeyboardInterrupt)]
)
def test_an_error_while_running_ahead_leaves_the_step_undone(monkeypatch, where, error, fail_step):
    """Out of memory (or Ctrl-C) in the second bucket of the work that runs ahead of the
    non-finite check: nothing was written, so the step did not happen, and taken again the run
    goes on bit for bit. (The step counts, the sketch RNG and the new states stayed advanced:
    the rank schedule and the bf16 rounding keys shifted, and the first step's states were
    left half made.)"""
    clean_params, clean_opt = _run_with_bad_gradient("triton", "raise", BAD[0], bad_step=-1)
    params = _params(torch.float32)
    opt = Adapprox(params, backend="triton", seed=3, **BASE)
    real, calls = getattr(Adapprox, where), []

    def second_call_fails(self, *args, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise error("simulated")
        return real(self, *args, **kwargs)

    for step in range(3):
        for p, g in zip(params, _grads(step, torch.float32)):
            p.grad = g
        if step == fail_step:
            with monkeypatch.context() as patch, pytest.raises(error):
                patch.setattr(Adapprox, where, second_call_fails)
                opt.step()
            assert len(calls) == 2
        opt.step()
    for i, (cp, p) in enumerate(zip(clean_params, params)):
        assert torch.equal(cp, p), f"param {i}"
        assert opt.state[p].keys() == clean_opt.state[cp].keys(), i
        for key, want in clean_opt.state[cp].items():
            got = opt.state[p][key]
            assert torch.equal(got, want) if torch.is_tensor(want) else got == want or want != want, (i, key)


def test_nonfinite_raise_on_the_first_triton_step_creates_no_state():
    params = _params(torch.float32)
    opt = Adapprox(params, backend="triton", seed=3, **BASE)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, _grads(0, torch.float32)):
        p.grad = g
    params[1].grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"\[1\]"):
        opt.step()
    assert not opt.state and all(torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_step_that_does_not_happen_leaves_no_first_moment(policy):
    """β1 turned on after a step without momentum, then a bad gradient: the step that runs ahead
    makes the first moments, and a raised step or a skipped parameter must not keep them, as on
    the reference backend (the state and its state_dict stay as they were; found by a
    differential campaign: the Triton run kept an ``exp_avg`` of zeros)."""
    shapes = [(12, 17), (7,)]  # a factored and a dense bucket
    keys = {}
    for backend in ("reference", "triton"):
        params = [torch.nn.Parameter(torch.ones(s, device=DEVICE)) for s in shapes]
        opt = Adapprox(params, backend=backend, seed=0, k_max=2, oversample=1, betas=(0.0, 0.9, 0.0), nonfinite=policy)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        opt.param_groups[0]["betas"] = (0.9, 0.9, 0.0)
        for p in params:
            p.grad = torch.full_like(p, float("nan"))
        with pytest.raises(FloatingPointError) if policy == "raise" else contextlib.nullcontext():
            opt.step()
        keys[backend] = [sorted(opt.state[p]) for p in params]
        assert all("exp_avg" not in opt.state[p] for p in params), (backend, keys[backend])
    assert keys["triton"] == keys["reference"]


@pytest.mark.parametrize("bad", BAD)
def test_nonfinite_skip_on_triton_matches_reference(bad):
    """'skip' steps every other parameter (the bad one's batch mate too) as the reference does."""
    ref_params, ref_opt = _run_with_bad_gradient("reference", "skip", bad)
    tri_params, tri_opt = _run_with_bad_gradient("triton", "skip", bad)
    assert tri_opt.state[tri_params[bad[0]]]["nonfinite_skips"] == 1
    assert tri_opt.state[tri_params[bad[0]]]["step"] == 2
    _assert_same_run(ref_params, ref_opt, tri_params, tri_opt, torch.float32)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_with_graphed_calls_matches_eager(monkeypatch, policy):
    """A bad gradient found after the graphed S-RSI ran and the updates were queued: the queued
    updates are dropped, and the step ends as the eager one does."""
    bad = BAD[0]
    eager_params, eager_opt = _run_with_bad_gradient("triton", policy, bad)
    monkeypatch.setattr(Adapprox, "_graphable", staticmethod(lambda group, *args: group["cuda_graphs"]))
    calls = _CallsThrough(eager_runs=0)
    graph_params, graph_opt = _run_with_bad_gradient("triton", policy, bad, graphs_stand_in=calls)
    assert sum(key[0] == "batch" for key in calls.keys) >= 4
    _assert_same_bits(eager_params, eager_opt, graph_params, graph_opt)


@pytest.mark.gpu
@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("graphs", [False, True])
def test_one_host_sync_per_step_on_cuda(warm, graphs):
    """A step waits for the GPU once: the non-finite gradient check, read with every ξ (the
    updates were launched behind the device gate). Anything else (an index or a mask copied
    from the host each step) shows up here; with ``cuda_graphs``, the checked step is a replay.
    Two param groups (the usual decay / no-decay split) still check their gradients together."""

    params = _params(torch.float32)
    groups = [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}]
    opt = Adapprox(groups, backend="triton", seed=3, **BASE, warm_start=warm, cuda_graphs=graphs)
    for p, g in zip(params, _grads(0, torch.float32)):
        p.grad = g
    for step in range(8):  # the first steps create state and fill the caches (and capture)
        opt.step()
    # Empty the caches of rank masks and matrix tables: building them anew must not sync either.
    from adapprox_kernels.kernels import _launch
    from adapprox_kernels.srsi import _MASKS

    _launch._TABLES.clear()
    _MASKS.clear()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1, syncs
    assert opt.cuda_graph_counts.get("replayed", 0) > 0 if graphs else not opt.cuda_graph_counts


def _assert_same_bits(eager_params, eager_opt, graph_params, graph_opt):
    """Parameters and every state entry are the same bits (NaN ξ equal to NaN)."""
    for i, (ep, gp) in enumerate(zip(eager_params, graph_params)):
        assert torch.equal(ep, gp), f"param {i}"
        for key, want in eager_opt.state[ep].items():
            got = graph_opt.state[gp][key]
            assert torch.equal(got, want) if torch.is_tensor(want) else got == want or want != want, (i, key)


def _graph_run(dtype, options, graphs, steps, fixed_grads, graphs_stand_in=None, cycle_beta1=False):
    """``steps`` steps with a new learning rate each (and β1, as OneCycleLR cycles it, if
    ``cycle_beta1``); gradients copied into the same tensors from the second step on when
    ``fixed_grads`` (the addresses a graph needs), new ones else."""
    params = _params(dtype)
    opt = Adapprox(params, backend="triton", seed=3, cuda_graphs=graphs, **options)
    if graphs_stand_in is not None:
        _use_graphs(opt, graphs_stand_in)
    for step in range(steps):
        opt.param_groups[0]["lr"] = options["lr"] / (1 + step)
        if cycle_beta1:
            opt.param_groups[0]["betas"] = (0.85 + 0.01 * step, *opt.param_groups[0]["betas"][1:])
        for p, g in zip(params, _grads(step, dtype)):
            if fixed_grads and p.grad is not None:
                p.grad.copy_(g)
            else:
                p.grad = g
        opt.step()
    return params, opt


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("fixed_grads", [True, False])
@pytest.mark.parametrize("cycle_beta1", [False, True])
def test_cuda_graphs_give_the_eager_bits(name, fixed_grads, cycle_beta1):
    """Replayed steps write the same parameters and state as eager ones, with the learning rate
    (and β1) changing every step; the ranks settle within a few steps, after which the graphs
    replay."""
    dtype, extra = CONFIGS[name]
    options = {**BASE, **extra}
    eager_params, eager_opt = _graph_run(dtype, options, False, 10, fixed_grads, cycle_beta1=cycle_beta1)
    graph_params, graph_opt = _graph_run(dtype, options, True, 10, fixed_grads, cycle_beta1=cycle_beta1)
    if fixed_grads:
        assert graph_opt.cuda_graph_counts.get("replayed", 0) > 0, graph_opt.cuda_graph_counts
    assert graph_opt.cuda_graph_counts.get("failed", 0) == 0
    _assert_same_bits(eager_params, eager_opt, graph_params, graph_opt)


@pytest.mark.gpu
@pytest.mark.parametrize("warm", [False, True])
def test_cuda_graphs_with_rayleigh_ritz_give_the_eager_bits(warm):
    """Real captures of a Rayleigh–Ritz bucket's S-RSI, with the Jacobi kernel that CUDA buckets
    take (the tests that run it elsewhere go through stand-ins, which capture nothing): replayed
    steps give the eager bits, and no capture fails."""
    options = {**BASE, "truncation": "rayleigh_ritz", "warm_start": warm}
    eager_params, eager_opt = _graph_run(torch.float32, options, False, 10, True)
    graph_params, graph_opt = _graph_run(torch.float32, options, True, 10, True)
    counts = graph_opt.cuda_graph_counts
    assert counts.get("replayed", 0) > 0 and counts.get("failed", 0) == 0, counts
    _assert_same_bits(eager_params, eager_opt, graph_params, graph_opt)


def test_graph_key_of_a_named_group_is_hashable():
    """Groups carry lists (``param_names``, betas given as a list): the key must still hash,
    and must not depend on α, λ or β1 (only on whether β1 is 0), which a replay reads from the
    device."""
    model = torch.nn.Linear(8, 8)
    opt = Adapprox(model.named_parameters(), betas=[0.9, 0.999, 0.9], cuda_graphs=True)
    group = opt.param_groups[0]
    key = opt._baked_hyperparameters(group)
    hash(key)
    group["lr"], group["weight_decay"] = 0.5, 0.0
    opt._baked.clear()  # as each step does: the key is computed once a step
    assert opt._baked_hyperparameters(group) == key
    group["betas"] = (0.8, 0.999, 0.9)  # a replay reads β1 from the device too
    opt._baked.clear()
    assert opt._baked_hyperparameters(group) == key
    for changed in ({"betas": (0.0, 0.999, 0.9)}, {"eps": 1e-6}):  # β1 = 0: no momentum at all
        opt._baked.clear()
        assert opt._baked_hyperparameters({**group, **changed}) != key


def test_cuda_graphs_need_a_bool():
    with pytest.raises(ValueError, match="cuda_graphs"):
        Adapprox([torch.nn.Parameter(torch.zeros(4, 4))], cuda_graphs="yes")


@pytest.mark.parametrize("precision", ["tf32", "tf32_rn", "ieee"])
def test_product_precision_reaches_the_products(monkeypatch, precision):
    """``product_precision`` is what every V product launches with, S-RSI's range products
    too (not only its last one); the step stays close to the default one (tf32 rounds the
    sketch products' inputs to 10-bit mantissas)."""
    from adapprox_kernels.kernels import v_matmul

    seen = []
    launch = v_matmul._launch

    def recording(*args):
        seen.append(args[-1])
        return launch(*args)

    monkeypatch.setattr(v_matmul, "_launch", recording)
    runs, launched = [], []
    for options in ({}, {"product_precision": precision}):
        seen.clear()
        params, _ = _run("triton", torch.float32, {**BASE, **options}, steps=2, round_trip_at=None)
        runs.append(params)
        launched.append(set(seen))
    assert launched == [{None}, {precision}]
    for default, chosen in zip(*runs):
        torch.testing.assert_close(chosen, default, rtol=1e-2, atol=1e-3)


def test_tf32_range_keeps_the_last_product_at_the_default(monkeypatch):
    """``"tf32_range"``: every S-RSI product that only chooses the subspace launches with tf32;
    the last ``Vᵀ Q``, which becomes the factor U, with the device default (None)."""
    from adapprox_kernels.kernels import v_matmul

    seen = []
    launch = v_matmul._launch

    def recording(*args):
        seen.append((args[6], args[-1]))  # (transposed: Vᵀ @ Y, precision)
        return launch(*args)

    monkeypatch.setattr(v_matmul, "_launch", recording)
    options = {**BASE, "product_precision": "tf32_range", "power_iters": 3}
    default, _ = _run("triton", torch.float32, {**BASE, "power_iters": 3}, steps=2, round_trip_at=None)
    seen.clear()
    params, _ = _run("triton", torch.float32, options, steps=2, round_trip_at=None)
    one_srsi = [(False, "tf32"), (True, "tf32")] * 2 + [(False, "tf32"), (True, None)]
    assert seen == one_srsi * 2 * 2  # two factored shapes, two steps
    for d, p in zip(default, params):
        torch.testing.assert_close(p, d, rtol=1e-2, atol=1e-3)


def test_graph_replay_copies_inputs_one_foreach_per_dtype(monkeypatch):
    """A replay loads its inputs into the buffers the capture read: one foreach copy per dtype
    (a mixed list would copy tensor by tensor), every input in its own buffer."""
    from adapprox_kernels.cuda_graphs import _Captured

    buffers = [torch.zeros(3), torch.zeros(2, 2, dtype=torch.bool), torch.zeros(4)]
    captured = _Captured(graph=None, inputs=buffers, outputs=(), constants=[])
    copies, real = [], torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: copies.append(len(dst)) or real(dst, src))
    new = [torch.arange(3.0), torch.eye(2, dtype=torch.bool), torch.full((4,), 7.0)]
    captured.load(new)
    assert copies == [2, 1]  # the two float inputs in one copy, the bool one in another
    assert all(torch.equal(b, n) for b, n in zip(buffers, new))


class _CallsThrough(CallGraphs):
    """Stands in for CallGraphs where there is no GPU: runs each graphable call (a batch of
    deferred ones is one call) on copies of its inputs, as a captured graph reads its own
    buffers, and keeps the keys it was given."""

    def __init__(self, eager_runs: int = 2):
        super().__init__(eager_runs=eager_runs)
        self.keys = []

    def _run_signed(self, key, fn, inputs, calls, entry=None):
        self.keys.append(key[0])
        return fn(*[t.clone() for t in inputs])


def test_an_interrupted_capture_forgets_the_constants_it_made(monkeypatch):
    """Ctrl-C (any BaseException) inside a capture forgets the cached constants, as a failed
    capture does (one first made there holds nothing: the capture recorded its copy without
    running it), and the interrupt goes on. CUDA's graph and stream API stubbed, on any device."""
    from adapprox_kernels import cuda_graphs

    class Stub:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

        def capture_begin(self):
            pass

        def capture_end(self):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Stub)
    monkeypatch.setattr(torch.cuda, "Stream", Stub)
    monkeypatch.setattr(torch.cuda, "current_stream", Stub)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    forgotten = []
    monkeypatch.setattr(cuda_graphs, "forget_constants", lambda: forgotten.append(True))

    def interrupted(x):
        raise KeyboardInterrupt

    graphs = CallGraphs(eager_runs=0)
    with pytest.raises(KeyboardInterrupt):
        graphs.run("call", interrupted, [torch.zeros(2)])
    assert forgotten == [True] and len(graphs) == 0


def _use_graphs(opt: Adapprox, graphs: CallGraphs) -> None:
    """``opt`` runs its graphable calls through the stand-in ``graphs``, which may look at its
    param groups (see :class:`_FirstCallUnderKey`)."""
    opt._graphs = graphs
    graphs.groups = opt.param_groups


def test_deferred_calls_run_together_in_queue_order():
    """Deferred calls wait until one's outputs are read, then run in queue order: one by one
    the first two times, then as one batch keyed by their keys and how their inputs alias (a
    shared input is passed once)."""
    graphs = _CallsThrough()
    shared = torch.ones(2)
    seen = []

    def call(name):
        def fn(x, y):
            seen.append((name, x, y))
            return (x + y,)

        return fn

    for step in range(3):
        seen.clear()
        a = graphs.defer("a", call("a"), (shared, torch.full((2,), 2.0)))
        b = graphs.defer("b", call("b"), (torch.full((2,), 3.0), shared))
        assert seen == []
        if step == 0:
            with pytest.raises(RuntimeError, match="never run"):
                graphs.next_step()
        assert torch.equal(b.outputs[0], torch.full((2,), 4.0))  # reading one runs both
        assert [name for name, _, _ in seen] == ["a", "b"] and torch.equal(a.outputs[0], torch.full((2,), 3.0))
        graphs.flush()  # nothing queued: nothing runs
        assert len(seen) == 2
        graphs.next_step()
    assert graphs.keys == ["a", "b", "a", "b", ("batch", ("a", "b"), ((0, 1), (2, 0)))]
    assert seen[0][1] is seen[1][2]  # one copy of the shared input
    c = graphs.defer("c", call("c"), (shared, shared))
    graphs.discard_queued()
    graphs.next_step()
    assert c.outputs is None and len(graphs.keys) == 5


class _StubCaptures(CallGraphs):
    """CallGraphs whose "capture" runs the call once and stores a graph that replays nothing:
    its own keys, counts and cache without a GPU."""

    class _NoGraph:
        def replay(self) -> None:
            pass

    def _capture(self, key, fn, inputs, calls):
        from adapprox_kernels.cuda_graphs import _Captured

        static = [t.clone() for t in inputs]
        outputs = fn(*static)
        self._store(key, _Captured(self._NoGraph(), static, outputs, []), calls)
        self.counts["captured"] += 1
        return outputs


def test_graph_cache_counts_a_batch_as_its_calls():
    """``capacity`` bounds the calls the kept graphs hold (their memory), beyond those run in
    this step or the last: the least recently run go first; failed captures hold nothing and
    stay."""
    from adapprox_kernels.cuda_graphs import _Captured

    def graph():
        return _Captured(_StubCaptures._NoGraph(), [], (), [])

    graphs = CallGraphs(capacity=4)
    graphs._store("a", graph(), 1)
    graphs._store("batch", graph(), 3)
    graphs._store("b", graph(), 1)
    assert list(graphs._graphs) == ["a", "batch", "b"]  # all run in this step
    graphs.next_step()
    graphs.next_step()
    graphs._run_signed("a", lambda: (), [], 1, graphs._graphs["a"])  # a replay is a use
    graphs._store("c", graph(), 1)
    assert list(graphs._graphs) == ["a", "b", "c"]  # "batch": the least recently run, and enough
    graphs._store("failed", None, 5)
    assert list(graphs._graphs) == ["a", "b", "c", "failed"]  # nothing held: nothing goes
    graphs.next_step()
    graphs.next_step()
    graphs._store("huge", graph(), 9)  # more than the capacity: kept, the rest goes
    assert sorted(graphs._graphs) == ["failed", "huge"]


def test_a_failed_capture_forgets_the_device_constants_made_inside_it(monkeypatch):
    """A constant first made inside a capture (here a column mask) is only recorded into the
    graph, never copied: when the capture fails, its cache must not hand it to later calls.
    CUDA stands in for fakes; the call runs eagerly after the failure, as a real one does."""
    srsi = importlib.import_module("adapprox_kernels.srsi")  # the package's srsi is the function

    class Stream:
        def wait_stream(self, other):
            pass

    class FailingGraph:
        def capture_begin(self):
            pass

        def capture_end(self):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FailingGraph)
    srsi._MASKS.clear()
    masks = []

    def call(t):
        masks.append(srsi.column_mask((1, 2), 2, t.device))
        return (t * masks[-1].sum(),)

    graphs = CallGraphs()
    with pytest.warns(RuntimeWarning, match="capture failed") as warned:
        (out,) = graphs._capture("key", call, [torch.ones(3)], 1)
    assert [w.filename for w in warned] == [__file__]  # the caller's line, not the package's
    assert torch.equal(out, torch.full((3,), 3.0)) and graphs.counts["failed"] == 1
    assert len(graphs) == 0  # the failed key stays (it runs eagerly for good) but holds no graph
    captured, eager = masks
    assert eager is not captured  # made anew, not the capture's unfilled one from the cache
    # The other caches of device constants go too: offset tables and update scalars.
    from adapprox_kernels import transfer
    from adapprox_kernels.kernels import _launch

    _launch.MatrixTable([torch.ones(2, 3)], "grads")
    transfer.update_scalars(0.1, 0.0, 0.9, torch.device("cpu"))
    assert _launch._TABLES and transfer._update_scalars.cache_info().currsize
    transfer.forget_constants()
    assert not _launch._TABLES and not transfer._update_scalars.cache_info().currsize


def test_graph_cache_keeps_what_each_step_runs():
    """More graphed calls a step than the capacity (per-layer param groups give ~80 buckets):
    the steps settle into replays. Dropping the least recently used dropped what the next
    step needed, which then captured again, every step."""
    graphs = _StubCaptures(capacity=4)
    x = torch.zeros(1)
    for _ in range(5):
        counts = dict(graphs.counts)
        for key in range(6):
            graphs.run(key, lambda v: (v + 1,), [x])
        graphs.next_step()
    assert graphs.counts["captured"] == 6 and len(graphs) == 6
    assert graphs.counts["replayed"] - counts.get("replayed", 0) == 6  # the last step


def test_graph_cache_keeps_graphs_run_in_the_last_step():
    """Graphs run in the last step are kept beyond the capacity as this step's are (a key that
    runs every other step would otherwise be captured again each time it comes up); unused for
    a whole step, they go."""
    from adapprox_kernels.cuda_graphs import _Captured

    def graph():
        return _Captured(_StubCaptures._NoGraph(), [], (), [])

    graphs = CallGraphs(capacity=2)
    graphs._store("a", graph(), 1)
    graphs._store("b", graph(), 1)
    graphs.next_step()
    for key in ("a", "b"):
        graphs._run_signed(key, lambda: (), [], 1, graphs._graphs[key])
    graphs.next_step()
    graphs._store("c", graph(), 1)
    assert list(graphs._graphs) == ["a", "b", "c"]  # a and b ran in the last step
    graphs.next_step()
    graphs._store("d", graph(), 1)
    assert list(graphs._graphs) == ["c", "d"]  # a and b: not in this step or the last


def test_a_key_is_captured_after_eager_runs_and_forgotten_after_forget_after_steps():
    """A key runs eagerly ``eager_runs`` times, then is captured and replayed; its eager runs
    count while it comes back within ``forget_after`` steps, and start over after that."""
    x = torch.zeros(1)

    def call(v):
        return (v + 1,)

    graphs = _StubCaptures(eager_runs=2)
    for _ in range(4):
        graphs.run("key", call, [x])
    assert dict(graphs.counts) == {"eager": 2, "captured": 1, "replayed": 1}
    graphs = _StubCaptures(eager_runs=1, forget_after=2)
    graphs.run("back in time", call, [x])
    graphs.run("too late", call, [x])
    graphs.next_step()
    graphs.next_step()
    graphs.run("back in time", call, [x])  # unseen for one step: its eager run counts
    assert dict(graphs.counts) == {"eager": 2, "captured": 1}
    graphs.next_step()
    graphs.run("too late", call, [x])  # unseen for forget_after steps: starts over
    assert dict(graphs.counts) == {"eager": 3, "captured": 1}


def test_an_evicted_key_starts_over():
    """A key whose graph the cache dropped runs eagerly ``eager_runs`` times again before its
    next capture, as an unseen key does: a bucket evicted while its ranks move is not captured
    again for a single step."""
    x = torch.zeros(1)

    def call(v):
        return (v + 1,)

    graphs = _StubCaptures(eager_runs=1, capacity=1)
    for key in ("a", "a", "b", "b"):  # captured on each key's second run
        graphs.run(key, call, [x])
    graphs.next_step()
    graphs.next_step()
    graphs.run("c", call, [x])
    graphs.run("c", call, [x])  # its capture drops a and b, unused since two steps
    assert [key for key, _ in graphs._graphs] == ["c"] and graphs.counts["captured"] == 3
    graphs.run("a", call, [x])
    assert graphs.counts["captured"] == 3 and graphs.counts["eager"] == 4  # eager first
    graphs.run("a", call, [x])
    assert graphs.counts["captured"] == 4


def test_a_capture_replays_once_and_reads_buffers_of_its_own(monkeypatch):
    """Capturing runs nothing on a GPU: the capturing call replays the graph once, or its step's
    work would be left undone. The graph reads buffers of its own, which each replay loads: the
    tensors the captured call was given stay the caller's (a replay that loaded its inputs into
    them would write over them). CUDA stands in for fakes whose graph records the call's work
    between capture_begin and capture_end, and replays it."""

    class Stream:
        def wait_stream(self, other):
            pass

    recording: list = []  # the graph being captured, if any

    class Graph:
        def __init__(self):
            self.work, self.replays = [], 0

        def capture_begin(self):
            recording.append(self.work)

        def capture_end(self):
            recording.pop()

        def replay(self):
            self.replays += 1
            for kernel in self.work:
                kernel()

    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)

    def call(x):
        out = torch.full_like(x, float("nan"))

        def kernel():
            torch.mul(x, 2, out=out)

        if recording:
            recording[-1].append(kernel)  # captured, not run
        else:
            kernel()
        return (out,)

    graphs = CallGraphs(eager_runs=0)
    first = torch.ones(3)
    (out,) = graphs.run("key", call, [first])
    assert graphs.counts["captured"] == 1 and graphs._graphs[graphs._signed("key", [first])][0].graph.replays == 1
    assert torch.equal(out, torch.full((3,), 2.0))  # this step's work was done
    (again,) = graphs.run("key", call, [torch.full((3,), 5.0)])
    assert graphs.counts["replayed"] == 1 and again is out and torch.equal(again, torch.full((3,), 10.0))
    assert torch.equal(first, torch.ones(3))  # the captured call's input is still the caller's


def test_device_constants_are_kept_with_a_graph_captured_around_them():
    """A constant copied to the device inside :func:`keeping_constants` (inside a capture, the
    copy is recorded into the graph, which writes the tensor at each replay) is collected, so
    that the graph holds it after the cache that made it has let it go; the update scalars
    are ``[α, 1 − α·λ, β1, 1 − β1]``, rounded once from float64."""
    from adapprox_kernels import transfer

    transfer.forget_constants()
    cpu = torch.device("cpu")
    with transfer.keeping_constants() as kept:
        scalars = transfer.update_scalars(0.25, 0.1, 0.9, cpu)
        keys = transfer.rounding_keys_tensor([1, 2], cpu)
    assert any(t is scalars for t in kept) and any(t is keys for t in kept)
    assert torch.equal(scalars, torch.tensor([0.25, 1 - 0.25 * 0.1, 0.9, 1 - 0.9], dtype=torch.float32))


def test_each_thread_keeps_its_own_device_constants():
    """Two threads capturing graphs at once: each :func:`keeping_constants` block collects the
    constants its own thread hands out, none of the other's (with one shared list, a constant
    went to whichever block opened last, and the graph that needed it lost it)."""
    import threading

    from adapprox_kernels import transfer

    mine, theirs = torch.zeros(1), torch.ones(1)
    opened, handed = threading.Event(), threading.Event()
    other: dict[str, list] = {}

    def capture_elsewhere():
        with transfer.keeping_constants() as kept:
            opened.set()
            handed.wait(timeout=5)
            transfer.handed_out(theirs)
        other["kept"] = kept

    thread = threading.Thread(target=capture_elsewhere)
    thread.start()
    opened.wait(timeout=5)  # the other thread's block is open, and opened after this one's would be
    with transfer.keeping_constants() as kept:
        transfer.handed_out(mine)
        handed.set()
        thread.join(timeout=5)
    assert [t is mine for t in kept] == [True]
    assert [t is theirs for t in other["kept"]] == [True]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batched", [False, True])
def test_graphed_calls_give_the_eager_bits(monkeypatch, name, batched):
    """The calls CUDA graphs capture (a factored bucket's S-RSI and update, which gets the first
    pass's sums as an input instead of reading G again; a dense bucket's sums pass and update),
    one by one or batched, compute what the eager step does, on any device."""
    dtype, extra = CONFIGS[name]
    options = {**BASE, **extra}
    eager_params, eager_opt = _graph_run(dtype, options, False, 5, fixed_grads=True)
    monkeypatch.setattr(Adapprox, "_graphable", staticmethod(lambda group, *args: group["cuda_graphs"]))
    calls = _CallsThrough(eager_runs=0 if batched else 100)
    graph_params, graph_opt = _graph_run(dtype, options, True, 5, fixed_grads=True, graphs_stand_in=calls)
    # Per step: S-RSI of the 2 factored buckets with the sums pass of the 3 dense ones (unless
    # cosine guidance keeps those on the plain-PyTorch path), then their updates. Batched: each
    # factored bucket's S-RSI with the dense sums queued before it (the GPU starts on them while
    # the host prepares the next bucket), any dense sums left, then every update at once.
    dense = 0 if options.get("cosine_guidance") else 3
    phases = [["dense sums"] * dense + ["srsi", "srsi"], ["dense"] * dense + ["update", "update"]]
    if batched:
        runs = [[call[0] for call in key[1]] if key[0] == "batch" else [key[0]] for key in calls.keys]
        steps, current = [], []
        for run in runs:
            current.append(run)
            if "update" in run:  # the last run of a step
                steps.append(current)
                current = []
        assert len(steps) == 5 and not current
        for *srsi_runs, updates in steps:
            assert sorted(kind for run in srsi_runs for kind in run) == phases[0]
            assert all(run.count("srsi") <= 1 and run[-1] == "srsi" for run in srsi_runs if "srsi" in run)
            assert sorted(updates) == phases[1]
    else:
        assert sorted(key[0] for key in calls.keys) == sorted((phases[0] + phases[1]) * 5)
    _assert_same_bits(eager_params, eager_opt, graph_params, graph_opt)


def test_rayleigh_ritz_by_the_jacobi_kernel_is_graphed_and_gives_the_eager_bits(monkeypatch):
    """With the sync-free Jacobi kernel (chosen for CUDA buckets on the Triton backend, here on
    any device), a Rayleigh–Ritz bucket's S-RSI and update go through the CUDA graphs and give
    the eager bits; with torch.linalg.eigh (which syncs) they stay eager."""
    from adapprox_kernels import adapprox as adapprox_module
    from adapprox_kernels.kernels.jacobi_eigh import MAX_SIZE, jacobi_eigh
    from adapprox_kernels.triton_backend import TritonBackend

    assert (
        adapprox_module._sync_free_eigh(TritonBackend, torch.device("cuda"), MAX_SIZE, torch.float32).func
        is jacobi_eigh
    )
    assert adapprox_module._sync_free_eigh(TritonBackend, torch.device("cuda"), MAX_SIZE + 1, torch.float32) is None
    assert adapprox_module._sync_free_eigh(TritonBackend, torch.device("cpu"), 8, torch.float32) is None
    # fp64 factors (float64 parameters) take float64 eigh: the kernel's fp32 vectors are not
    # orthonormal to fp64's precision.
    assert adapprox_module._sync_free_eigh(TritonBackend, torch.device("cuda"), 8, torch.float64) is None
    options = {**BASE, "truncation": "rayleigh_ritz"}
    monkeypatch.setattr(Adapprox, "_graphable", staticmethod(lambda group, *args: group["cuda_graphs"]))
    # torch.linalg.eigh, whatever the device: on a GPU the CUDA buckets take the kernel.
    monkeypatch.setattr(adapprox_module, "_sync_free_eigh", lambda backend, device, width, dtype: None)
    calls = _CallsThrough(eager_runs=100)
    _graph_run(torch.float32, options, True, 3, fixed_grads=True, graphs_stand_in=calls)
    kinds = [key[0] for key in calls.keys]
    assert "srsi" not in kinds and "update" not in kinds and "dense" in kinds  # eigh: factored buckets stay eager
    kernel = functools.partial(jacobi_eigh, descending=True)
    monkeypatch.setattr(adapprox_module, "_sync_free_eigh", lambda backend, device, width, dtype: kernel)
    eager = _graph_run(torch.float32, options, False, 3, fixed_grads=True)
    calls = _CallsThrough(eager_runs=100)
    graphed = _graph_run(torch.float32, options, True, 3, fixed_grads=True, graphs_stand_in=calls)
    kinds = [key[0] for key in calls.keys]
    assert kinds.count("srsi") == 2 * 3 and kinds.count("update") == 2 * 3
    _assert_same_bits(*eager, *graphed)


class _CallsWithoutHostReads(_CallsThrough):
    """Runs each graphable call under :class:`NoHostReads`: on a CPU, what would keep it from
    being captured on a GPU."""

    def _run_signed(self, key, fn, inputs, calls, entry=None):
        with NoHostReads():
            return super()._run_signed(key, fn, inputs, calls, entry)


@pytest.mark.parametrize("name", [*CONFIGS, "rayleigh-ritz-warm", "tf32-rn-stochastic-rounding"])
def test_graphed_calls_never_wait_for_the_device(monkeypatch, name):
    """Every call the step hands to CUDA graphs (S-RSI, updates, dense sums and updates; one by
    one and batched) runs without an op that reads the device on the host, which a capture
    cannot hold: checked here, without a GPU, on the ops the calls dispatch."""
    from adapprox_kernels import adapprox as adapprox_module
    from adapprox_kernels.kernels.jacobi_eigh import jacobi_eigh

    dtype, extra = CONFIGS.get(name, (torch.float32, {}))
    if name == "rayleigh-ritz-warm":  # with the Jacobi kernel that CUDA buckets take
        extra = dict(truncation="rayleigh_ritz", warm_start=True)
        kernel = functools.partial(jacobi_eigh, descending=True)
        monkeypatch.setattr(adapprox_module, "_sync_free_eigh", lambda backend, device, width, dtype: kernel)
    elif name == "tf32-rn-stochastic-rounding":
        dtype, extra = torch.bfloat16, dict(product_precision="tf32_rn", bf16_stochastic_round=True)
    monkeypatch.setattr(Adapprox, "_graphable", staticmethod(lambda group, *args: group["cuda_graphs"]))
    for eager_runs in (100, 0):  # every call on its own, then batched
        calls = _CallsWithoutHostReads(eager_runs=eager_runs)
        _graph_run(dtype, {**BASE, **extra}, True, 3, fixed_grads=True, graphs_stand_in=calls)
        kinds = {c[0] for key in calls.keys for c in (key[1] if key[0] == "batch" else [key])}
        assert {"srsi", "update"} <= kinds, kinds


def test_the_host_read_check_sees_a_read(monkeypatch):
    """The check above fails where a graphed call reads the device: torch.linalg.eigh in a
    Rayleigh–Ritz bucket's S-RSI, as on the reference path."""
    from adapprox_kernels import adapprox as adapprox_module

    monkeypatch.setattr(adapprox_module, "_sync_free_eigh", lambda backend, device, width, dtype: torch.linalg.eigh)
    monkeypatch.setattr(Adapprox, "_graphable", staticmethod(lambda group, *args: group["cuda_graphs"]))
    options = {**BASE, "truncation": "rayleigh_ritz"}
    with pytest.raises(AssertionError, match="_linalg_eigh.*reads the device"):
        _graph_run(torch.float32, options, True, 3, fixed_grads=True, graphs_stand_in=_CallsWithoutHostReads())


class _FirstCallUnderKey(CallGraphs):
    """Replays, for each key, the first call made under it (on copies of this call's inputs)
    with the param groups' hyperparameters set back to their values at that call, as a captured
    graph holds the Python values its call read, which the key must name (only the inputs, such
    as ``[α, 1 − αλ, β1, 1 − β1]``, are read anew); keeps every key (calls run one by one: no
    batches) and which kinds of call were replayed."""

    def __init__(self):
        super().__init__(eager_runs=100)
        self.first, self.keys, self.replayed, self.groups = {}, [], [], []

    def _run_signed(self, key, fn, inputs, calls, entry=None):
        self.keys.append(key)
        inputs = [t.clone() for t in inputs]
        if key not in self.first:
            self.first[key] = (fn, [dict(g) for g in self.groups])
            return fn(*inputs)
        self.replayed.append(key[0][0])
        first_fn, then = self.first[key]
        now = [dict(g) for g in self.groups]
        for group, values in zip(self.groups, then):
            group.update(values)
        try:
            return first_fn(*inputs)
        finally:
            for group, values in zip(self.groups, now):
                group.update(values)


@pytest.mark.parametrize("cosine", [False, True])
def test_graph_keys_hold_while_beta1_cycles(monkeypatch, cosine):
    """OneCycleLR writes a new α and β1 every step. S-RSI and the dense sums pass do not read
    β1, and the updates (and cosine guidance's sums) read α and β1 from the device: every key
    stays the same, and replaying each key's first call gives the eager bits. Before, the
    updates held β1 as a launch constant, and got a new key each step."""
    monkeypatch.setattr(Adapprox, "_graphable", staticmethod(lambda group, *args: group["cuda_graphs"]))
    calls = _FirstCallUnderKey()
    steps = 4
    options = {**BASE, "cosine_guidance": cosine, "cosine_max_scale": 1e3}  # a scale that is not clamped
    eager = _graph_run(torch.float32, options, False, steps, fixed_grads=True, cycle_beta1=True)
    graphed = _graph_run(torch.float32, options, True, steps, fixed_grads=True, graphs_stand_in=calls, cycle_beta1=True)
    _assert_same_bits(*eager, *graphed)
    later = [signed[0] for signed in calls.keys[len(calls.keys) // steps :]]  # the gradients' addresses are fixed
    kinds = ("srsi", "dense sums", "dense", "update")
    dense = 0 if cosine else 3  # cosine guidance keeps the dense buckets on the plain-PyTorch path
    distinct = {kind: len({key for key in later if key[0] == kind}) for kind in kinds}
    assert distinct == {"srsi": 2, "dense sums": dense, "dense": dense, "update": 2}
    # The dense buckets replay from step 1 on, the factored ones from step 2 (step 0 has no factors).
    replayed = {kind: calls.replayed.count(kind) for kind in kinds}
    assert replayed == {
        "srsi": 2 * (steps - 2),
        "dense sums": dense * (steps - 1),
        "dense": dense * (steps - 1),
        "update": 2 * (steps - 2),
    }


def test_graphed_stochastic_rounding_reads_each_steps_key(monkeypatch):
    """Under CUDA graphs the rounding key is an input, a new one every step: replaying each
    key's first call gives the eager bits (a key held in the graph would round every step
    with the first step's bits)."""
    monkeypatch.setattr(Adapprox, "_graphable", staticmethod(lambda group, *args: group["cuda_graphs"]))
    options = {**BASE, "bf16_stochastic_round": True}
    eager = _graph_run(torch.bfloat16, options, False, 4, fixed_grads=True)
    calls = _FirstCallUnderKey()
    graphed = _graph_run(torch.bfloat16, options, True, 4, fixed_grads=True, graphs_stand_in=calls)
    _assert_same_bits(*eager, *graphed)
    assert calls.replayed.count("update") >= 2 and calls.replayed.count("dense") >= 3, calls.replayed


def _run_with_changes(graphs_stand_in, changes, reset=()):
    """One step per entry of ``changes``, each written into the group first (after the options
    in ``reset`` are set back to their defaults); the gradients are copied into the same
    tensors from the second step on (the addresses a graph needs). Graphed through
    ``graphs_stand_in`` unless it is None."""
    params = _params(torch.float32)
    opt = Adapprox(params, backend="triton", seed=3, cuda_graphs=graphs_stand_in is not None, **BASE)
    if graphs_stand_in is not None:
        _use_graphs(opt, graphs_stand_in)
    for step, changed in enumerate(changes):
        opt.param_groups[0].update({k: opt.defaults[k] for k in reset} | changed)
        for p, g in zip(params, _grads(step, torch.float32)):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        opt.step()
    return params, opt


# One hyperparameter off its value at a time, after two steps with all at theirs (the first
# has no factors yet; the gradients keep their addresses throughout): a key that leaves it out
# matches step 1's and replays that call.
_ONE_AT_A_TIME = [
    {},
    {},
    {"betas": (0.8, 0.9, 0.0)},
    {"betas": (0.9, 0.95, 0.0)},
    {"eps": 1e-6},
    {"clip_threshold": 0.5},
    {"power_iters": 3},
    {"maximize": True},
]


def test_graph_keys_name_every_hyperparameter_their_calls_read(monkeypatch):
    """Replaying the first call made under each key while one hyperparameter at a time moves
    off its value gives the eager bits: no key leaves out a value its call reads (on a GPU, a
    stale constant in a replayed graph). S-RSI and the dense sums do replay where only β1, the
    clip or ``maximize`` moved (the dense sums also where the power iterations did), which they
    do not read."""
    changeable = ("betas", "eps", "clip_threshold", "power_iters", "maximize")
    eager = _run_with_changes(None, _ONE_AT_A_TIME, reset=changeable)
    monkeypatch.setattr(Adapprox, "_graphable", staticmethod(lambda group, *args: group["cuda_graphs"]))
    graphs = _FirstCallUnderKey()
    _assert_same_bits(*eager, *_run_with_changes(graphs, _ONE_AT_A_TIME, reset=changeable))
    # The two factored buckets' S-RSI at the β1, clip and maximize steps; the three dense
    # buckets' sums at step 1 and the β1, clip, power-iteration and maximize steps; every
    # update at the β1 step.
    replayed = {kind: graphs.replayed.count(kind) for kind in ("srsi", "dense sums", "dense", "update")}
    assert replayed["srsi"] >= 2 * 3 and replayed["dense sums"] >= 3 * 5, replayed
    assert replayed["update"] >= 2 and replayed["dense"] >= 3, replayed


def test_the_srsi_graph_key_names_the_truncation(monkeypatch):
    """``truncation`` written into a group between steps (with the sync-free Jacobi kernel a
    Rayleigh–Ritz bucket is graphed as a QR one is): replaying the first call made under each
    key gives the eager bits. The S-RSI key left it out, so a graph captured with one
    truncation replayed for the other."""
    from adapprox_kernels import adapprox as adapprox_module
    from adapprox_kernels.kernels.jacobi_eigh import jacobi_eigh

    kernel = functools.partial(jacobi_eigh, descending=True)
    monkeypatch.setattr(adapprox_module, "_sync_free_eigh", lambda backend, device, width, dtype: kernel)
    plan = [{"truncation": t} for t in ["qr", "qr", "qr", "rayleigh_ritz", "rayleigh_ritz", "qr"]]
    eager = _run_with_changes(None, plan)
    monkeypatch.setattr(Adapprox, "_graphable", staticmethod(lambda group, *args: group["cuda_graphs"]))
    graphs = _FirstCallUnderKey()
    _assert_same_bits(*eager, *_run_with_changes(graphs, plan))
    assert graphs.replayed.count("srsi") >= 2, graphs.replayed  # the second rayleigh_ritz step


def test_a_second_moment_beyond_float32_on_triton_warns_and_keeps_the_weights_finite():
    """As on the reference path (test_adapprox.py): the kernels' sums overflow, ξ is NaN, the
    previous factors stay; the weights take this step's sound update and stay finite."""
    from test_adapprox import overflowing_second_moment_run

    p, opt, warned = overflowing_second_moment_run("triton", DEVICE)
    assert warned
    state = opt.state[p]
    assert torch.isfinite(p).all() and torch.isfinite(state["Q"]).all() and torch.isfinite(state["U"]).all()


@pytest.mark.parametrize("shape", [(12, 17), (8,)])
def test_a_clip_threshold_near_the_smallest_normal_still_decays(shape):
    """``clip_threshold`` is accepted down to float32's smallest normal, where RMS/d overflowed:
    the reference then clipped the update to 0 and applied the decay, while the kernels read
    the inf divisor as a bad gradient and wrote nothing. Both now clip to ~0 and decay."""
    for backend in ("reference", "triton"):
        p = torch.nn.Parameter(torch.ones(shape, device=DEVICE))
        opt = Adapprox([p], backend=backend, clip_threshold=2e-38, weight_decay=0.5, lr=0.1, k_max=3, seed=0)
        p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        opt.step()
        torch.testing.assert_close(p.detach(), torch.full(shape, 0.95, device=DEVICE), msg=backend)


def test_a_default_device_of_the_users_reaches_no_kernel_constant():
    """Under ``torch.set_default_device("cuda")`` the kernels' host-made constants (matrix
    offset tables, stochastic rounding keys) are still made on the host and then copied: made
    on the GPU, ``pin_memory`` raised at the first launch. A meta default stands in for the
    GPU's here (it runs anywhere and failed the same way)."""
    from adapprox_kernels.transfer import forget_constants

    runs = []
    for default in (None, "meta"):
        forget_constants()  # the cached host constants are made anew
        params = _params(torch.bfloat16)
        opt = Adapprox(params, backend="triton", seed=3, bf16_stochastic_round=True, **BASE)
        for step in range(2):
            for p, g in zip(params, _grads(step, torch.bfloat16)):
                p.grad = g
            with torch.device(default) if default else contextlib.nullcontext():
                opt.step()
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_no_cuda_graph_for_a_bucket_on_another_gpu(monkeypatch):
    """A capture records the current device's stream: a bucket on another GPU would run eagerly
    while captured and leave a graph that replays nothing. Such buckets run eagerly."""
    from types import SimpleNamespace

    from adapprox_kernels.triton_backend import TritonBackend

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    group = {"cuda_graphs": True}
    for index, graphable in ((0, True), (1, False)):
        factors = SimpleNamespace(is_cuda=True, dtype=torch.float32, device=torch.device("cuda", index))
        assert Adapprox._graphable(group, TritonBackend, factors, None) is graphable


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("graphs", [False, True])
def test_one_optimizer_over_two_gpus_matches_reference(graphs):
    """A model spread over two GPUs (``device_map``-style), one optimizer, cuda:0 current: the
    buckets on cuda:1 launch there (Triton launches on the current device otherwise), the step's
    update gate reaches both devices (one ``torch.cat`` of both devices' sums raised), and only
    cuda:0's buckets are graphed. Same run as the reference backend."""
    torch.cuda.set_device(0)
    runs = {}
    for backend in ("reference", "triton"):
        params = [torch.nn.Parameter(p.detach().to(f"cuda:{i % 2}")) for i, p in enumerate(_params(torch.float32))]
        opt = Adapprox(params, backend=backend, seed=3, **BASE, cuda_graphs=graphs and backend == "triton")
        for step in range(6):
            for p, g in zip(params, _grads(step, torch.float32)):
                p.grad = g.to(p.device)
            opt.step()
        runs[backend] = (params, opt)
    _assert_same_run(*runs["reference"], *runs["triton"], torch.float32)
    if graphs:
        assert runs["triton"][1].cuda_graph_counts.get("failed", 0) == 0


def test_warm_start_on_an_exactly_low_rank_second_moment_matches_reference():
    """A rank-2 gradient makes V of rank <= 3 below the factors' 4 columns: U's last column is
    rounding noise, different on each backend. Taken as a warm start, it gave the reference and
    the kernels different sketches: ξ of the second step differed by 0.004 here (up to 0.15 in
    other runs, where the ranks then parted)."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, 2, generator=gen) @ torch.randn(2, 10, generator=gen) for _ in range(6)]
    w0 = 0.1 * torch.randn(6, 10, generator=gen)
    kw = dict(lr=1e-2, k_max=4, k_min=1, oversample=2, power_iters=2, xi_thresh=0.15, betas=(0.0, 0.99, 0.5),
              warm_start=True, exact_small_matrices=False, seed=0)  # fmt: skip
    out = {}
    for backend in ("reference", "triton"):
        p = torch.nn.Parameter(w0.clone().to(DEVICE))
        opt = Adapprox([p], backend=backend, **kw)
        ranks, xis = [], []
        for g in grads:
            p.grad = g.to(DEVICE)
            opt.step()
            ranks.append(opt.state[p]["rank"])
            xis.append(opt.state[p]["xi"])
        out[backend] = (p.detach().cpu(), ranks, torch.tensor(xis))
    assert out["reference"][1] == out["triton"][1]
    torch.testing.assert_close(out["triton"][2], out["reference"][2], rtol=0, atol=1e-4)
    torch.testing.assert_close(out["triton"][0], out["reference"][0], rtol=0, atol=1e-5)
