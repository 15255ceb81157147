"""AdaMeM: the paper's orthogonality claim, the full-rank reduction, memory, resume, validation,
odd shapes, and the two projections."""

import io
import math
import re

import pytest
import torch
import torch.distributed as dist
from compiled_step import eager_and_compiled, graphs_per_step
from host_reads import NoHostReads

from adapprox_kernels import AdaMeM
from adapprox_kernels.adamem import adamem_directions, rotate_momentum, top_left_subspace


def _params(shapes, dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]


def _run(opt, params, grads):
    """One step per entry of ``grads`` (a list of per-parameter gradient lists)."""
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone().to(p.dtype)
        opt.step()


def _grads(shapes, steps, dtype=torch.float32):
    return [[torch.randn(s, dtype=dtype) for s in shapes] for _ in range(steps)]


def _inner_cos(a, b):
    return (a * b).sum().abs() / (a.norm() * b.norm())


# ------------------------------------------------------------------------- Claim 3.1 (orthogonality)
@pytest.mark.parametrize("second_moment", ["momentum", "gradient"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_claim_3_1_directions_are_orthogonal(second_moment, clip):
    """⟨P N1, N2⟩ = 0 on every step, across projection changes, for random full-rank gradients."""
    b, m, n, r = 3, 12, 20, 4
    proj = torch.zeros(b, m, r, dtype=torch.float64)
    exp_avg = torch.zeros(b, r, n, dtype=torch.float64)
    row, col, rcol = torch.zeros(b, r, dtype=torch.float64), *torch.zeros(2, b, n, dtype=torch.float64)
    for step in range(1, 8):
        g = torch.randn(b, m, n, dtype=torch.float64) * torch.rand(1, 1, n, dtype=torch.float64)
        if step % 3 == 1:
            proj = top_left_subspace(g, r, "srsi", generator=torch.Generator().manual_seed(step))
        low, resid = adamem_directions(
            g, proj, exp_avg, row, col, rcol, beta1=0.9, beta2=0.95, step=step, eps=1e-8,
            clip_threshold=clip, second_moment=second_moment,
        )  # fmt: skip
        for i in range(b):
            assert low[i].norm() > 0 and resid[i].norm() > 0
            assert _inner_cos(low[i], resid[i]) < 1e-12


def test_claim_3_1_fails_for_two_sided_residual():
    """The control that shows the test can fail: Adafactor's row statistic on S (the paper's
    "Variant 2", and a literal reading of Algorithm 4's ``(S²)1_n``) is NOT orthogonal."""
    m, n, r = 12, 20, 4
    g = torch.randn(1, m, n, dtype=torch.float64) * torch.rand(1, m, 1, dtype=torch.float64)
    proj = top_left_subspace(g, r, "svd")
    low, _ = adamem_directions(
        g, proj, torch.zeros(1, r, n, dtype=torch.float64), torch.zeros(1, r, dtype=torch.float64),
        *torch.zeros(2, 1, n, dtype=torch.float64), beta1=0.9, beta2=0.95, step=1, eps=1e-8,
    )  # fmt: skip
    s = g - proj @ (proj.mT @ g)
    row_scaled = s / s.square().mean(dim=2, keepdim=True).sqrt()
    assert _inner_cos(low[0], row_scaled[0]) > 1e-3


def test_claim_3_1_through_the_optimizer():
    """The optimizer's step splits into a low-rank part (δ = 0) and a residual part orthogonal to it."""
    shape, grads = (16, 10), _grads([(16, 10)], 5)
    deltas = {}
    for delta in (0.0, 1.0):
        torch.manual_seed(1)
        (w,) = _params([shape])
        w0 = w.detach().clone()
        opt = AdaMeM([w], lr=1.0, rank=3, update_proj_gap=2, residual_scale=delta, seed=5)
        _run(opt, [w], grads[:-1])
        w_before = w.detach().clone()
        _run(opt, [w], grads[-1:])
        deltas[delta] = (w.detach() - w_before, w_before - w0)
    low, resid = deltas[0.0][0], deltas[1.0][0] - deltas[0.0][0]
    assert low.norm() > 0 and resid.norm() > 0
    assert _inner_cos(low, resid) < 1e-5


# --------------------------------------------------------------------------- full-rank reduction
def _adafactor_momentum_oracle(grads, basis, lr, beta1, beta2, eps):
    """Adafactor with momentum (statistics of the bias-corrected momentum, as Algorithm 3) run on
    ``basisᵀ G`` and mapped back: returns the sequence of parameter displacements. Written
    independently of the package, one matrix, plain loops over the steps."""
    r, n = basis.shape[1], grads[0].shape[1]
    mom, row, col = (torch.zeros(shape, dtype=basis.dtype) for shape in ((r, n), (r,), (n,)))
    disp, out = torch.zeros(basis.shape[0], n, dtype=basis.dtype), []
    for t, g in enumerate(grads, start=1):
        mom = beta1 * mom + (1 - beta1) * (basis.T @ g)
        m_hat = mom / (1 - beta1**t)
        row = beta2 * row + (1 - beta2) * (m_hat**2).mean(dim=1)
        col = beta2 * col + (1 - beta2) * (m_hat**2).mean(dim=0)
        v = torch.outer(row, col) / row.mean() / (1 - beta2**t)
        disp = disp - lr * basis @ (m_hat / (v.sqrt() + eps))
        out.append(disp.clone())
    return out


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_full_rank_is_adafactor_momentum_in_the_gradient_basis(shape):
    """With r = min(m, n) the residual vanishes and AdaMeM is Adafactor-with-momentum run on PᵀG
    (P: the m×m orthogonal basis of the first gradient's singular vectors), whatever δ is."""
    steps, lr = 6, 0.01
    grads = [g[0].double() for g in _grads([shape], steps)]
    (w,) = _params([shape], torch.float64)
    w0 = w.detach().clone()
    opt = AdaMeM([w], lr=lr, rank=64, update_proj_gap=1000, residual_scale=3.0, seed=0)
    disps = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        disps.append(w.detach() - w0)
    basis = opt.state[w]["P"]
    assert basis.shape == (min(shape), min(shape))
    oriented = [g.T if shape[0] > shape[1] else g for g in grads]
    # The first gradient's left singular vectors, column by column up to sign (any orthogonal
    # basis would pass the oracle's orthonormality, and Adafactor depends on the basis).
    singular = torch.linalg.svd(oriented[0]).U
    eye = torch.eye(min(shape), dtype=torch.float64)
    torch.testing.assert_close((basis.T @ singular).abs(), eye, atol=1e-8, rtol=0)
    want = _adafactor_momentum_oracle(oriented, basis, lr, 0.9, 0.95, 1e-8)
    for got, exp in zip(disps, want):
        torch.testing.assert_close(got, exp.T if shape[0] > shape[1] else exp, rtol=1e-10, atol=1e-12)


def test_row_vector_is_plain_adafactor_momentum():
    """A 1×n matrix: P = 1 (canonical signs), so AdaMeM is elementwise Adafactor with momentum in the original basis."""
    steps, lr = 5, 0.1
    grads = [g[0].double() for g in _grads([(1, 7)], steps)]
    (w,) = _params([(1, 7)], torch.float64)
    w0 = w.detach().clone()
    _run(AdaMeM([w], lr=lr, rank=4, seed=0), [w], [[g] for g in grads])
    want = _adafactor_momentum_oracle(grads, torch.ones(1, 1, dtype=torch.float64), lr, 0.9, 0.95, 1e-8)[-1]
    torch.testing.assert_close(w.detach() - w0, want, rtol=1e-10, atol=1e-12)


def test_vectors_are_plain_adafactor_without_momentum():
    steps, lr, beta2, eps, wd = 4, 0.05, 0.95, 1e-8, 0.1
    grads = [torch.randn(9, dtype=torch.float64) for _ in range(steps)]
    (w,) = _params([(9,)], torch.float64)
    want, v = w.detach().clone(), torch.zeros(9, dtype=torch.float64)
    _run(AdaMeM([w], lr=lr, betas=(0.9, beta2), weight_decay=wd, residual_scale=0.5), [w], [[g] for g in grads])
    for t, g in enumerate(grads, start=1):
        v = beta2 * v + (1 - beta2) * g**2
        want = want * (1 - lr * wd) - lr * g / ((v / (1 - beta2**t)).sqrt() + eps)
    torch.testing.assert_close(w.detach(), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (16, 8, 10), (4, 30)])
def test_state_bytes_are_low_rank(shape):
    (w,) = _params([shape])
    opt = AdaMeM([w], rank=8)
    _run(opt, [w], _grads([shape], 1))
    m, n = sorted((shape[0], math.prod(shape[1:])))
    r = min(8, m)
    want = 4 * ((m + n) * r + r + 2 * n)  # P, momentum, row and column statistics, residual column statistic
    report = opt.state_report()
    assert report.rows[0].kind == "lowrank" and report.rows[0].rank == r
    assert report.state_bytes == want
    if r < m:
        assert report.state_bytes < 0.5 * report.adamw_bytes


def test_vector_state_is_one_copy():
    (w,) = _params([(33,)])
    opt = AdaMeM([w])
    _run(opt, [w], _grads([(33,)], 1))
    assert opt.state_report().rows[0].kind == "dense" and opt.state_report().state_bytes == 4 * 33


# ------------------------------------------------------------------------------------- resume
SHAPES = [(12, 20), (12, 20), (20, 12), (3, 4, 5), (7,), (1, 9)]


def _make(seed, dtype_last=torch.bfloat16):
    torch.manual_seed(seed)
    params = _params(SHAPES)
    extra = torch.nn.Parameter(torch.randn(10, 14).to(dtype_last))
    opt = AdaMeM(
        [{"params": params}, {"params": [extra], "rank": 2, "momentum_transfer": "rotate"}],
        lr=0.01, rank=3, update_proj_gap=3, weight_decay=0.1, seed=seed,
    )  # fmt: skip
    return params + [extra], opt


@pytest.mark.parametrize("case", ["current", "legacy", "deferred_refresh"])
def test_resume_is_bit_exact(case):
    """``legacy``: a checkpoint written before matrix states recorded ``param_shape`` and
    ``proj_pending`` loads and resumes as before, and its states take the parameters' shapes
    (so the next checkpoint has them). ``deferred_refresh``: two matrices had zero gradients on
    steps 1–2, so the checkpoint holds their refreshes pending, which the resumed run makes."""
    grads = _grads(SHAPES + [(10, 14)], 8)
    split = 4
    if case == "deferred_refresh":
        for gs in grads[:2]:
            gs[0].zero_()
            gs[-1].zero_()  # the bf16 one, in the "rotate" group
        split = 2
    params, opt = _make(seed=11)
    _run(opt, params, grads)

    params2, opt2 = _make(seed=11)
    _run(opt2, params2, grads[:split])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params2], "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    pending = [i for i, s in ckpt["opt"]["state"].items() if s.get("proj_pending")]
    assert pending == ([0, len(params2) - 1] if case == "deferred_refresh" else [])
    if case == "legacy":
        for i, p in enumerate(params2):
            if p.dim() >= 2:
                assert ckpt["opt"]["state"][i].pop("param_shape").tolist() == list(p.shape)
                assert ckpt["opt"]["state"][i].pop("proj_pending") is False
    params3, opt3 = _make(seed=99)  # a different seed: the checkpoint's RNG must win
    with torch.no_grad():
        for p, saved in zip(params3, ckpt["params"]):
            p.copy_(saved)
    opt3.load_state_dict(ckpt["opt"])
    assert opt3.state[params3[-1]]["exp_avg"].dtype == torch.float32  # not cast to bf16
    _run(opt3, params3, grads[split:])

    for a, b in zip(params, params3):
        assert torch.equal(a, b)
    for a, b in zip(params, params3):
        sa, sb = opt.state[a], opt3.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k] or (sa[k] != sa[k] and sb[k] != sb[k]), k


