"""Properties that must hold for any input, checked on inputs hypothesis draws (reference
backend, tiny shapes; derandomized, so every run draws the same examples)."""

import contextlib
import io
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_adapprox import dense_adapprox
from test_resume import _assert_same_runs

from adapprox_kernels import AdaMeM, Adapprox
from adapprox_kernels.rank_policy import next_rank_step, rank_moment, sigmoid_increment
from adapprox_kernels.reference import clipped_update

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
dims = st.integers(1, 9)
seeds = st.integers(0, 2**31 - 1)


def _grads(seed: int, shape: tuple[int, ...], steps: int, sparse: bool) -> list[torch.Tensor]:
    """Gradients of mixed scale; with ``sparse``, half the entries exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-3, 3, (), generator=gen)
        if sparse:
            g = g * (torch.rand(shape, generator=gen) < 0.5)
        out.append(g)
    return out


@SETTINGS
@given(
    m=dims, n=dims, steps=st.integers(1, 3), beta1=st.sampled_from([0.0, 0.9]), beta2=st.floats(0.5, 0.999),
    clip=st.floats(0.05, 5.0), wd=st.floats(0.0, 0.3), exact_small=st.booleans(), sparse=st.booleans(), seed=seeds,
)  # fmt: skip
def test_at_full_rank_any_matrix_follows_the_dense_formula(
    m, n, steps, beta1, beta2, clip, wd, exact_small, sparse, seed
):
    """k_max >= min(m, n): factored (S-RSI then spans V's whole range) or kept dense, every
    step equals Algorithm 3 with an uncompressed V, for any shape, gradient scale or zeros."""
    w0 = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = _grads(seed, (m, n), steps, sparse)
    kw = dict(lr=1e-2, betas=(beta1, beta2, 0.9), eps=1e-8, clip_threshold=clip, weight_decay=wd)
    w = torch.nn.Parameter(w0.clone())
    opt = Adapprox([w], **kw, k_max=max(m, n), oversample=1, exact_small_matrices=exact_small, seed=seed)
    for g in grads:
        w.grad = g
        opt.step()
    want = dense_adapprox(w0, grads, kw["lr"], kw["betas"], kw["eps"], clip, wd)
    torch.testing.assert_close(w.detach(), want, rtol=1e-7, atol=1e-9)


@SETTINGS
@given(batch=st.integers(1, 3), shape=st.lists(dims, max_size=2), clip=st.floats(0.01, 10.0), seed=seeds)
def test_a_clipped_update_never_has_rms_above_the_threshold(batch, shape, clip, seed):
    """``Upd / max(1, RMS/d)`` has RMS <= d per matrix, scalars and vectors included."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(batch, *shape, generator=gen, dtype=torch.float64) * 100
    v = torch.rand(batch, *shape, generator=gen, dtype=torch.float64) * 1e-4
    upd = clipped_update(g, v, 1e-8, clip)
    rms = upd.reshape(batch, -1).square().mean(dim=1).sqrt()
    assert (rms <= clip * (1 + 1e-12)).all()


@SETTINGS
@given(
    k_min=st.integers(1, 4), extra=st.integers(0, 40), xis=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=60),
    beta3=st.floats(0.0, 0.99), thresh=st.floats(0.0, 0.5),
)  # fmt: skip
def test_the_step_rule_keeps_the_rank_within_its_bounds(k_min, extra, xis, beta3, thresh):
    k_max = k_min + extra
    k = float(k_max)
    for xi in xis:
        k = rank_moment(k, next_rank_step(math.floor(k + 0.5), xi, thresh, k_min, k_max), beta3)
        assert k_min - 1e-9 <= k <= k_max + 1e-9


@SETTINGS
@given(
    xi=st.floats(0.0, 10.0), eta=st.floats(0.0, 64.0), omega=st.floats(0.0, 50.0, exclude_min=True),
    tau=st.floats(0.0, 1.0), phi=st.floats(0.0, 4.0),
)  # fmt: skip
def test_the_sigmoid_increment_is_bounded_by_eta(xi, eta, omega, tau, phi):
    assert 0 <= sigmoid_increment(xi, eta, omega, tau, phi) <= math.ceil(eta)


@SETTINGS
@given(lr=st.floats(allow_nan=True, allow_infinity=True), eps=st.floats(allow_nan=True, allow_infinity=True))
def test_a_learning_rate_or_eps_is_refused_exactly_when_it_is_not_finite_and_in_range(lr, eps):
    f32 = torch.finfo(torch.float32)  # finite means finite in float32, which the step multiplies in
    ok = 0 <= lr <= f32.max and f32.tiny <= eps <= f32.max
    for cls in (Adapprox, AdaMeM):
        try:
            cls([torch.nn.Parameter(torch.zeros(2, 2))], lr=lr, eps=eps)
        except ValueError:
            assert not ok
        else:
            assert ok