@pytest.mark.parametrize("saved, here", [((30, 20), (20, 30)), ((3, 4, 5), (20, 3)), ((3, 4, 5), (3, 20))])
def test_another_shapes_state_is_refused_on_load(saved, here):
    """A (30, 20) weight's state has the tensor shapes of a (20, 30) one's (both are oriented to
    20×30; (3, 4, 5) and (20, 3) fold and orient to 3×20), so it used to load and train with its
    momentum and statistics in the wrong basis. Refused, naming the parameter and both shapes,
    and nothing is loaded; so is another shape with the same matrix view ((3, 4, 5) and (3, 20)).
    The same checkpoint (read back with weights_only) fits its own shape."""
    (w,) = _params([saved])
    opt = AdaMeM([w], rank=2, seed=0)
    _run(opt, [w], _grads([saved], 2))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    target = AdaMeM([("enc.weight", _params([here])[0])], rank=2, seed=1)
    shapes = rf"enc\.weight \(shape {re.escape(str(here))}\).*saved for a parameter of shape {re.escape(str(saved))}"
    with pytest.raises(ValueError, match=shapes):
        target.load_state_dict(ckpt)
    assert not target.state
    AdaMeM(_params([saved]), rank=2).load_state_dict(ckpt)


def test_torch_flattened_optimizer_state_dict_round_trips():
    """``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`` (torchtitan's way of
    saving) takes tensors, ints, floats and dicts only: a ``param_shape`` saved as a tuple raised
    ``NotImplementedError``. It is saved as an int64 tensor and comes back as the live tuple; the
    resumed run (an SVD projection: no sketch RNG, which torch's function drops) is bit-exact. A
    checkpoint holding the tuple still loads."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict,
    )  # fmt: skip

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        return model, AdaMeM(model.parameters(), rank=2, update_proj_gap=2, projection="svd", seed=0)

    x, y = torch.randn(32, 12), torch.randn(32, 4)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model, opt = make()
    train(model, opt, 3)
    flat = get_optimizer_state_dict(model, opt, options=options)
    assert torch.equal(flat["state.0.weight.param_shape"], torch.tensor([16, 12]))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": flat}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    train(model, opt, 3)
    model2, opt2 = make()
    model2.load_state_dict(ckpt["model"])
    set_optimizer_state_dict(model2, opt2, ckpt["optim"], options=options)
    assert opt2.state[model2[0].weight]["param_shape"] == (16, 12)
    train(model2, opt2, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    legacy = opt.state_dict()
    legacy["state"][0]["param_shape"] = (16, 12)  # as versions before this one saved it
    opt2.load_state_dict(legacy)
    assert opt2.state[model2[0].weight]["param_shape"] == (16, 12)


def test_load_state_dict_post_hooks_see_the_live_state():
    """A user's load post-hook sees the state a step reads: ``param_shape`` as the live tuple
    (it is saved as an int64 tensor), not the saved form."""
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = AdaMeM([p], rank=2)
    p.grad = torch.randn(6, 5)
    opt.step()
    seen = []
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o.state[p]["param_shape"]))
    opt.load_state_dict(opt.state_dict())
    assert seen == [(6, 5)] and type(seen[0]) is tuple


def test_an_adamw_checkpoint_is_refused_naming_what_it_lacks():
    """Another optimizer's state has no rank: the message names the missing entries, and no
    shape made up from a rank of 0 (it used to say "'exp_avg' is (30, 20), not (0, 30)")."""
    (w,) = _params([(30, 20)])
    w.grad = torch.randn(30, 20)
    adamw = torch.optim.AdamW([w])
    adamw.step()
    with pytest.raises(ValueError) as info:
        AdaMeM([w], rank=4).load_state_dict(adamw.state_dict())
    assert "no 'rank'; no 'P'; no 'row_sq'; no 'col_sq'" in str(info.value)
    assert "exp_avg" not in str(info.value)


def test_a_pending_refresh_that_is_not_a_bool_is_refused_on_load():
    (w,) = _params([(6, 10)])
    opt = AdaMeM([w], rank=2, seed=0)
    _run(opt, [w], _grads([(6, 10)], 1))
    ckpt = opt.state_dict()
    ckpt["state"][0]["proj_pending"] = torch.tensor(True)
    with pytest.raises(ValueError, match="'proj_pending' is a Tensor, not a bool"):
        AdaMeM(_params([(6, 10)]), rank=2).load_state_dict(ckpt)


# ------------------------------------------------------------------------ validation, non-finite
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(betas=(0.9, 0.95, 0.9)), "betas"),
        (dict(betas=(1.0, 0.95)), "index 0"),
        (dict(betas=(0.9, -0.1)), "index 1"),
        (dict(rank=0), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(update_proj_gap=0), "update_proj_gap"),
        (dict(residual_scale=-1.0), "residual_scale"),
        (dict(residual_scale=float("inf")), "residual_scale"),
        (dict(residual_scale=1e39), "residual_scale"),  # the step raised after moving the momentum
        (dict(lr=2**1000), "learning rate"),
        (dict(eps=0.0), "epsilon"),
        (dict(eps=1e-300), "epsilon"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(projection="qr"), "projection"),
        (dict(oversample=-1), "oversample"),
        (dict(power_iters=0), "power_iters"),
        (dict(momentum_transfer="reset"), "momentum_transfer"),
        (dict(second_moment="adam"), "second_moment"),
        (dict(clip_threshold=0.0), "clip_threshold"),
        (dict(clip_threshold=1e-46), "clip_threshold"),  # 0 in float32: a 0/0 on a zero gradient
        (dict(nonfinite="ignore"), "nonfinite"),
        (dict(rank=True), "rank"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(clip_threshold=float("inf")), "clip_threshold"),
        (dict(bias_correction="yes"), "bias_correction"),
        (dict(betas=[0.9, float("nan")]), "index 1"),
        # Past int32 (or, for the S-RSI loop, past 1000): power_iters=10**30 hung the first step.
        (dict(rank=2**31), r"rank: 2147483648 \(need an int in \[1, 2147483647\]\)"),
        (dict(update_proj_gap=2**63), r"update_proj_gap: 9223372036854775808 \(need an int in \[1, 2147483647\]"),
        (dict(oversample=10**30), r"oversample: 10{30} \(need an int in \[0, 2147483647\]\)"),
        (dict(power_iters=10**30), r"power_iters: 10{30} \(need an int in \[1, 1000\]\)"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaMeM(_params([(3, 4)]), **kwargs)
    with pytest.raises(ValueError, match=r"param_groups\[0\]"):  # as one param group's own value
        AdaMeM([{"params": _params([(3, 4)]), **kwargs}])


def test_numpy_numbers_written_into_a_group_step_as_the_python_ones():
    """NumPy numbers written into ``param_groups`` after construction (a schedule read from a
    float32 array, a config's np.int64) step as the Python numbers they hold, as the
    constructor's do: np.float32 betas took ``1 − βᵗ`` in float32, so a run resumed from its
    checkpoint (which holds Python floats) ended on other bits, and an np.int64 rank went into
    the matrix's state, whose checkpoint ``torch.load(weights_only=True)`` refused."""
    import numpy as np

    betas = tuple(np.float32([0.8, 0.9]))
    grads, runs = _grads([(6, 10)], 4), []
    for group_values in (dict(betas=betas, rank=np.int64(2)), dict(betas=tuple(map(float, betas)), rank=2)):
        w = torch.nn.Parameter(torch.ones(6, 10))
        opt = AdaMeM([w], lr=0.01, rank=3, update_proj_gap=3, seed=5)
        opt.param_groups[0].update(group_values)
        _run(opt, [w], grads)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
        runs.append(w)
    assert torch.equal(*runs)


def test_nonfinite_raise_modifies_nothing():
    params = _params([(6, 9), (6, 9), (5,)])
    opt = AdaMeM(params, rank=2, seed=0)
    _run(opt, params, _grads([(6, 9), (6, 9), (5,)], 2))
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[0]].items() if torch.is_tensor(v)}
    grads = _grads([(6, 9), (6, 9), (5,)], 1)[0]
    grads[1][2, 3] = float("inf")
    for p, g in zip(params, grads):
        p.grad = g
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(v, opt.state[params[0]][k]) for k, v in state_before.items())
    assert opt.state[params[0]]["step"] == 2


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_gradients_too_large_for_float32_squares_are_taken_as_nonfinite(nonfinite):
    """Entries of 1e18 on a 64×256 matrix are finite, but ‖G‖² is not: S-RSI used to fail after
    other parameters had moved, or the step wrote NaN silently. Now the non-finite policy takes
    them, before anything changes; 1e16 steps as usual."""
    w, v = _params([(64, 256), (7,)])
    opt = AdaMeM([w, v], rank=2, seed=0, nonfinite=nonfinite)
    w0, v0 = w.detach().clone(), v.detach().clone()
    w.grad, v.grad = torch.full((64, 256), 1e18), torch.randn(7)
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match=r"above 1.44e\+17.*\['params'\]\[0\]"):
            opt.step()
        assert torch.equal(v, v0) and not opt.state
    else:
        opt.step()
        assert opt.state[w]["nonfinite_skips"] == 1 and not torch.equal(v, v0)
    assert torch.equal(w, w0)
    w.grad = torch.randn(64, 256) * 1e16
    opt.step()
    assert torch.isfinite(w).all() and not torch.equal(w, w0)


def test_nonfinite_skip_then_buckets_with_different_steps():
    params = _params([(6, 9), (6, 9)])
    opt = AdaMeM(params, rank=2, update_proj_gap=2, nonfinite="skip", seed=0)
    grads = _grads([(6, 9), (6, 9)], 4)
    grads[1][0][0, 0] = float("nan")
    skipped_before = None
    for t, gs in enumerate(grads):
        if t == 1:
            skipped_before = params[0].detach().clone()
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        if t == 1:
            assert torch.equal(params[0], skipped_before)
    assert opt.state[params[0]]["nonfinite_skips"] == 1 and opt.state[params[0]]["step"] == 3
    assert opt.state[params[1]]["step"] == 4
    assert all(torch.isfinite(p).all() for p in params)


def test_a_skipped_step_leaves_the_other_parameters_of_its_bucket_alone():
    """After a skipped step the two same-shaped matrices have different step counts: each
    steps with its own bias corrections, as it would alone (they share no batched call then)."""
    params = _params([(6, 9), (6, 9)])
    alone = torch.nn.Parameter(params[1].detach().clone())
    grads = _grads([(6, 9), (6, 9)], 4)
    grads[1][0] = torch.full((6, 9), float("nan"))
    kw = dict(lr=0.01, rank=2, update_proj_gap=100, projection="svd", nonfinite="skip", seed=0)
    _run(AdaMeM(params, **kw), params, grads)
    _run(AdaMeM([alone], **kw), [alone], [[gs[1]] for gs in grads])
    torch.testing.assert_close(params[1].detach(), alone.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta2", [0.95, 1 - 1e-8, 1 - 1e-12])
@pytest.mark.parametrize("grad", [0.0, 1e-20])
def test_zero_and_tiny_gradients_stay_finite_with_beta2_near_1(beta2, grad):
    """With 1 − β2^t below ~1e-7, the clamp of the Adafactor denominator used to underflow to 0
    (tiny·bias2), and zero gradients wrote NaN (0/0). A zero gradient is a zero step."""
    shapes = [(8, 16), (16, 8), (5,)]
    params = _params(shapes)
    before = [p.detach().clone() for p in params]
    opt = AdaMeM(params, lr=0.01, betas=(0.9, beta2), rank=4, update_proj_gap=2, seed=0)
    _run(opt, params, [[torch.full(s, grad) for s in shapes]] * 3)
    assert all(torch.isfinite(p).all() for p in params)
    if grad == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("beta2", [0.95, 1 - 1e-8, 1 - 1e-12])
@pytest.mark.parametrize("scale", [1e-8, 1e-3, 1.0])
def test_adafactor_estimate_with_beta2_near_1_matches_float64(beta2, scale):
    """The first step's rank-1 estimate V̂ and update in fp32 against fp64: with bias2 = 1 − β2
    ~1e-12, mean(row_sq)·bias2 is subnormal for small gradients, and a clamp applied to that
    product (or the product itself) lost the estimate: updates of 0.92 where fp64 gives 0.5."""
    from adapprox_kernels.adamem import adafactor_precondition

    gen = torch.Generator().manual_seed(0)
    stat = scale * torch.randn(2, 4, 9, generator=gen, dtype=torch.float64)
    out = {}
    for dtype in (torch.float64, torch.float32):
        s = stat.to(dtype)
        row_sq, col_sq = torch.zeros(2, 4, dtype=dtype), torch.zeros(2, 9, dtype=dtype)
        kw = dict(beta2=beta2, bias2=1 - beta2, eps=1e-30, clip_threshold=math.inf)
        out[dtype] = adafactor_precondition(s, s, row_sq, col_sq, **kw)
    torch.testing.assert_close(out[torch.float32], out[torch.float64].float(), rtol=1e-4, atol=0)


# --------------------------------------------------------------------------------- odd shapes
@pytest.mark.parametrize("shape", [(1, 13), (13, 1), (20, 7), (3, 4, 5), (1,), ()])
def test_odd_shapes_run_and_stay_finite(shape):
    (w,) = _params([shape])
    w0 = w.detach().clone()
    opt = AdaMeM([w], lr=0.01, rank=4, update_proj_gap=2, seed=0)
    _run(opt, [w], _grads([shape], 4))
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), w0)