# Options drawn per param group for the resume property: every choice that changes what the
# state holds or how the sketch RNG is drawn, at tiny ranks.
_RESUME_OPTIONS = {
    Adapprox: dict(
        betas=st.tuples(st.sampled_from([0.0, 0.9]), st.sampled_from([0.5, 0.99]), st.sampled_from([0.0, 0.9])),
        clip_threshold=st.sampled_from([None, 1.0]), weight_decay=st.sampled_from([0.0, 0.1]),
        k_max=st.integers(1, 3), oversample=st.integers(0, 2), power_iters=st.integers(1, 2),
        rank_policy=st.sampled_from(["step", "sigmoid"]), rank_interval=st.integers(1, 3), warm_start=st.booleans(),
        truncation=st.sampled_from(["qr", "rayleigh_ritz"]), exact_small_matrices=st.booleans(),
        cosine_guidance=st.booleans(), maximize=st.booleans(), bf16_stochastic_round=st.booleans(),
        nonfinite=st.sampled_from(["raise", "skip"]), backend=st.just("reference"),
    ),
    AdaMeM: dict(
        betas=st.tuples(st.sampled_from([0.0, 0.9]), st.sampled_from([0.5, 0.95])), rank=st.integers(1, 3),
        update_proj_gap=st.integers(1, 3), residual_scale=st.sampled_from([0.0, 1.0]),
        weight_decay=st.sampled_from([0.0, 0.1]), projection=st.sampled_from(["srsi", "svd"]),
        oversample=st.integers(0, 2), power_iters=st.integers(1, 2),
        momentum_transfer=st.sampled_from(["keep", "rotate"]), second_moment=st.sampled_from(["momentum", "gradient"]),
        bias_correction=st.booleans(), clip_threshold=st.sampled_from([None, 1.0]), maximize=st.booleans(),
        bf16_stochastic_round=st.booleans(), nonfinite=st.sampled_from(["raise", "skip"]),
    ),
}  # fmt: skip


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    cls=st.sampled_from([Adapprox, AdaMeM]), data=st.data(), m=dims, n=dims, split=st.integers(0, 6),
    scheduled=st.booleans(), events=st.tuples(*[st.integers(-2, 1)] * 3), seed=seeds,
)  # fmt: skip
def test_a_resumed_run_is_bit_identical_wherever_it_stops(cls, data, m, n, split, scheduled, events, seed):
    """Two same-shaped fp32 matrices (one bucket) and, in a second group with options of its own,
    a transposed matrix, a vector and a scalar in bf16; around the save (``events``: steps
    relative to it) a NaN gradient (skipped, or the step refused), a missing one and an all-zero
    one (AdaMeM's refresh then goes pending); a StepLR schedule. The state dict saved after any
    step, through ``torch.save`` and ``torch.load(weights_only=True)`` into an optimizer of
    another seed, continues exactly like the run that never stopped, in every parameter and
    state entry (sketch RNG included)."""
    groups = [data.draw(st.fixed_dictionaries(_RESUME_OPTIONS[cls])) for _ in range(2)]
    gen = torch.Generator().manual_seed(seed)
    shapes = [(m, n), (m, n), (n, m), (n,), ()]
    dtypes = [torch.float32] * 2 + [torch.bfloat16] * 3
    grads = [[torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)] for _ in range(6)]
    nan_at, none_at, zero_at = (min(max(split + e, 0), 5) for e in events)
    grads[nan_at][0].view(-1)[0] = float("nan")
    grads[none_at][1] = None
    grads[zero_at][2].zero_()
    start = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]

    def make(params, opt_seed):
        opt = cls([{"params": params[:2], **groups[0]}, {"params": params[2:], **groups[1]}], lr=1e-2, seed=opt_seed)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduled else None

    def run(params, opt, sched, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = None if g is None else g.clone()
            with contextlib.suppress(FloatingPointError):  # nonfinite="raise": the step changes nothing
                opt.step()
            if sched is not None:
                sched.step()

    ref = [torch.nn.Parameter(t.clone()) for t in start]
    ref_opt, ref_sched = make(ref, seed)
    run(ref, ref_opt, ref_sched, grads)
    params = [torch.nn.Parameter(t.clone()) for t in start]
    opt, sched = make(params, seed)
    run(params, opt, sched, grads[:split])
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": None if sched is None else sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, resumed_sched = make(params, seed + 1)
    resumed.load_state_dict(saved["opt"])
    if scheduled:
        resumed_sched.load_state_dict(saved["sched"])
    run(params, resumed, resumed_sched, grads[split:])
    _assert_same_runs(ref_opt, ref, resumed, params, f"saved after step {split}")