def test_tall_matrix_equals_its_transpose():
    grads = _grads([(20, 7)], 5)
    (w,) = _params([(20, 7)])
    wt = torch.nn.Parameter(w.detach().T.clone())
    _run(AdaMeM([w], lr=0.01, rank=3, update_proj_gap=2, seed=4), [w], grads)
    _run(AdaMeM([wt], lr=0.01, rank=3, update_proj_gap=2, seed=4), [wt], [[g.T] for (g,) in grads])
    torch.testing.assert_close(w.detach(), wt.detach().T, rtol=1e-6, atol=1e-6)


def test_3d_is_folded_to_2d():
    grads = _grads([(3, 4, 5)], 4)
    (w,) = _params([(3, 4, 5)])
    w2 = torch.nn.Parameter(w.detach().reshape(3, 20).clone())
    _run(AdaMeM([w], lr=0.01, rank=2, update_proj_gap=2, seed=4), [w], grads)
    _run(AdaMeM([w2], lr=0.01, rank=2, update_proj_gap=2, seed=4), [w2], [[g.reshape(3, 20)] for (g,) in grads])
    assert torch.equal(w.detach().reshape(3, 20), w2.detach())


@pytest.mark.parametrize("shapes", [[(3, 20), (3, 4, 5)], [(2, 3), (2, 3, 1)], [(16, 8), (16, 8, 1)], [(1,), ()]])
def test_shapes_that_fold_alike_step_each_in_its_own_shape(shapes):
    """A Conv1d(8, 16, 1) weight next to a Linear(8, 16) one: the same matrix view, different
    shapes (they used to share a bucket, and the step failed writing them back). SVD
    projections: with S-RSI the second matrix's sketch is another draw than when it is alone,
    and the (16, 8, 1) runs differed by 2.4e-6, 93% of the tolerance; with SVD, to the bit."""
    grads = _grads(shapes, 3)
    params = _params(shapes)
    singles = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=0.01, rank=2, update_proj_gap=2, projection="svd", seed=1)
    _run(AdaMeM(params, **kw), params, grads)
    for i, p in enumerate(singles):
        _run(AdaMeM([p], **kw), [p], [[gs[i]] for gs in grads])
    for a, b in zip(params, singles):
        assert a.shape == b.shape
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("second", [(33, 20), (12, 5, 4)])
def test_a_compiled_step_follows_the_eager_one(second):
    """``torch.compile(opt.step)`` with matrices of two shapes: the second bucket used to get a
    wrong update (a transposed one silently, a folded one with an error)."""
    make = lambda ps: AdaMeM(ps, lr=1e-2, rank=2, seed=3)  # noqa: E731
    eager, compiled = eager_and_compiled(make, [(20, 33), second, (7,)], "aot_eager", 2)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_a_compiled_step_compiles_nothing_after_its_second_step(tensor_lr):
    """``torch.compile(opt.step)`` with new gradient tensors every step (as ``zero_grad()`` and a
    backward pass make them), a scheduler's lr and bf16 stochastic rounding: the first two
    steps compile (the first step's count is a constant), then nothing. The vector step was
    compiled anew every step (dynamo guarded each gradient by identity, read through the
    parameter as a key of ``self.state``), and so was the update (the lr, the rounding keys),
    until the recompile limit, after which they ran eagerly, silently. Also with torch's own
    recipe: an lr tensor given to the constructor (which refused one) and filled in place."""

    def decay(opt):
        if tensor_lr:
            opt.param_groups[0]["lr"].mul_(0.9)
        else:
            opt.param_groups[0]["lr"] *= 0.9

    def make(ps):
        return AdaMeM(ps, lr=torch.tensor(1e-2) if tensor_lr else 1e-2, rank=2, seed=3, bf16_stochastic_round=True)

    shapes = [(20, 33), (7,), (9,)]
    per_step, eager, compiled = graphs_per_step(make, shapes, "aot_eager", 5, torch.bfloat16, after_step=decay)
    assert [new for new, _ in per_step[2:]] == [0, 0, 0], per_step
    assert len({ran for _, ran in per_step[1:]}) == 1, per_step  # no frame dropped to eager
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_batched_bucket_equals_one_by_one():
    shapes = [(8, 12)] * 3
    grads = _grads(shapes, 4)
    params = _params(shapes)
    singles = [torch.nn.Parameter(p.detach().clone()) for p in params]
    _run(AdaMeM(params, lr=0.01, rank=3, update_proj_gap=2, projection="svd"), params, grads)
    for i, p in enumerate(singles):
        _run(AdaMeM([p], lr=0.01, rank=3, update_proj_gap=2, projection="svd"), [p], [[gs[i]] for gs in grads])
    for a, b in zip(params, singles):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="this torch has no Tensor.grad_dtype")
@pytest.mark.parametrize("first", [torch.bfloat16, torch.float16])
def test_a_gradient_of_another_dtype_in_the_bucket_leaves_the_noise_floors_alone(first):
    """Same-shaped fp32 parameters, the first with a bf16 (or fp16) ``grad_dtype``: each is
    stepped as in a group of its own. One bucket took the first gradient's dtype for all the
    noise floors: a real fp32 gradient's rows of R at ~1e-3 of its largest were dropped as
    bf16 noise (its step moved by up to 14 at lr 1), and a bf16 gradient got fp16's lower floor
    (by up to 12)."""
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(16, 4, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(32, 4, generator=gen)).Q
    exact = (u * torch.tensor([1.0, 3e-3, 2e-3, 1e-3])) @ v.T
    grads = [torch.randn(16, 32, generator=gen).to(first), exact, exact.bfloat16()]

    def steps(together: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(torch.zeros(16, 32)) for _ in grads]
        params[0].grad_dtype = first
        params[2].grad_dtype = torch.bfloat16
        groups = params if together else [{"params": [p]} for p in params]
        opt = AdaMeM(groups, lr=1.0, rank=4, seed=0, projection="svd")
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        return [p.detach().clone() for p in params]

    for a, b in zip(steps(True), steps(False)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- rounding noise
def _first_step(g, **kw):
    """``-Δw`` of one step from zero weights at lr 1, in ``g``'s dtype."""
    w = torch.nn.Parameter(torch.zeros_like(g))
    opt = AdaMeM([w], lr=1.0, seed=0, **kw)
    w.grad = g.clone()
    opt.step()
    return -w.detach()


@pytest.mark.parametrize("projection", ["srsi", "svd"])
@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e3])
def test_exactly_low_rank_gradient_steps_as_in_float64(projection, scale):
    """Rank 2 < r = 4: R's two extra rows and the residual are rounding noise, which Adafactor
    would scale up to an O(1) step (fp32 steps were 0.33 cos(step, G) here, against fp64's
    0.885); they are zero, so fp32 steps as fp64 does."""
    gen = torch.Generator().manual_seed(3)
    f64 = dict(generator=gen, dtype=torch.float64)
    g64 = scale * torch.randn(64, 2, **f64) @ torch.randn(2, 160, **f64)
    kw = dict(rank=4, projection=projection)
    step32, step64 = (_first_step(g64.to(dt), **kw).double() for dt in (torch.float32, torch.float64))
    assert torch.equal(step32, _first_step(g64.float(), **kw, residual_scale=0.0).double())
    torch.testing.assert_close(step32, step64, rtol=1e-3, atol=1e-3 * step64.abs().max().item())


@pytest.mark.parametrize("arrives_as", ["parameter_dtype", "fp32_on_its_grid"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, rank", [((64, 128), 1), ((96, 256), 2), ((160, 48), 1)])
def test_exactly_low_rank_gradient_in_low_precision_steps_as_in_float64(dtype, shape, rank, arrives_as):
    """A gradient that arrives in bf16/fp16 carries its own rounding (u = 2^-8 / 2^-11 of each
    entry), which the cast to fp32 does not remove: its noise floor used to be fp32's, and the
    step went mostly along that noise (cos with the fp64 step 0.1). Also for an fp32 parameter
    whose gradient lies on that grid (autocast's; ``test_autocast_gradient_is_recognised``), and
    for a tall matrix (its G transposed)."""
    gen = torch.Generator().manual_seed(5)
    f64 = dict(generator=gen, dtype=torch.float64)
    g64 = torch.randn(shape[0], rank, **f64) @ torch.randn(rank, shape[1], **f64) * 1e-3
    g = g64.to(dtype) if arrives_as == "parameter_dtype" else g64.to(dtype).float()
    step = _first_step(g, rank=4).double().flatten()
    want = _first_step(g64, rank=4).flatten()
    assert torch.nn.functional.cosine_similarity(step, want, dim=0) > 0.999


def test_autocast_gradient_is_recognised():
    """Under autocast an fp32 weight's gradient is a bf16 product cast up: three tokens give a
    rank-3 gradient plus bf16 noise, and the step takes the three rows alone, as on the exact
    gradient (fp64), where fp32's floor alone stepped along the noise too."""
    from adapprox_kernels.adamem import gradient_rounding_noise

    torch.manual_seed(9)
    lin = torch.nn.Linear(96, 48, bias=False)
    x, target = torch.randn(3, 96), torch.randn(3, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
    (out.float() - target).square().sum().backward()
    g = lin.weight.grad
    assert g.dtype == torch.float32 and gradient_rounding_noise(g.unsqueeze(0))[1].item() > 0
    x64 = x.double().bfloat16().double()  # what autocast multiplied
    delta = 2 * (out.double() - target.double())
    exact = delta.T @ x64
    step = _first_step(g, rank=8).double().flatten()
    want = _first_step(exact, rank=8).flatten()
    assert torch.nn.functional.cosine_similarity(step, want, dim=0) > 0.99


@pytest.mark.parametrize("dtype, size", [(torch.float32, 1e-4), (torch.bfloat16, 5e-3), (torch.float16, 6e-4)])
def test_a_small_real_residual_is_kept(dtype, size):
    """A residual a few times the rounding noise of G's dtype (fp32: ~1e-6·‖G‖; a bf16 / fp16
    gradient: ~1.5e-3 / 1.9e-4·‖G‖) still takes its one-sided step."""
    gen = torch.Generator().manual_seed(4)
    low = torch.randn(32, 2, generator=gen) @ torch.randn(2, 80, generator=gen)
    noise = torch.randn(32, 80, generator=gen)
    g = (low + size * low.norm() / noise.norm() * noise).to(dtype)
    with_resid, without = _first_step(g, rank=2).float(), _first_step(g, rank=2, residual_scale=0.0).float()
    assert (with_resid - without).norm() > 0.1 * without.norm()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 1e-6], ids=["normal", "fp16_subnormal"])
def test_gradient_rounding_noise_estimates_the_real_rounding_error(dtype, scale):
    """‖E‖_F from the spacings against the real error of rounding to ``dtype`` (at 1e-6 most fp16
    values are subnormal, with a fixed spacing of 2⁻²⁴); ‖E‖_2 at most about the row + column estimate."""
    from adapprox_kernels.adamem import gradient_rounding_noise

    gen = torch.Generator().manual_seed(8)
    exact = torch.randn(3, 96, 160, generator=gen) * torch.tensor([1.0, 2**-0.5, 1e3]).view(3, 1, 1) * scale
    rounded = exact.to(dtype).float()
    err = (rounded - exact).double()
    spectral, frobenius = gradient_rounding_noise(rounded, dtype)
    torch.testing.assert_close(frobenius.double(), torch.linalg.vector_norm(err, dim=(1, 2)), rtol=0.05, atol=0)
    assert (torch.linalg.matrix_norm(err, ord=2) < 1.1 * spectral).all()


def test_rounding_grid_is_read_per_matrix_and_only_from_nonzero_rows():
    """fp32 gradients: a real one, one on bf16's grid, one on fp16's grid unscaled by a
    GradScaler (2¹⁶; its values mostly below fp16's normals, so fp16's subnormal spacing would
    inflate the estimate 100-fold), and a real one whose sampled rows are all zero."""
    from adapprox_kernels.adamem import gradient_rounding_noise

    gen = torch.Generator().manual_seed(10)
    exact = torch.randn(4, 64, 96, generator=gen)
    exact[2] *= 1e-6
    exact[3, 0::4] = 0  # the rows a 64-row matrix samples
    g = exact.clone()
    g[1] = exact[1].bfloat16().float()
    g[2] = (exact[2] * 2**16).half().float() / 2**16
    _, frobenius = gradient_rounding_noise(g)
    err = torch.linalg.vector_norm((g - exact).double(), dim=(1, 2))
    assert frobenius[0] == 0 and frobenius[3] == 0
    torch.testing.assert_close(frobenius[1:3].double(), err[1:3], rtol=0.05, atol=0)


def test_bf16_gradient_rows_near_the_rounding_noise_are_kept():
    """A full-rank bf16 gradient with σᵢ ∝ i⁻²: its tail rows of R are real and only a few times
    the bf16 noise, so a floor far above the noise drops them and turns the step (cos 0.63 with a
    floor 1.5× the estimate, 0.46 at 5×; 0.92 with fp32's floor alone, 0.84 here)."""
    gen = torch.Generator().manual_seed(7)
    m, n = 192, 384
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    g = ((u * torch.arange(1, m + 1, dtype=torch.float64) ** -2.0) @ v.T).float()
    want = _first_step(g, rank=48).double().flatten()
    step = _first_step(g.bfloat16(), rank=48).double().flatten()
    assert torch.nn.functional.cosine_similarity(step, want, dim=0) > 0.75


# ------------------------------------------------------------------------------------ projection
@pytest.mark.parametrize("transfer", ["keep", "rotate"])
def test_a_refresh_without_gradient_is_made_on_the_next_step(transfer, monkeypatch):
    """LoRA's A has a zero gradient on step 1 (B starts at 0): P used to be an arbitrary basis
    kept for T steps, here [e1, e2], orthogonal to every later gradient, and the momentum stayed
    0. P is now recomputed on the matrix's next step, and the schedule stays the group's (steps
    1, T+1, …): a twin matrix in the same group with a gradient on step 1 keeps its P."""
    from adapprox_kernels import adamem

    calls = []
    real = adamem.top_left_subspace
    monkeypatch.setattr(adamem, "top_left_subspace", lambda g, *a: calls.append(g.shape[0]) or real(g, *a))
    w, twin = _params([(6, 10), (6, 10)])
    opt = AdaMeM([w, twin], rank=2, update_proj_gap=3, momentum_transfer=transfer, seed=0)
    g = torch.zeros(6, 10)
    g[4:] = torch.randn(2, 10)
    w.grad, twin.grad = torch.zeros(6, 10), g.clone()
    opt.step()
    state = opt.state[w]
    assert state["proj_pending"] and not opt.state[twin]["proj_pending"]
    assert torch.equal(state["P"], torch.zeros(6, 2)) and state["xi"] != state["xi"]  # kept as made
    twin_p = opt.state[twin]["P"].clone()
    for _ in range(3):
        w.grad, twin.grad = g.clone(), g.clone()
        opt.step()
    assert calls == [2, 1, 2]  # step 1 (both), step 2 (w alone), step 4 (both, on schedule)
    assert not state["proj_pending"] and state["exp_avg"].norm() > 0
    torch.testing.assert_close(state["P"] @ state["P"].T @ g, g)  # P spans the gradient's rows
    torch.testing.assert_close(state["P"], twin_p)
    assert 0 <= state["xi"] < 1e-6


def test_a_gradient_that_stays_zero_is_retried_at_powers_of_two_into_the_period(monkeypatch):
    """A module unused for a while: its pending refresh was retried, with a projection and a
    host read, on every step. Now on steps 1, 2, 4, 8, … into each period of T = 16 (14
    projections in 40 steps, not 40); the gradient that comes back on step 43 (10 steps into
    the period) is taken up on step 49, at the next scheduled refresh."""
    from adapprox_kernels import adamem

    refreshed = []
    real = adamem.top_left_subspace
    (w,) = _params([(6, 10)])
    opt = AdaMeM([w], rank=2, update_proj_gap=16, seed=0)
    monkeypatch.setattr(
        adamem, "top_left_subspace", lambda g, *a: refreshed.append(opt.state[w]["step"]) or real(g, *a)
    )
    g = torch.randn(6, 2) @ torch.randn(2, 10)
    for step in range(1, 50):
        w.grad = g.clone() if step >= 43 else torch.zeros(6, 10)
        opt.step()
    assert refreshed == [1, 2, 3, 5, 9, 17, 18, 19, 21, 25, 33, 34, 35, 37, 41, 49]
    assert not opt.state[w]["proj_pending"]
    torch.testing.assert_close(opt.state[w]["P"] @ opt.state[w]["P"].T @ g, g)


def test_a_refresh_waits_out_several_zero_gradients_and_nonfinite_skips():
    (w,) = _params([(6, 10)])
    opt = AdaMeM([w], rank=2, update_proj_gap=100, nonfinite="skip", seed=0)
    g = torch.randn(6, 2) @ torch.randn(2, 10)
    for grad in (torch.zeros(6, 10), torch.zeros(6, 10), torch.full((6, 10), float("nan")), g):
        w.grad = grad
        opt.step()
    state = opt.state[w]
    assert state["step"] == 3 and state["nonfinite_skips"] == 1 and not state["proj_pending"]
    torch.testing.assert_close(state["P"] @ state["P"].T @ g, g)


def test_srsi_subspace_matches_svd_on_low_rank():
    m, n, k = 30, 50, 5
    g = torch.randn(2, m, k, dtype=torch.float64) @ torch.randn(2, k, n, dtype=torch.float64)
    p_svd = top_left_subspace(g, k, "svd")
    p_rsi = top_left_subspace(g, k, "srsi", oversample=2, iters=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p_rsi.mT @ p_rsi, torch.eye(k, dtype=torch.float64).expand(2, k, k))
    torch.testing.assert_close(p_rsi @ p_rsi.mT, p_svd @ p_svd.mT, rtol=0, atol=1e-10)


def test_srsi_orders_directions_by_singular_value():
    """Rayleigh–Ritz: with oversampling, the kept columns are the top ones, not the first sketched."""
    m, n, r = 40, 60, 4
    u, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64))
    g = (u * 0.5 ** torch.arange(m, dtype=torch.float64)) @ v.T
    p = top_left_subspace(g.unsqueeze(0), r, "srsi", oversample=6, iters=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p[0] @ p[0].T, u[:, :r] @ u[:, :r].T, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype, noise", [(torch.float64, 0.0), (torch.float32, 1e-2)])
def test_svd_and_srsi_optimizers_agree_on_low_rank_gradients(dtype, noise):
    """Exactly rank-k gradients in fp64, or rank k plus a small full-rank part in fp32. (An exactly
    low-rank fp32 gradient leaves a residual of rounding noise, which one-sided Adafactor scales
    to O(1): the two projections then differ by their rounding, see docs/adamem.md.)"""
    m, n, k = 16, 24, 3
    basis = torch.randn(m, k, dtype=dtype)
    grads = [[basis @ torch.randn(k, n, dtype=dtype) + noise * torch.randn(m, n, dtype=dtype)] for _ in range(5)]
    runs = []
    for projection in ("svd", "srsi"):
        torch.manual_seed(2)
        (w,) = _params([(m, n)], dtype)
        _run(AdaMeM([w], lr=0.01, rank=k, update_proj_gap=1000, projection=projection, seed=3), [w], grads)
        runs.append(w.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-5)


def test_rotate_momentum_keeps_the_full_space_momentum():
    m, r, n = 10, 3, 7
    p_old, _ = torch.linalg.qr(torch.randn(1, m, r, dtype=torch.float64))
    o, _ = torch.linalg.qr(torch.randn(1, r, r, dtype=torch.float64))
    p_new = p_old @ o  # same subspace, another basis
    mom, row = torch.randn(1, r, n, dtype=torch.float64), torch.rand(1, r, dtype=torch.float64)
    full, row0 = p_old @ mom, row.clone()
    rotate_momentum(p_old, p_new, mom, row)
    torch.testing.assert_close(p_new @ mom, full)
    # The row statistic: the diagonal of O diag(row) Oᵀ with O = P_newᵀ P_old = oᵀ.
    rotated = o[0].T @ torch.diag(row0[0]) @ o[0]
    torch.testing.assert_close(row[0], torch.diagonal(rotated))


def test_transfer_policies_differ_after_a_projection_change():
    grads = _grads([(8, 12)], 4)
    out = []
    for transfer in ("keep", "rotate"):
        torch.manual_seed(0)
        (w,) = _params([(8, 12)])
        _run(AdaMeM([w], lr=0.01, rank=2, update_proj_gap=2, momentum_transfer=transfer, seed=1), [w], grads)
        out.append(w.detach())
    assert not torch.allclose(out[0], out[1])


# ------------------------------------------------------------------------------------- api
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_dtensor_parameters_are_refused():
    """DTensor parameters (FSDP2) raise a clear NotImplementedError when they are given, not
    DTensor's internal errors in the step (a 1-rank process group in this process suffices)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        matrix, vector = (
            torch.nn.Parameter(distribute_tensor(torch.randn(shape), mesh, [Shard(0)])) for shape in ((8, 6), (8,))
        )
        refused = "AdaMeM does not support DTensor parameters .* Use DDP, or Adapprox"
        for params in ([matrix], [vector], [{"params": _params([(4, 4)])}, {"params": [vector]}]):
            with pytest.raises(NotImplementedError, match=refused):
                AdaMeM(params, rank=2, seed=0)
        opt = AdaMeM(_params([(4, 4)]), rank=2, seed=0)
        with pytest.raises(NotImplementedError, match=refused):
            opt.add_param_group({"params": [matrix]})
        assert len(opt.param_groups) == 1
    finally:
        dist.destroy_process_group()


def test_closure_param_groups_and_report():
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 1))
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = AdaMeM(model.named_parameters(), lr=0.02, rank=2, update_proj_gap=5, seed=0)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(30):
        last = opt.step(closure).item()
    assert last < first
    report = opt.state_report()
    assert [r.kind for r in report.rows] == ["lowrank", "dense", "lowrank", "dense"]
    assert report.rows[0].name == "0.weight" and 0 <= report.rows[0].xi <= 1


def test_report_shows_no_xi_before_a_projection_found_a_subspace():
    """ξ is NaN in the state until a refresh finds a gradient to take P from (a zero gradient
    first): the report has no ξ for it (None, "-" in the table), not "nan"."""
    (w,) = _params([(6, 10)])
    opt = AdaMeM([w], rank=2, seed=0)
    w.grad = torch.zeros(6, 10)
    opt.step()
    assert opt.state[w]["xi"] != opt.state[w]["xi"]
    report = opt.state_report()
    assert report.rows[0].xi is None and "nan" not in str(report).lower()


@pytest.mark.gpu
def test_cuda_matches_cpu():
    shapes = [(16, 24), (24, 16), (5,)]
    grads = _grads(shapes, 4)
    outs = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(p.detach().to(device)) for p in _params(shapes)]
        opt = AdaMeM(params, lr=0.01, rank=3, update_proj_gap=2, projection="svd")
        _run(opt, params, [[g.to(device) for g in gs] for gs in grads])
        outs.append([p.detach().cpu() for p in params])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_one_host_read_of_xi_per_step(monkeypatch):
    """The ξ (and whether a subspace was found) of every bucket that refreshed its projection
    reaches the host in one read per step, not one per bucket; each parameter gets its own."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in [(12, 20), (12, 20), (30, 16), (7,)]]
    opt = AdaMeM(params, rank=2, seed=0)
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real(t))
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    # one for the non-finite check (4 gradients), one for the ξ and flags of both matrix buckets (2·(2 + 1))
    assert reads == [torch.Size([4]), torch.Size([6])]
    xis = [opt.state[p]["xi"] for p in params[:3]]
    assert all(0 < xi < 1 for xi in xis) and len(set(xis)) == 3
    # A step between projections reads the check only, and nothing else waits for the device.
    reads.clear()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    with NoHostReads():
        opt.step()
    assert reads == [torch.Size([4])]


def test_no_clipping_keeps_an_update_whose_sum_of_squares_overflows():
    """``clip_threshold=None`` (the default) divides by 1, also where Σ N1² overflows float32
    (a huge momentum over a statistic that a tiny gradient replaced, β2 = 0): not by
    inf/inf = NaN, which wrote NaN weights even at lr = 0."""
    p = torch.nn.Parameter(torch.ones(1, 1))
    opt = AdaMeM([p], lr=0.0, betas=(0.9999999, 0.0), rank=1, second_moment="gradient", seed=0)
    for g in (1e19, 1e-38):
        p.grad = torch.full((1, 1), g)
        opt.step()
    assert torch.equal(p.detach(), torch.ones(1, 1))


def test_a_step_that_fails_midway_leaves_no_refresh_outcome_to_the_next():
    """A step interrupted after its projection (an out-of-memory error, Ctrl-C) never stored
    that P, but its ξ and "found a subspace" waited in the optimizer, and the next step applied
    them: a pending refresh was cancelled, and P stayed all zero until the next scheduled one
    (200 steps), where a copy of the same state refreshed it at once."""
    from unittest import mock

    import adapprox_kernels.adamem as adamem_module

    w = torch.nn.Parameter(torch.randn(16, 24, generator=torch.Generator().manual_seed(0)))
    opt = AdaMeM([w], rank=2, seed=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # no subspace in a zero gradient: the refresh stays pending
        w.grad = torch.zeros(16, 24)
        opt.step()
    w.grad = torch.randn(16, 24, generator=gen)
    with mock.patch.object(adamem_module, "adamem_directions", side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            opt.step()
    twin_w = torch.nn.Parameter(w.detach().clone())
    twin = AdaMeM([twin_w], rank=2, seed=0)
    twin.load_state_dict(opt.state_dict())
    for _ in range(3):
        w.grad = torch.randn(16, 24, generator=gen)
        twin_w.grad = w.grad.clone()
        opt.step()
        twin.step()
    assert (opt.state[w]["P"] != 0).any()
    assert torch.equal(w, twin_w) and torch.equal(opt.state[w]["P"], twin.state[twin_w]["P"])
