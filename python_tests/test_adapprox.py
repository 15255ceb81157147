"""The Adapprox optimizer (reference backend) against the dense formula and torch.optim habits."""

import contextlib
import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from compiled_step import eager_and_compiled, graphs_per_step

from adapprox_kernels import AdaMeM, Adapprox
from adapprox_kernels import optim_base
from adapprox_kernels.state_report import held_bytes


def dense_adapprox(w0, grads, lr, betas, eps, d, wd, cosine_max_scale=None):
    """Algorithm 3 with an uncompressed V: what Adapprox must equal at full rank; with
    ``cosine_max_scale``, the step ``M`` scaled by ``1 / max(1 − cos(Upd, M), 1/max_scale)``."""
    w, v, m = w0.clone().double(), torch.zeros_like(w0, dtype=torch.float64), torch.zeros_like(w0, dtype=torch.float64)
    b1, b2 = betas[0], betas[1]
    for g in grads:
        g = g.double()
        v = b2 * v + (1 - b2) * g * g
        upd = g / (v.sqrt() + eps)
        upd = upd / max(1.0, (upd.square().mean().sqrt() / d).item())
        m = b1 * m + (1 - b1) * upd if b1 > 0 else upd
        step = m
        if cosine_max_scale is not None:
            cos = (upd * m).sum() / (upd.norm() * m.norm())
            step = m / max(1 - cos.item(), 1 / cosine_max_scale)
        w = w - lr * (step + wd * w)
    return w


def simulated_rank(k: float, steps: int, grow: bool, k_min: int, k_max: int, beta3: float = 0.9) -> float:
    """The rank after ``steps`` steps whose ξ is always above (grow) or below the threshold;
    with k_max <= 50 the step is Δk = 1."""
    for _ in range(steps):
        k_used = math.floor(k + 0.5)
        k_next = min(max(k_used + (1 if grow else -1), k_min), k_max)
        k = beta3 * k + (1 - beta3) * k_next
    return k


def run(opt_kwargs, w0, grads, dtype=torch.float32):
    w = torch.nn.Parameter(w0.clone().to(dtype))
    opt = Adapprox([w], **opt_kwargs)
    for g in grads:
        w.grad = g.to(dtype)
        opt.step()
    return w, opt


@pytest.mark.parametrize("beta1", [0.9, 0.0])
@pytest.mark.parametrize("exact_small", [False, True])
@pytest.mark.parametrize("shape", [(12, 20), (20, 7), (6, 3, 4)])
def test_full_rank_matches_dense_formula(beta1, exact_small, shape):
    """With k_max >= min(m, n) the compression is exact (factored path) or skipped (dense
    path): either way several steps equal the dense formula."""
    w0 = torch.randn(shape)
    grads = [torch.randn(shape) * (1 + i) for i in range(5)]
    kw = dict(lr=1e-2, betas=(beta1, 0.99, 0.9), eps=1e-8, clip_threshold=1.0, weight_decay=0.1)
    w, opt = run(dict(kw, k_max=64, exact_small_matrices=exact_small, seed=0), w0, grads, dtype=torch.float64)
    want = dense_adapprox(w0, grads, kw["lr"], kw["betas"], kw["eps"], kw["clip_threshold"], kw["weight_decay"])
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-8)
    state = opt.state[w]
    assert ("Q" in state) == (not exact_small)


@pytest.mark.parametrize("exact_small", [False, True])
def test_no_clipping_with_clip_threshold_none(exact_small):
    """``clip_threshold=None`` (as AdaMeM takes it): the update is never scaled down, factored
    or dense. The first steps' updates have an RMS near 1/√(1−β2) = 10, so d = 1 clips them."""
    w0, grads = torch.randn(12, 20), [torch.randn(12, 20) * (1 + i) for i in range(4)]
    kw = dict(lr=1e-2, betas=(0.9, 0.99, 0.9), eps=1e-8, weight_decay=0.1)
    options = dict(kw, k_max=64, exact_small_matrices=exact_small, seed=0)
    w, _ = run(dict(options, clip_threshold=None), w0, grads, dtype=torch.float64)
    want = dense_adapprox(w0, grads, kw["lr"], kw["betas"], kw["eps"], math.inf, kw["weight_decay"])
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-8)
    clipped, _ = run(dict(options, clip_threshold=1.0), w0, grads, dtype=torch.float64)
    assert not torch.allclose(clipped, w, rtol=1e-3)


@pytest.mark.parametrize("beta1", [0.9, 0.0])
@pytest.mark.parametrize("shape", [(), (1,), (5,)])
def test_scalars_and_vectors_match_dense_formula(beta1, shape):
    """A 0-d parameter (a learned temperature, a gate) is a one-entry dense second moment."""
    w0 = torch.randn(shape)
    grads = [torch.randn(shape) * (1 + i) for i in range(4)]
    kw = dict(lr=1e-2, betas=(beta1, 0.99, 0.9), eps=1e-8, clip_threshold=1.0, weight_decay=0.1)
    w, opt = run(dict(kw, k_max=4, seed=0), w0, grads, dtype=torch.float64)
    want = dense_adapprox(w0, grads, kw["lr"], kw["betas"], kw["eps"], kw["clip_threshold"], kw["weight_decay"])
    torch.testing.assert_close(w, want, rtol=1e-10, atol=1e-12)
    assert opt.state[w]["exp_avg_sq"].shape == shape


def test_full_rank_matches_dense_formula_fp32():
    # Small weights: fp32 rounding of W itself must not dominate the comparison of the updates.
    w0, grads = 0.01 * torch.randn(16, 24), [torch.randn(16, 24) for _ in range(4)]
    kw = dict(lr=1e-2, betas=(0.9, 0.999, 0.9), eps=1e-8, clip_threshold=1.0, weight_decay=0.0)
    w, _ = run(dict(kw, k_max=16, exact_small_matrices=False, seed=0), w0, grads)
    want = dense_adapprox(w0, grads, kw["lr"], kw["betas"], kw["eps"], 1.0, 0.0)
    assert (w.double() - want).norm() / (want - w0.double()).norm() < 1e-5


@pytest.mark.parametrize("beta1,cosine,wd", [(0.9, False, 0.1), (0.9, True, 0.0), (0.0, False, 0.1)])
def test_dense_in_place_path_gives_the_stacked_bits(monkeypatch, beta1, cosine, wd):
    """The dense step's foreach in-place path (taken on CUDA, and on the CPU for tensors of
    4,096 elements or more) equals its stacked path (taken for these small ones on the CPU) bit
    for bit; forced here on the CPU."""
    from adapprox_kernels import reference

    def steps():
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(7,)] * 3 + [(33,)] + [(5, 7)] * 2]
        kw = dict(lr=1e-2, betas=(beta1, 0.99, 0.9), cosine_guidance=cosine, weight_decay=wd, clip_threshold=0.05)
        opt = Adapprox(ps, **kw, seed=0)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach() for p in ps] + [t for p in ps for t in opt.state[p].values() if torch.is_tensor(t)]

    stacked = steps()
    monkeypatch.setattr(reference, "in_place_ok", lambda tensors, dtype: all(t.dtype == dtype for t in tensors))
    addcmul, calls = torch._foreach_addcmul_, []
    monkeypatch.setattr(torch, "_foreach_addcmul_", lambda *a, **k: calls.append(1) or addcmul(*a, **k))
    in_place = steps()
    assert calls  # the in-place path was taken
    assert len(stacked) == len(in_place) and all(torch.equal(a, b) for a, b in zip(stacked, in_place))


@pytest.mark.parametrize("shape", [(64, 96), (9, 8, 71)])  # factored; a dense (small) matrix
def test_cpu_updates_large_tensors_in_place_with_the_stacked_bits(monkeypatch, shape):
    """On the CPU, W and M of tensors of 4,096 elements or more are updated by foreach ops in
    place, not through stacked copies written back, with the stacked path's bits (forced here)."""
    from adapprox_kernels import reference

    def steps():
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for _ in range(3)]
        opt = Adapprox(ps, lr=1e-2, k_max=4, seed=0)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach() for p in ps] + [t for p in ps for t in opt.state[p].values() if torch.is_tensor(t)]

    add, calls = torch._foreach_add_, []
    monkeypatch.setattr(torch, "_foreach_add_", lambda *a, **k: calls.append(1) or add(*a, **k))
    in_place = steps()
    assert calls  # the in-place path was taken
    monkeypatch.setattr(reference, "in_place_ok", lambda tensors, dtype: False)
    stacked = steps()
    assert len(stacked) == len(in_place) and all(torch.equal(a, b) for a, b in zip(stacked, in_place))


def test_rank_falls_on_rank_one_second_moment():
    g = torch.rand(40, 1) @ torch.rand(1, 60) + 0.1  # G² and hence V are exactly rank 1
    w, opt = run(dict(k_init=10, k_max=10, k_min=1, seed=0), torch.zeros(40, 60), [g] * 60)
    state = opt.state[w]
    assert state["xi"] < 1e-3
    assert state["rank"] == pytest.approx(simulated_rank(10, 60, False, 1, 10))  # ξ stayed small every step
    assert state["rank"] < 4.6
    assert state["Q"].shape == (40, round(state["rank"]))


def test_rank_rises_when_error_is_large():
    grads = [torch.randn(48, 64) for _ in range(20)]  # noise: V is far from low rank
    w, opt = run(dict(k_init=2, k_max=30, k_min=1, seed=0), torch.zeros(48, 64), grads)
    state = opt.state[w]
    assert state["xi"] > 1e-3
    assert state["rank"] > 2.5
    assert state["rank"] == pytest.approx(simulated_rank(2, 20, True, 1, 30))  # ξ stayed large every step


def test_sigmoid_policy_grows_only_at_checks():
    grads = [torch.randn(48, 64) for _ in range(9)]
    w, opt = run(dict(rank_policy="sigmoid", rank_interval=4, k_max=30, seed=0), torch.zeros(48, 64), grads)
    state = opt.state[w]
    assert state["rank"] > 1  # grew at steps 4 and 8
    ranks = []
    w2 = torch.nn.Parameter(torch.zeros(48, 64))
    opt2 = Adapprox([w2], rank_policy="sigmoid", rank_interval=4, k_max=30, seed=0)
    for g in grads:
        w2.grad = g
        opt2.step()
        ranks.append(opt2.state[w2]["rank"])
    assert ranks[0] == ranks[1] == ranks[2] == 1.0  # no check before step 4
    assert ranks[3] > 1.0 and ranks[3] == ranks[4] == ranks[5] == ranks[6]  # grew at step 4, then waits
    assert ranks[7] > ranks[6] and ranks[8] == ranks[7]  # and grew again at step 8 (noise: ξ stays large)


@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_state_bytes(beta1):
    m, n = 70, 90
    w, opt = run(dict(betas=(beta1, 0.999, 0.9), k_init=6, k_max=6, seed=0), torch.randn(m, n), [torch.randn(m, n)])
    state = opt.state[w]
    k = state["Q"].shape[1]
    assert k == 6
    tensors = {key: v for key, v in state.items() if torch.is_tensor(v)}
    assert set(tensors) == ({"Q", "U", "exp_avg"} if beta1 > 0 else {"Q", "U"})  # β1 = 0: no m×n tensor
    report = opt.state_report()
    assert report.state_bytes == 4 * k * (m + n) + (4 * m * n if beta1 > 0 else 0)
    assert report.adamw_bytes == 8 * m * n
    assert "factored" in str(report) and "% of AdamW" in str(report)


def test_state_report_names_whole_rows_and_counts_adamw_lazily():
    """Long names are printed whole (cut at 40 characters, a layer's weight and bias rows read
    alike), and a parameter that never had a gradient holds no AdamW state either (counting it
    made the ratio to AdamW look twice as good with half a model frozen)."""
    layer = "decoder.layers.0.multihead_attn.in_proj_"
    shapes = {"weight": (12, 10), "bias": (12,)}
    params = {f"{layer}{kind}": torch.nn.Parameter(torch.randn(shape)) for kind, shape in shapes.items()}
    frozen = torch.nn.Parameter(torch.randn(12, 10))
    opt = Adapprox([*params.items(), ("frozen.weight", frozen)], k_max=2, seed=0)
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    report = opt.state_report()
    assert report.adamw_bytes == 8 * (120 + 12) and [r.adamw_bytes for r in report.rows][-1] == 0
    printed = [line.split()[0] for line in str(report).splitlines()[1:-1]]
    assert printed == [*params, "frozen.weight"]


def test_state_report_columns_stay_aligned_for_long_shapes_and_large_byte_counts():
    """A shape wider than 16 characters (a 6-D weight here; an MoE ``(64, 14336, 4096)``) and
    byte counts of 12 digits (AdamW's state of a 13B model) pushed their row's later columns,
    or the total's, out of line with the header."""
    from adapprox_kernels.state_report import StateReport, StateRow

    w = torch.nn.Parameter(torch.randn(1, 2, 1, 2, 1, 3))
    opt = Adapprox([("w", w), ("b", torch.nn.Parameter(torch.randn(3)))], k_max=2, seed=0)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()
    big = StateRow("embed", (128256, 8192), "factored", 3.0, 1e-3, 10**6, 8 * 128256 * 8192 * 16)
    for report in (opt.state_report(), StateReport([big, *opt.state_report().rows])):
        lines = str(report).splitlines()
        lines[-1] = lines[-1].split("  (")[0]  # the total's ratio to AdamW follows the last column
        shape_end = lines[0].index("shape") + len("shape")
        assert len({len(line) for line in lines}) == 1, "\n".join(lines)
        assert all(line[shape_end] == " " and line[shape_end - 1] != " " for line in lines[:-1]), "\n".join(lines)


def test_state_report_total_without_a_factored_matrix_prints_no_nan():
    """Before the first step (no state) and for vectors alone (no rank) the total row has no
    mean rank and no ratio to AdamW to show: "-", not "nan"; the repr's ratio is nan before
    the first step (no AdamW bytes to divide by)."""
    bias = torch.nn.Parameter(torch.randn(12))
    opt = Adapprox([bias], k_max=2, seed=0)
    for step in range(2):
        report = opt.state_report()
        total = str(report).splitlines()[-1]
        assert "nan" not in total.lower() and total.split()[1] == "-", total
        assert ("ratio=nan" in repr(report)) == (step == 0), repr(report)
        bias.grad = torch.randn_like(bias)
        opt.step()
    assert "(100.0% of AdamW)" in total


def make_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(30, 40), torch.nn.Tanh(), torch.nn.Linear(40, 20), torch.nn.LayerNorm(20)
    )


def train(model, opt, batches):
    for x in batches:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("warm", [False, True])
def test_state_dict_resume_is_bit_exact(warm):
    batches = [torch.randn(8, 30) for _ in range(8)]
    kw = dict(lr=1e-2, k_max=8, warm_start=warm, seed=5)
    ref = make_model()
    train(ref, Adapprox(ref.parameters(), **kw), batches)

    model = make_model()
    opt = Adapprox(model.parameters(), **kw)
    train(model, opt, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain tensors only

    resumed = make_model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = Adapprox(resumed.parameters(), **dict(kw, seed=123))  # the checkpoint's RNG wins
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, batches[4:])
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_sketch_rng_saved_for_another_device_index_or_a_missing_device():
    """The generator state saved for another device of the parameters' type is used (rank 0's
    ``cuda:0`` checkpoint loaded by rank 1 on ``cuda:1``: DDP replicas must keep drawing the
    same sketches; here ``cpu:0`` for ``cpu``), and one for a device this machine lacks is
    left alone (a GPU run's checkpoint loaded without CUDA)."""
    batches = [torch.randn(8, 30) for _ in range(6)]
    ref = make_model()
    train(ref, Adapprox(ref.parameters(), k_max=8, seed=5), batches)
    model = make_model()
    opt = Adapprox(model.parameters(), k_max=8, seed=5)
    train(model, opt, batches[:3])
    ckpt = copy.deepcopy(opt.state_dict())
    cpu_state = ckpt["sketch_rng"]["states"].pop("cpu")
    ckpt["sketch_rng"]["states"].update({"cpu:0": cpu_state, "cuda:0": torch.zeros_like(cpu_state)})
    opt2 = Adapprox(model.parameters(), k_max=8, seed=123)
    opt2.load_state_dict(ckpt)
    train(model, opt2, batches[3:])
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_sketch_rng_saved_for_two_other_devices_of_the_type_restarts_from_the_seed():
    """Two saved generator states of the parameters' device type, none for their device: which
    rank's to take is not told, so neither is taken and the device's generator restarts from
    the checkpoint's seed, as where none was saved."""
    batches = [torch.randn(8, 30) for _ in range(5)]
    model = make_model()
    opt = Adapprox(model.parameters(), k_max=8, seed=5)
    train(model, opt, batches[:2])
    ckpt = copy.deepcopy(opt.state_dict())
    cpu_state = ckpt["sketch_rng"]["states"].pop("cpu")
    runs = []
    for states in ({"cpu:0": cpu_state, "cpu:1": cpu_state.clone()}, {}):
        resumed = copy.deepcopy(model)
        opt2 = Adapprox(resumed.parameters(), k_max=8, seed=123)
        opt2.load_state_dict({**ckpt, "sketch_rng": {"seed": 5, "states": states}})
        train(resumed, opt2, batches[2:])
        runs.append(list(resumed.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_loading_a_state_of_another_kind_into_a_stepped_optimizer():
    """A matrix kept dense by one optimizer and factored in the loaded checkpoint: the next
    step buckets it by its new state (nothing remembered from before the load)."""
    w = torch.nn.Parameter(torch.randn(6, 7))
    factored = Adapprox([w], k_max=4, oversample=2, exact_small_matrices=False, seed=0)
    dense = Adapprox([w], k_max=4, oversample=2, seed=0)
    w.grad = torch.randn_like(w)
    factored.step()
    dense.step()
    assert "Q" in factored.state[w] and "exp_avg_sq" in dense.state[w]
    dense.load_state_dict(factored.state_dict())
    dense.step()
    factored.step()
    assert torch.equal(dense.state[w]["Q"], factored.state[w]["Q"])


@pytest.mark.parametrize("shape", [(24, 30), (7,)])
def test_beta1_may_change_between_steps(shape):
    """A first moment appears (zeros, as M_0) when β1 becomes > 0 and is kept, unused, while it
    is 0: the step then equals a fresh optimizer's from the same factors."""
    w = torch.nn.Parameter(torch.randn(shape))
    opt = Adapprox([w], betas=(0.0, 0.99, 0.9), k_max=4, seed=0)
    w.grad = torch.randn(shape)
    opt.step()
    assert "exp_avg" not in opt.state[w]
    opt.param_groups[0]["betas"] = (0.9, 0.99, 0.9)
    twin = torch.nn.Parameter(w.detach().clone())
    twin_opt = Adapprox([twin], betas=(0.9, 0.99, 0.9), k_max=4, seed=0)
    twin_opt.load_state_dict(opt.state_dict())
    twin_opt.state[twin]["exp_avg"] = torch.zeros(shape)
    w.grad = twin.grad = torch.randn(shape)
    opt.step()
    twin_opt.step()
    assert torch.equal(w, twin) and torch.equal(opt.state[w]["exp_avg"], twin_opt.state[twin]["exp_avg"])
    opt.param_groups[0]["betas"] = (0.0, 0.99, 0.9)
    kept = opt.state[w]["exp_avg"].clone()
    opt.step()
    assert torch.equal(opt.state[w]["exp_avg"], kept)


def test_a_state_that_does_not_fit_is_refused_on_load():
    """A checkpoint of another model (a transposed matrix) or of another optimizer (AdaMeM's)
    is refused by load_state_dict, naming the parameter, and nothing is loaded."""
    from adapprox_kernels import AdaMeM

    w, wt = torch.nn.Parameter(torch.randn(12, 10)), torch.nn.Parameter(torch.randn(10, 12))
    saved = {}
    for name, opt in (("adapprox", Adapprox([w], k_max=2, seed=0)), ("adamem", AdaMeM([w], rank=2, seed=0))):
        w.grad = torch.randn_like(w)
        opt.step()
        saved[name] = opt.state_dict()
    target = Adapprox([wt], k_max=2, seed=1)
    with pytest.raises(ValueError, match=r"params'\]\[0\] \(shape \(10, 12\)\).*'Q' is \(12, 2\), not \(10, 2\)"):
        target.load_state_dict(saved["adapprox"])
    with pytest.raises(ValueError, match="param_groups.*betas.*another optimizer"):
        Adapprox([w], k_max=2).load_state_dict(saved["adamem"])
    with pytest.raises(ValueError, match="param_groups.*betas.*another optimizer"):
        AdaMeM([w], rank=2).load_state_dict(saved["adapprox"])
    assert not target.state and target.param_groups[0]["k_max"] == 2


def _same_leaves(a, b) -> bool:
    """Do two nested structures (state dicts, tuples of tensors) hold the same leaves: equal
    tensors, equal numbers (NaN equal to NaN, as a ξ not measured yet)?"""
    flat_a, flat_b = torch.utils._pytree.tree_flatten(a)[0], torch.utils._pytree.tree_flatten(b)[0]
    return len(flat_a) == len(flat_b) and all(
        torch.equal(x, y) if torch.is_tensor(x) else x == y or x != x and y != y for x, y in zip(flat_a, flat_b)
    )


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=2)), (AdaMeM, dict(rank=2))])
@pytest.mark.parametrize(
    "old,new",
    [((12, 10), (10, 12)), ((12, 10), (120,)), ((12, 10), (12, 10, 1)), ((5,), (1, 5)), ((3, 4), (4, 3))],
)
@pytest.mark.parametrize("view", [False, True])
def test_a_parameter_whose_shape_changed_under_its_state_is_refused(cls, kw, old, new, view):
    """``p.data = …`` of another shape (a transposed view of the same storage among them):
    a ValueError naming the parameter before anything changes, not an error from deep inside
    the step, nor (AdaMeM's transposed matrix) a silent step in the wrong layout; a state made
    anew then steps. Another group's parameter, stepped before, keeps its weights and state."""
    torch.manual_seed(0)
    other, p = torch.nn.Parameter(torch.randn(12, 10)), torch.nn.Parameter(torch.randn(old))
    opt = cls([{"params": [other]}, {"params": [p]}], seed=0, **kw)
    for _ in range(2):
        other.grad, p.grad = torch.randn_like(other), torch.randn_like(p)
        opt.step()
    if view:  # same storage, so any cache keyed by where it lives must see the sizes too
        p.data = p.data.reshape(new[::-1]).t() if len(new) == 2 else p.data.reshape(new)
    else:
        p.data = torch.randn(new)
    other.grad, p.grad = torch.randn_like(other), torch.randn_like(p)
    before = copy.deepcopy((other.detach(), p.detach(), opt.state_dict()))
    with pytest.raises(ValueError, match=r"step: the state of param_groups\[1\]\['params'\]\[0\] does not fit"):
        opt.step()
    after = (other.detach(), p.detach(), opt.state_dict())
    assert _same_leaves(before, after)
    opt.state[p] = {}
    opt.step()
    assert opt.state[p]["step"] == 1 and torch.isfinite(p).all()


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=2, oversample=1, power_iters=1)), (AdaMeM, dict(rank=2))])
@pytest.mark.parametrize(
    "old,new", [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_a_parameter_cast_after_its_state_was_made_steps_as_its_resumed_run(cls, kw, old, new):
    """``model.double()`` / ``model.half()`` after some steps (the parameters keep their
    identity, their dtype changes): the state takes the dtypes the documented rule gives the
    new dtype (fp64 factors for an fp64 weight, the first moment in the weight's dtype), as a
    checkpoint saved and loaded there would, so that the run and its resume take the same
    bits. Kept as they were, an fp64 weight stepped in fp32 (its resume differed by ~1e-4),
    and a bucket whose other member's state was made after the cast (a weight without a
    gradient until then) held states of both dtypes and raised from inside the step."""
    shapes = [(12, 10), (12, 10), (7,), (7,)]

    def run(resume: bool):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=old)) for s in shapes]
        opt = cls(params, seed=0, **kw)
        for step in range(4):
            if step == 2:
                for p in params:
                    p.data = p.data.to(new)
                if resume:
                    saved = copy.deepcopy(opt.state_dict())
                    opt = cls(params, seed=1, **kw)
                    opt.load_state_dict(saved)
            for i, p in enumerate(params):  # the second of each shape has no state before the cast
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) if step >= 2 or i % 2 == 0 else None
            opt.step()
        return params, opt

    params, opt = run(False)
    resumed, resumed_opt = run(True)
    assert _same_leaves(
        ([p.detach() for p in params], opt.state_dict()), ([p.detach() for p in resumed], resumed_opt.state_dict())
    )
    floating = 64 if new == torch.float64 else 32
    for p in params:
        assert p.dtype == new and torch.isfinite(p).all()
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.is_floating_point():
                want = new if (cls is Adapprox and key == "exp_avg") else getattr(torch, f"float{floating}")
                assert value.dtype == want, (key, value.dtype)


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=2, oversample=1, power_iters=1)), (AdaMeM, dict(rank=2))])
def test_a_storage_that_comes_back_after_a_cast_takes_its_dtypes_state(cls, kw):
    """``p.data`` swapped to an fp64 copy for a step, then back to its own fp32 storage (the
    swap of manual mixed precision): each step's state has the dtypes of the weight it steps,
    also where the step finds the storage, and its buckets, remembered from before the cast."""
    params = [torch.nn.Parameter(torch.randn(12, 10)), torch.nn.Parameter(torch.randn(7))]
    opt = cls(params, seed=0, **kw)
    originals = [p.data for p in params]
    for data in (originals, [d.double() for d in originals], originals):
        for p, d in zip(params, data):
            p.data, p.grad = d, torch.randn_like(d)
        opt.step()
        for p in params:
            held = {v.dtype for v in opt.state[p].values() if torch.is_tensor(v) and v.is_floating_point()}
            assert held == {p.dtype}


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=2)), (AdaMeM, dict(rank=2))])
@pytest.mark.parametrize("shape", [(12, 10), (7,)])
def test_two_parameters_over_one_storage_are_refused(cls, kw, shape):
    """``b.data = a.data`` (weights tied by hand, two Parameter objects): one bucket computed
    both updates from the same old weights and wrote them in turn, so ``a``'s gradient was
    lost, silently (AdamW applies both). A ValueError naming both, before anything changes;
    a view of another shape steps, in a bucket of its own, after the first."""
    torch.manual_seed(0)
    other, a, b = (torch.nn.Parameter(torch.randn(shape)) for _ in range(3))
    opt = cls([{"params": [other]}, {"params": [a, b]}], seed=0, **kw)
    for p in (other, a, b):
        p.grad = torch.randn(shape)
    opt.step()
    b.data = a.data
    for p in (other, a, b):
        p.grad = torch.randn(shape)
    before = copy.deepcopy((other.detach(), a.detach(), opt.state_dict()))
    with pytest.raises(
        ValueError, match=r"\[1\]\['params'\]\[0\] and param_groups\[1\]\['params'\]\[1\] are the same memory"
    ):
        opt.step()
    assert _same_leaves(before, (other.detach(), a.detach(), opt.state_dict()))
    b.data = a.data.view(shape[::-1] if len(shape) == 2 else (1, *shape))  # another shape: another bucket
    b.grad = torch.randn(b.shape)
    opt.state[b] = {}
    opt.step()
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=2)), (AdaMeM, dict(rank=2))])
@pytest.mark.parametrize("shape", [(12, 10), (7,)])
def test_two_parameters_over_overlapping_views_are_refused(cls, kw, shape):
    """Two parameters of one shape over overlapping parts of one buffer (not the same first
    element, which the test above covers): one bucket computed both updates from the same old
    weights and the last write won on the shared elements, so one gradient was lost there,
    silently (AdamW applies both). A ValueError naming both, before anything changes; views
    of one buffer that share no element (interleaved, or side by side) step as before."""
    torch.manual_seed(0)
    numel = torch.Size(shape).numel()
    buf = torch.randn(3 * numel)
    a, b = (torch.nn.Parameter(buf[i : i + numel].view(shape)) for i in (0, numel // 2))
    other = torch.nn.Parameter(buf[2 * numel :].view(shape))  # beside both: fine
    opt = cls([{"params": [other]}, {"params": [a, b]}], seed=0, **kw)
    for p in (other, a, b):
        p.grad = torch.randn(shape)
    before = copy.deepcopy((buf, opt.state_dict()))
    names = r"\[1\]\['params'\]\[0\] and param_groups\[1\]\['params'\]\[1\]"
    with pytest.raises(ValueError, match=names + " share part of their memory"):
        opt.step()
    assert _same_leaves(before, (buf, opt.state_dict()))
    even, odd = (torch.nn.Parameter(x) for x in torch.randn(numel, 2).unbind(1))  # interleaved: no element shared
    opt = cls([a, even, odd], seed=0, **kw)
    for p in (a, even, odd):
        p.grad = torch.randn(p.shape)
    opt.step()


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=2)), (AdaMeM, dict(rank=2))])
def test_a_state_loaded_into_a_now_empty_weight_is_refused(cls, kw):
    """A (3, 5) weight's state loaded where the weight is (0, 5): a ValueError naming it (the
    matrix view divided by the 0 rows: ZeroDivisionError)."""
    a = torch.nn.Parameter(torch.randn(3, 5))
    opt = cls([a], seed=0, **kw)
    a.grad = torch.randn(3, 5)
    opt.step()
    target = cls([torch.nn.Parameter(torch.randn(0, 5))], seed=0, **kw)
    with pytest.raises(ValueError, match=r"\(shape \(0, 5\)\) does not fit it"):
        target.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    "cls,kw,edit,match",
    [
        (Adapprox, dict(k_max=2), {"step": 4.0}, r"'step' is 4.0, not an int >= 0"),
        (Adapprox, dict(k_max=2), {"step": -5}, r"'step' is -5, not an int >= 0"),
        (Adapprox, dict(k_max=2), {"rank": float("nan")}, r"'rank' is nan, not a finite number >= 1"),
        (Adapprox, dict(k_max=2), {"rank": "2"}, r"'rank' is '2', not a finite number >= 1"),
        (Adapprox, dict(k_max=2), {"Q": torch.zeros(12, 2, dtype=torch.int64)}, r"'Q' holds torch.int64"),
        (Adapprox, dict(k_max=2), {"Q": torch.tensor(1.0)}, r"'Q' is \(\), not \(12, 2\)\. Was"),
        (Adapprox, dict(k_max=2), {"Q": 1.0}, r"'Q' is a float, not a tensor\. Was"),
        (AdaMeM, dict(rank=2), {"P": torch.tensor(1.0)}, r"'P' is \(\), not \(10, 2\)\. Was"),
        (AdaMeM, dict(rank=2), {"step": "1"}, r"'step' is '1', not an int >= 0"),
        (AdaMeM, dict(rank=2), {"rank": 2.0}, r"'rank' is 2.0, not an int >= 1"),
    ],
)
def test_a_saved_number_or_dtype_the_step_cannot_read_is_refused_on_load(cls, kw, edit, match):
    """These loaded, and the next step raised a TypeError or ValueError (or, for a negative
    step count, ran on): refused by load_state_dict, naming the entry, with nothing loaded. A
    0-d factor made the check itself raise an IndexError, and a Q that is no tensor also
    failed a fitting U (the width it took from Q was None)."""
    w = torch.nn.Parameter(torch.randn(12, 10))
    opt = cls([w], seed=0, **kw)
    w.grad = torch.randn_like(w)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0] = {**saved["state"][0], **edit}
    target = cls([w], seed=0, **kw)
    with pytest.raises(ValueError, match=rf"params'\]\[0\] .*{match}"):
        target.load_state_dict(saved)
    assert not target.state


def test_a_step_count_saved_as_a_numpy_integer_loads_and_steps():
    """A checkpoint rewritten by other tools may hold NumPy ints: a step count is any integer."""
    w = torch.nn.Parameter(torch.randn(12, 10))
    opt = Adapprox([w], k_max=2, seed=0)
    w.grad = torch.randn_like(w)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["step"] = np.int64(1)
    opt.load_state_dict(saved)
    opt.step()
    assert opt.state[w]["step"] == 2


@pytest.mark.parametrize("peer", [torch.optim.AdamW, torch.optim.Adam])
def test_another_optimizers_checkpoint_is_refused_on_load(peer):
    """torch.optim's AdamW checkpoint: its groups (two betas) would replace ours and fail steps
    later, its tensor ``step`` and ``exp_avg_sq`` pass for a dense state. Refused, naming what
    does not fit, and nothing is loaded."""
    w, b = torch.nn.Parameter(torch.randn(12, 10)), torch.nn.Parameter(torch.randn(12))
    other = peer([w, b], lr=1e-3)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    other.step()
    saved = other.state_dict()
    opt = Adapprox([w, b], k_max=2, seed=0)
    with pytest.raises(ValueError, match=r"saved param_groups\[0\] does not fit: betas.*another optimizer"):
        opt.load_state_dict(saved)
    assert not opt.state and opt.param_groups[0]["betas"] == (0.9, 0.999, 0.9)
    saved["param_groups"][0]["betas"] = (0.9, 0.999, 0.9)  # groups that fit: the state still does not
    with pytest.raises(ValueError, match="'step' is a Tensor, not a number"):
        opt.load_state_dict(saved)
    assert not opt.state


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_a_checkpoint_with_a_schedulers_lr_loads_and_resumes(kind):
    """The step takes a scheduler's writes of a good value: a tensor lr filled in
    place, or a LambdaLR's NumPy number. The checkpoint of such a run must load (the saved
    groups' check refused it, as another optimizer's) and resume bit for bit."""
    import numpy as np

    def run(resume_at=None):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(20, 33), (7,)]]

        def make():
            opt = Adapprox(params, k_max=4, seed=0)
            if kind == "tensor":
                opt.param_groups[0]["lr"] = torch.tensor(1e-3)
            return opt

        opt = make()
        for step in range(4):
            if step == resume_at:
                saved = copy.deepcopy(opt.state_dict())
                opt = make()
                opt.load_state_dict(saved)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            lr = opt.param_groups[0]["lr"]
            if kind == "tensor":
                lr.mul_(0.5)
            else:
                opt.param_groups[0]["lr"] = lr * np.float32(0.5)
        return params

    for a, b in zip(run(), run(resume_at=2)):
        assert torch.equal(a, b)


def test_a_compiled_step_follows_the_eager_one():
    """``torch.compile(opt.step)`` traces the step, graph breaks included; it must run and stay
    with the eager step (to rounding: the traced QR may order its sums otherwise)."""
    make = lambda ps: Adapprox(ps, k_max=2, seed=0)  # noqa: E731
    eager, compiled = eager_and_compiled(make, [(12, 10), (12, 10), (10,)], "eager", 3)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_a_compiled_step_with_matrices_of_two_shapes():
    """Through AOT autograd (every backend but "eager"), the second shape recompiles the bucket
    step with dynamic shapes; a folded 3-D gradient's ``reshape(-1, n)`` then made a guard that
    dynamo could not place, and the step raised IndexError."""
    make = lambda ps: Adapprox(ps, k_max=3, exact_small_matrices=False, seed=0)  # noqa: E731
    eager, compiled = eager_and_compiled(make, [(20, 33), (12, 5, 4)], "aot_eager", 3)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("optimizer", [Adapprox, AdaMeM])
def test_a_compiled_step_with_the_default_seed(optimizer):
    """``torch.compile(opt.step)`` of an optimizer made with no seed (the default): its first
    step marks the drawn seed shared, an attribute of the optimizer, which the dynamo of torch
    2.11 refused (AssertionError, pytorch#171590) and that of 2.14 dropped silently (the seed
    stayed unshared: under a process group made after the optimizer, each rank kept its own)."""
    opts = []

    def make(ps):
        opts.append(optimizer(ps, lr=1e-2))
        return opts[-1]

    per_step, eager, compiled = graphs_per_step(make, [(24, 30), (7,)], "aot_eager", 4)
    assert [opt._seed_unshared for opt in opts] == [False, False]
    assert [new for new, _ in per_step[2:]] == [0, 0], per_step
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("optimizer, kw", [(Adapprox, dict(k_max=2)), (AdaMeM, dict(rank=2))])
def test_a_compiled_step_with_a_matrix_sitting_out(optimizer, kw):
    """``torch.compile(opt.step)`` where a matrix with state has no gradient for two steps (a
    module unused for a while): Adapprox checks its factors for views of a larger stack, which,
    traced, read the fake view's ``_base``, None at run time (an AttributeError inside the
    compiled step, torch 2.11 and 2.14 alike). The compiled run follows the eager one."""
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(24, 20), (24, 20), (5,)]]
        opt = optimizer(params, lr=1e-2, seed=0, **kw)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for i in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if i in (2, 3):
                params[1].grad = None
            step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def _attributes(opt):
    """Each attribute of ``opt``: its value where it is a number, string, bool or None, else its
    type (a cache's contents may differ by design: ``_factor_stacks`` is not kept under compile)."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else type(v) for k, v in vars(opt).items()}


@pytest.mark.parametrize("optimizer, kw", [(Adapprox, dict(k_max=4, warm_start=True)), (AdaMeM, dict(rank=2))])
def test_a_compiled_step_leaves_the_attributes_of_the_eager_one(optimizer, kw):
    """torch 2.14's dynamo drops, silently, any attribute a compiled step sets on the optimizer
    (2.11 raises: pytorch#171590); the seed's sharing was lost that way. The step's writers run
    eagerly (``_EAGER_UNDER_COMPILE``): after the same steps, a matrix sitting one out among
    them, the compiled optimizer has the eager one's attributes, with their values where they
    are plain (dynamo keeps the changes inside a container), so a new writer cannot slip in
    unnoticed."""
    attrs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(24, 20), (24, 20), (5,)]]
        torch.manual_seed(0)  # the default seed, drawn from torch's RNG: the same in both runs
        opt = optimizer(params, lr=1e-2, **kw)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for i in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if i == 2:
                params[1].grad = None
            step()
        attrs.append(_attributes(opt))
    assert attrs[0] == attrs[1]


def _low_rank_grad(shape, generator):
    """A rank-2 gradient for matrices: ξ falls below the threshold and the rank moves every step."""
    if len(shape) < 2:
        return torch.randn(shape, generator=generator)
    return torch.randn(shape[0], 2, generator=generator) @ torch.randn(2, shape[1], generator=generator)


def _decay_lr(opt):
    for group in opt.param_groups:
        group["lr"] *= 0.9  # what a scheduler writes every step


@pytest.mark.parametrize("case", ["lr schedule", "tensor lr schedule", "stochastic rounding", "moving rank"])
def test_a_compiled_step_compiles_nothing_after_its_second_step(case):
    """``torch.compile(opt.step)`` compiles the first two steps' frames (the second has factors)
    and then nothing: what changes every step is no constant of a graph. It used to: a
    scheduler's lr (a float of the update, and of the step's hyperparameter check), the
    stochastic-rounding keys (Python ints, new every step) and the rank while it moves (a float
    of the sketch width): the update, the step or the sketch draw was compiled anew every step,
    and from the ninth, past dynamo's recompile limit, silently run eagerly. The compiled
    parameters follow the eager ones. torch's own recipe, an lr tensor given to the constructor
    and filled in place by the scheduler, too."""
    kw, dtype, grad, after = dict(k_max=2, seed=0), torch.float32, torch.randn, None
    if case == "lr schedule":
        after = _decay_lr
    elif case == "tensor lr schedule":
        after = lambda opt: opt.param_groups[0]["lr"].mul_(0.9)  # noqa: E731
    elif case == "stochastic rounding":
        kw["bf16_stochastic_round"], dtype = True, torch.bfloat16
    else:
        kw["k_max"], grad = 8, _low_rank_grad
    shapes = [(24, 30), (24, 30), (7,)]
    per_step, eager, compiled = graphs_per_step(
        lambda ps: Adapprox(ps, **kw, **({"lr": torch.tensor(1e-3)} if case == "tensor lr schedule" else {})),
        shapes, "aot_eager", 5, dtype, grad, after,
    )  # fmt: skip
    assert [new for new, _ in per_step[2:]] == [0, 0, 0], per_step
    assert len({ran for _, ran in per_step[1:]}) == 1, per_step  # no frame dropped to eager
    for a, b in zip(eager, compiled):
        if dtype == torch.bfloat16:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_update_from_device_scalars_gives_the_bits_of_the_numbers(device):
    """Compiled, the reference update reads α, λ and β1 from a tensor (``scalars``), not as
    Python numbers; it must write the bits the numbers give, momentum, weight decay, cosine
    guidance and stochastic rounding (its keys as a tensor too) included, on a GPU as well
    (``bash bench/gpu_session.sh tests`` runs the ``gpu`` case)."""
    from adapprox_kernels.reference import apply_updates
    from adapprox_kernels.transfer import update_scalars

    gen = torch.Generator().manual_seed(0)
    for dtype, beta1, wd, cosine in [
        (torch.float32, 0.0, 0.0, None), (torch.float32, 0.9, 0.1, None), (torch.float32, 0.9, 0.1, 2.0),
        (torch.bfloat16, 0.9, 0.1, None), (torch.bfloat16, 0.0, 0.1, None),
    ]:  # fmt: skip
        for trial in range(10):
            lr = float(torch.rand((), generator=gen)) * 1e-2
            p0, m0 = (torch.randn(3, 17, 9, generator=gen).to(device, dtype) for _ in range(2))
            upd = torch.randn(3, 17, 9, generator=gen).to(device)
            keys = [trial, 2**32 - 5, 99] if dtype == torch.bfloat16 else None
            out = []
            for scalars in (None, update_scalars(lr, wd, beta1, torch.device(device))):
                ps, ms = list(p0.clone()), list(m0.clone()) if beta1 else None
                k = keys if scalars is None or keys is None else torch.tensor(keys, device=device)
                apply_updates(
                    ps, upd, ms, lr=lr, beta1=beta1, weight_decay=wd, cosine_max_scale=cosine if beta1 else None,
                    rounding_keys=k, scalars=scalars,
                )  # fmt: skip
                out.append(torch.stack(ps + (ms or [])))
            assert torch.equal(*out), (dtype, beta1, wd, cosine, trial)


def test_bf16_params_keep_fp32_factors_through_checkpoint():
    w = torch.nn.Parameter(torch.randn(24, 40, dtype=torch.bfloat16))
    opt = Adapprox([w], k_max=4, seed=0)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    assert w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all()
    assert opt.state[w]["Q"].dtype == torch.float32
    opt2 = Adapprox([w], k_max=4)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[w]["Q"].dtype == torch.float32
    assert torch.equal(opt2.state[w]["U"], opt.state[w]["U"])


def test_checkpoint_dtypes_follow_the_parameters_it_is_loaded_into():
    """A resume in another precision: M takes the new parameter's dtype, the factors fp32 (fp64
    only for an fp64 parameter), as a fresh state would."""
    w = torch.nn.Parameter(torch.randn(20, 30, dtype=torch.float64))
    opt = Adapprox([w], k_max=2, seed=0)
    w.grad = torch.randn_like(w)
    opt.step()
    cases = ((torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64))
    for dtype, factors in cases:
        v = torch.nn.Parameter(w.detach().to(dtype))
        other = Adapprox([v], k_max=2)
        other.load_state_dict(opt.state_dict())
        state = other.state[v]
        assert state["exp_avg"].dtype == dtype and state["Q"].dtype == state["U"].dtype == factors
        torch.testing.assert_close(state["U"], opt.state[w]["U"].to(factors))


@pytest.mark.parametrize("cls, kw", [(Adapprox, dict(k_max=2)), (AdaMeM, dict(rank=2))], ids=["adapprox", "adamem"])
def test_load_state_dict_hooks_see_and_shape_the_state(cls, kw):
    """As with torch.optim: a pre-hook may rewrite the saved dict (here: swap two parameters'
    states, so the checks and the loaded tensors follow it), and a post-hook has the last word."""
    a, b = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(6, 5))
    opt = cls([a, b], **kw)
    a.grad, b.grad = torch.ones(6, 5), -3 * torch.ones(6, 5)
    opt.step()

    def swap(_, sd):
        sd = dict(sd, state=dict(sd["state"]))
        sd["state"][0], sd["state"][1] = sd["state"][1], sd["state"][0]
        return sd

    swapped = cls([a, b], **kw)
    swapped.register_load_state_dict_pre_hook(swap)
    swapped.load_state_dict(opt.state_dict())
    for mine, theirs in ((a, b), (b, a)):
        assert torch.equal(swapped.state[mine]["exp_avg"], opt.state[theirs]["exp_avg"])
    zeroed = cls([a, b], **kw)
    zeroed.register_load_state_dict_post_hook(lambda o: [s["exp_avg"].zero_() for s in o.state.values()])
    zeroed.load_state_dict(opt.state_dict())
    assert all(not s["exp_avg"].any() for s in zeroed.state.values())


@pytest.mark.parametrize("cls, kw", [(Adapprox, dict(k_max=2)), (AdaMeM, dict(rank=2))], ids=["adapprox", "adamem"])
def test_a_checkpoint_naming_its_parameters_in_another_order_is_refused(cls, kw):
    """State loads by position (as torch.optim's): where the checkpoint and the optimizer name
    the same parameters in another order (layers defined in another order, groups swapped),
    same-shaped q and k would take each other's state and names silently. A ValueError then,
    nothing loaded; other names (a compiled model's prefix) load by position, as in torch."""
    q, k = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(6, 5))
    one_group = cls([("q", q), ("k", k)], **kw)
    two_groups = cls([{"params": [("q", q)]}, {"params": [("k", k)], "weight_decay": 0.5}], **kw)
    for opt, swapped in (
        (one_group, [("k", k), ("q", q)]),
        (two_groups, [{"params": [("k", k)], "weight_decay": 0.5}, {"params": [("q", q)]}]),
    ):
        q.grad, k.grad = torch.ones(6, 5), -3 * torch.ones(6, 5)
        opt.step()
        reordered = cls(swapped, **kw)
        match = r"the same parameter names in another order: its param_groups\[0\]\['params'\]\[0\] is 'q'"
        with pytest.raises(ValueError, match=match):
            reordered.load_state_dict(opt.state_dict())
        assert not reordered.state
    renamed = cls([("_orig_mod.q", q), ("_orig_mod.k", k)], **kw)
    renamed.load_state_dict(one_group.state_dict())
    assert torch.equal(renamed.state[q]["exp_avg"], one_group.state[q]["exp_avg"])


@pytest.mark.parametrize("cls, kw", [(Adapprox, dict(k_max=2)), (AdaMeM, dict(rank=2))], ids=["adapprox", "adamem"])
def test_state_dict_post_hooks_see_the_sketch_rng(cls, kw):
    """A post-hook that moves the state dict elsewhere (say, into a sharded format) must see all
    of it: the sketch RNG used to be added after the hooks had run."""
    w = torch.nn.Parameter(torch.randn(6, 5))
    opt = cls([w], **kw)
    w.grad = torch.randn(6, 5)
    opt.step()
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sorted(sd)))
    assert "sketch_rng" in opt.state_dict() and seen == [["param_groups", "sketch_rng", "state"]]
    assert len(opt._optimizer_state_dict_post_hooks) == 1  # ours is gone again


@pytest.mark.parametrize("cls", [Adapprox, AdaMeM])
def test_a_parameter_twice_in_a_group_is_refused(cls):
    """torch.optim only warns, and the parameter would then take two steps per step."""
    w, v = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"param_groups\[0\]: a parameter appears more than once"):
        cls([w, v, w])
    opt = cls([w])
    with pytest.raises(ValueError, match=r"param_groups\[1\]"):
        opt.add_param_group({"params": [v, v]})
    assert len(opt.param_groups) == 1


def test_checkpoint_keeps_the_loading_optimizers_backend():
    """``backend`` and ``cuda_graphs`` say how to run here, so a checkpoint (say, of a GPU run
    that asked for the Triton kernels by name) does not override them; hyperparameters load."""
    w = torch.nn.Parameter(torch.randn(12, 10))
    opt = Adapprox([w], k_max=2, lr=0.5, seed=0)
    w.grad = torch.randn_like(w)
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0].update(backend="triton", cuda_graphs=True)
    here = Adapprox([w], k_max=2, backend="reference")
    here.load_state_dict(saved)
    group = here.param_groups[0]
    assert (group["backend"], group["cuda_graphs"], group["lr"]) == ("reference", False, 0.5)
    w.grad = torch.randn_like(w)
    here.step()


def test_vectors_dense_and_conv_folded():
    conv = torch.nn.Conv2d(3, 8, 3)
    opt = Adapprox(conv.parameters(), k_max=4, exact_small_matrices=False, seed=0)
    conv(torch.randn(2, 3, 9, 9)).square().mean().backward()
    before = conv.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, conv.weight)
    assert opt.state[conv.weight]["Q"].shape[0] == 8 and opt.state[conv.weight]["U"].shape[0] == 27
    assert opt.state[conv.bias]["exp_avg_sq"].shape == (8,)


@pytest.mark.parametrize("shapes", [[(12, 8), (12, 8, 1, 1)], [(12, 8, 1, 1), (12, 8)], [(6, 20), (6, 4, 5)]])
def test_shapes_that_fold_alike_step_each_in_its_own_shape(shapes):
    """A Conv2d(8, 12, 1) weight next to a Linear(8, 12) one: the same matrix view, different
    shapes (they used to share a bucket, and the reference step failed stacking them). At full
    rank the factored step is exact, so each must equal the dense formula."""
    w0s = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(3)]
    params = [torch.nn.Parameter(w.clone()) for w in w0s]
    kw = dict(lr=1e-2, betas=(0.9, 0.99, 0.9), eps=1e-8, clip_threshold=1.0, weight_decay=0.1)
    opt = Adapprox(params, **kw, k_max=64, exact_small_matrices=False, seed=0)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    for i, (p, w0) in enumerate(zip(params, w0s)):
        assert "Q" in opt.state[p] and p.shape == w0.shape
        want = dense_adapprox(w0, [gs[i] for gs in grads], kw["lr"], kw["betas"], kw["eps"], 1.0, kw["weight_decay"])
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-8)


def test_zero_gradient_and_empty_and_frozen_params():
    w = torch.nn.Parameter(torch.randn(10, 12))
    empty = torch.nn.Parameter(torch.zeros(0, 5))
    frozen = torch.nn.Parameter(torch.randn(4))
    opt = Adapprox([w, empty, frozen], k_max=3, exact_small_matrices=False, weight_decay=0.0, seed=0)
    w.grad, empty.grad = torch.zeros_like(w), torch.zeros_like(empty)
    before = w.detach().clone()
    opt.step()
    assert torch.equal(w, before)  # a zero gradient moves nothing
    assert opt.state[w]["xi"] == 0.0 and torch.isfinite(opt.state[w]["Q"]).all()
    assert not opt.state[empty] and not opt.state[frozen]


def test_nonfinite_raise_names_param_and_changes_nothing():
    model = make_model()
    opt = Adapprox(model.named_parameters(), k_max=4, seed=0)
    model(torch.randn(4, 30)).square().mean().backward()
    model[2].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"2\.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state


def test_nonfinite_check_covers_all_groups_at_once(monkeypatch):
    """One check (one host sync on a GPU) for all groups; a NaN in the last group raises before
    the first group moves; each group keeps its own policy."""
    a, b, c = (torch.nn.Parameter(torch.randn(16, 20)) for _ in range(3))
    opt = Adapprox([{"params": [a]}, {"params": [b]}, {"params": [c], "nonfinite": "skip"}], k_max=4, seed=0)
    calls = []
    max_norms = optim_base._max_norms
    monkeypatch.setattr(optim_base, "_max_norms", lambda grads: calls.append(len(grads)) or max_norms(grads))
    for p in (a, b, c):
        p.grad = torch.randn(16, 20)
    c.grad[3, 4] = float("inf")
    opt.step()
    assert calls == [3]
    assert opt.state[c]["nonfinite_skips"] == 1 and opt.state[a]["step"] == opt.state[b]["step"] == 1
    before = [p.detach().clone() for p in (a, b, c)]
    b.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"param_groups\[1\]"):
        opt.step()
    assert all(torch.equal(x, p) for x, p in zip(before, (a, b, c)))
    assert opt.state[a]["step"] == 1


def test_nonfinite_check_with_mixed_gradient_dtypes():
    """fp32, bf16 and fp16 gradients checked together (their norms differ in dtype)."""
    params = [
        torch.nn.Parameter(torch.randn(6, dtype=dtype)) for dtype in (torch.float32, torch.bfloat16, torch.float16)
    ]
    opt = Adapprox(params, nonfinite="skip", seed=0)
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[2] = float("nan")
    opt.step()
    assert [opt.state[p]["nonfinite_skips"] for p in params] == [0, 1, 0]


def test_a_gradient_entry_at_the_limit_steps_and_one_above_is_flagged():
    """The limit is the largest entry the update takes: fp64's √max is itself a float64 number
    (its square fits), and an entry of exactly that steps; the next float64 above it is flagged."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = Adapprox([p], nonfinite="skip", seed=0)
    limit = math.sqrt(torch.finfo(torch.float64).max)
    for entry, skips in ((limit, 0), (math.nextafter(limit, math.inf), 1)):
        p.grad = torch.ones_like(p)
        p.grad[1] = entry
        opt.step()
        assert opt.state[p]["nonfinite_skips"] == skips and opt.state[p]["step"] == 1


def test_large_finite_fp16_gradient_is_not_flagged():
    w = torch.nn.Parameter(torch.zeros(8, 10, dtype=torch.float16))
    opt = Adapprox([w], k_max=2, seed=0)
    w.grad = torch.full((8, 10), 60000.0, dtype=torch.float16)  # its 2-norm overflows fp16
    opt.step()
    assert opt.state[w]["nonfinite_skips"] == 0 and torch.isfinite(w).all()


def test_nonfinite_skip_counts_and_keeps_state():
    a, b = torch.nn.Parameter(torch.randn(16, 20)), torch.nn.Parameter(torch.randn(16, 20))
    opt = Adapprox([a, b], k_max=4, nonfinite="skip", seed=0)
    a.grad, b.grad = torch.randn(16, 20), torch.randn(16, 20)
    opt.step()
    q_before, a_before, b_before = opt.state[a]["Q"].clone(), a.detach().clone(), b.detach().clone()
    a.grad, b.grad = torch.full((16, 20), float("inf")), torch.randn(16, 20)
    opt.step()
    assert torch.equal(a, a_before) and torch.equal(opt.state[a]["Q"], q_before)
    assert opt.state[a]["nonfinite_skips"] == 1 and opt.state[a]["step"] == 1
    assert not torch.equal(b, b_before) and opt.state[b]["step"] == 2
    a.grad, b.grad = torch.full((16, 20), float("nan")), torch.randn(16, 20)
    opt.step()
    assert opt.state[a]["nonfinite_skips"] == 2 and opt.state[a]["step"] == 1  # a count, not a flag


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=2)), (AdaMeM, dict(rank=2))])
def test_a_skip_counts_on_a_state_set_without_a_count(cls, kw):
    """A state set directly (``opt.state[p] = …``, made or converted by hand; the load check
    does not ask for the count) without ``nonfinite_skips``: a skip raised KeyError after the
    earlier groups were updated, their factors not stored and their step counts moved."""
    a, b = torch.nn.Parameter(torch.randn(9, 11)), torch.nn.Parameter(torch.randn(9, 11))
    opt = cls([{"params": [a]}, {"params": [b]}], nonfinite="skip", seed=0, **kw)
    a.grad, b.grad = torch.randn(9, 11), torch.randn(9, 11)
    opt.step()
    opt.state[b] = {k: v for k, v in opt.state[b].items() if k != "nonfinite_skips"}
    a.grad, b.grad = torch.randn(9, 11), torch.full((9, 11), float("nan"))
    opt.step()
    assert opt.state[b]["nonfinite_skips"] == 1 and opt.state[b]["step"] == 1 and opt.state[a]["step"] == 2


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=4)), (AdaMeM, dict(rank=2))])
def test_grad_scaler_skips_overflowed_steps_and_unscales_the_rest(cls, kw):
    """Loss scaling with ``torch.amp.GradScaler``: a step whose scaled gradients overflowed is
    skipped by the scaler, which halves the scale (the optimizer never sees the inf, so its
    default ``nonfinite="raise"`` stays quiet); every other step equals the optimizer's step on
    the unscaled gradients bit for bit (a power-of-two scale unscales exactly). The scaler's
    skip is its own (``opt.step()`` is not called): what is checked is that the scaled steps
    around it unscale exactly and that the optimizer needs nothing else from the scaler."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(12, 10), (10, 12), (10,)]
    steps = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    overflow = 1
    runs = []
    for scaled in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = cls(params, seed=0, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
        scaler.scale(torch.ones(()))  # what scaler.scale(loss) does first: the scale tensor
        scales = []
        for i, grads in enumerate(steps):
            if not scaled:
                if i != overflow:
                    for p, g in zip(params, grads):
                        p.grad = g.clone()
                    opt.step()
                continue
            scale = scaler.get_scale()
            for p, g in zip(params, grads):
                p.grad = g * scale  # what backward of the scaled loss gives
            if i == overflow:
                params[0].grad[3, 4] = float("inf")
            scaler.step(opt)
            scaler.update()
            scales.append(scale)
        runs.append(params)
    assert scales == [2.0**12, 2.0**12, 2.0**11, 2.0**11]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=4)), (AdaMeM, dict(rank=2))])
def test_grad_scaler_hands_the_step_its_scale_and_reads_its_flag_only_on_overflow(cls, kw, monkeypatch):
    """With ``opt.unscale_in_step = True`` the scaler steps the optimizer with ``grad_scale``
    and ``found_inf`` set (``_step_supports_amp_scaling``): the step unscales, and reads the flag (``.item()``, a host
    sync on a GPU; the scaler's own path reads it before every step) only on the overflowed
    step, which it skips whole, nothing changed, though ``nonfinite="raise"``. After
    ``scaler.unscale_(opt)`` (to clip) it does not unscale again. Every step equals a plain step
    on the unscaled (clipped) gradients, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(12, 10), (10,)]
    steps = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    items = []
    item = torch.Tensor.item
    runs = []
    for scaled in (False, True):
        params = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
        opt = cls(params, seed=0, **kw)
        opt.unscale_in_step = True
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        scaler.scale(torch.ones(()))
        for i, grads in enumerate(steps):
            scale = scaler.get_scale() if scaled else 1.0
            for p, g in zip(params, grads):
                p.grad = g * scale
            if i == 1:  # overflowed
                if not scaled:
                    continue
                params[0].grad[0, 0] = float("inf")
            if i == 2:  # clipped, the scaler's way: unscale first
                if scaled:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, 0.5)
            if not scaled:
                opt.step()
                continue
            monkeypatch.setattr(torch.Tensor, "item", lambda t: items.append(i) or item(t))
            scaler.step(opt)
            monkeypatch.setattr(torch.Tensor, "item", item)
            scaler.update()
        runs.append((params, opt))
    assert items == [1]
    (plain, plain_opt), (params, opt) = runs
    assert all(torch.equal(a, b) for a, b in zip(plain, params))
    assert [s["step"] for s in opt.state.values()] == [s["step"] for s in plain_opt.state.values()] == [2, 2]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(lr=1e39), "learning rate"),  # finite, but not in float32, as the step multiplies
        (dict(betas=(0.9, 0.999)), "betas"),
        (dict(betas=(1.0, 0.999, 0.9)), "index 0"),
        (dict(betas=(0.9, -0.1, 0.9)), "index 1"),
        (dict(eps=-1e-8), "epsilon"),
        (dict(eps=0.0), "epsilon"),
        (dict(eps=float("inf")), "epsilon"),
        (dict(clip_threshold=0.0), "clip_threshold"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(k_min=0), "k_min"),
        (dict(k_max=2, k_min=3), "k_max"),
        (dict(k_init=300), "k_init"),
        (dict(oversample=-1), "oversample"),
        (dict(power_iters=0), "power_iters"),
        (dict(xi_thresh=-1.0), "xi_thresh"),
        (dict(rank_policy="linear"), "rank_policy"),
        (dict(rank_interval=0), "rank_interval"),
        (dict(cosine_max_scale=0.5), "cosine_max_scale"),
        (dict(nonfinite="ignore"), "nonfinite"),
        (dict(backend="cuda"), "backend"),
        (dict(warm_power_iters=0), "warm_power_iters"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), "a tensor of 2 elements"),  # torch.optim takes one element
        (dict(lr=torch.tensor(1)), "floating dtype"),
        (dict(lr=torch.tensor(float("nan"))), "learning rate: nan"),
        (dict(clip_threshold=float("nan")), "clip_threshold"),
        (dict(xi_thresh=float("nan")), "xi_thresh"),
        (dict(cosine_max_scale=float("inf")), "cosine_max_scale"),
        (dict(betas=(float("nan"), 0.999, 0.9)), "index 0"),
        (dict(betas=0.9), "betas"),
        (dict(k_max=True), "k_max"),
        (dict(k_max=8.0), "k_max"),
        (dict(rank_interval=True), "rank_interval"),
        (dict(sigmoid=(8.0, float("nan"), 0.5, 0.0)), "sigmoid"),
        (dict(sigmoid=(-1.0, 10.0, 0.5, 0.0)), "sigmoid"),
        (dict(sigmoid=(8.0, 0.0, 0.5, 0.0)), "sigmoid"),  # ω > 0: f grows with ξ
        (dict(warm_start="yes"), "warm_start"),
        (dict(cosine_guidance="no"), "cosine_guidance"),  # "no" is truthy: it would turn it on
        (dict(exact_small_matrices=0), "exact_small_matrices"),
        (dict(product_precision="fp16"), "product_precision"),
        (dict(seed="abc"), "seed"),
        (dict(seed=2**64), "seed"),  # torch.Generator's range: it used to fail at the first step
        (dict(eps=1e-46), "epsilon"),  # 0 in float32: a 0/0 where G and V are 0
        (dict(clip_threshold=1e-46), "clip_threshold"),  # likewise, on a zero gradient
        (dict(cosine_max_scale=1e39), "cosine_max_scale"),  # inf in float32: infinite weights
        # Past int32 (or, for the S-RSI loops, past 1000): power_iters=10**30 hung the first step.
        (dict(k_min=2**31, k_max=2**31), r"k_min: 2147483648 \(need an int in \[1, 2147483647\]\)"),
        (dict(k_max=2**63), r"k_max: 9223372036854775808 \(need an int in \[k_min, 2147483647\]"),
        (dict(oversample=10**30), r"oversample: 10{30} \(need an int in \[0, 2147483647\]\)"),
        (dict(power_iters=10**30), r"power_iters: 10{30} \(need an int in \[1, 1000\]\)"),
        (dict(warm_power_iters=1001), r"warm_power_iters: 1001 \(need an int in \[1, 1000\]\)"),
        (dict(rank_interval=2**31), "rank_interval"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adapprox([torch.nn.Parameter(torch.randn(3, 3))], **kwargs)


@pytest.mark.parametrize(
    "override,match",
    [({"lr": -1.0}, "learning rate"), ({"k_max": 2, "k_min": 3}, "k_max"), ({"power_iters": 2**31}, "power_iters")],
)
def test_bad_param_group_values_are_refused(override, match):
    """torch.optim checks no param group; ours are checked with the defaults they take, in the
    constructor and in add_param_group, and the error names the group."""
    a, b = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(6, 5))
    with pytest.raises(ValueError, match=rf"param_groups\[1\]: .*{match}"):
        Adapprox([{"params": [a]}, {"params": [b], **override}])
    opt = Adapprox([a], k_max=4)
    with pytest.raises(ValueError, match=rf"param_groups\[1\]: .*{match}"):
        opt.add_param_group({"params": [b], **override})
    assert len(opt.param_groups) == 1  # nothing added
    opt.add_param_group({"params": [b], "lr": 1e-2, "k_max": 2})  # good values pass
    assert opt.param_groups[1]["k_max"] == 2 and opt.param_groups[1]["betas"] == (0.9, 0.999, 0.9)


@pytest.mark.parametrize("cls", [Adapprox, AdaMeM])
def test_a_group_key_that_is_no_option(cls):
    """A seed in a group was kept and ignored (the sketch RNG is the optimizer's): refused, but
    for the optimizer's own or None (ZeroRedundancyOptimizer copies it into its groups). A near
    miss of an option's name kept its default silently: it warns, naming the option. Other keys
    of the user's (a name for logging, a scheduler's initial_lr) pass without a word."""
    a, b = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(6, 5))
    for seed in (0, None):
        with pytest.raises(ValueError, match=rf"param_groups\[1\]: seed 5 is not {cls.__name__}'s \(seed={seed}\)"):
            cls([{"params": [a]}, {"params": [b], "seed": 5}], seed=seed)
    opt = cls([{"params": [a], "seed": None}, {"params": [b], "seed": 0}], seed=0)
    # Written in mid-run, it was ignored: refused by the step, before anything moves.
    b.grad, kept = torch.randn(6, 5), b.detach().clone()
    opt.param_groups[0]["seed"] = 7
    refused = rf"step: param_groups\[0\]: seed 7 is not {cls.__name__}'s .*nothing was updated"
    with pytest.raises(ValueError, match=refused):
        opt.step()
    assert torch.equal(b, kept) and not opt.state
    opt.param_groups[0]["seed"] = 0
    opt.step()
    assert not torch.equal(b, kept)
    near_miss = r"param_groups\[1\]: 'weight_deacy' is not an option .*'weight_decay'"
    with pytest.warns(UserWarning, match=near_miss) as caught:
        opt = cls([{"params": [a]}, {"params": [b], "weight_deacy": 0.0, "name": "b", "initial_lr": 1e-3}])
    assert len(caught) == 1 and caught[0].filename == __file__  # the user's line
    assert opt.param_groups[1]["weight_deacy"] == 0.0 and opt.param_groups[1]["name"] == "b"  # kept, as in torch.optim
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "name": "c", "weight_decay": 0.0})


@pytest.mark.parametrize(
    "cls,kw",
    [
        (Adapprox, dict(k_min=2**31 - 1, k_max=2**31 - 1, oversample=2**31 - 1, rank_interval=2**31 - 1,
                        power_iters=1000, exact_small_matrices=False)),
        (Adapprox, dict(k_max=2**31 - 1, warm_start=True, warm_power_iters=1000, rank_policy="sigmoid",
                        exact_small_matrices=False)),
        (AdaMeM, dict(rank=2**31 - 1, update_proj_gap=2**31 - 1, oversample=2**31 - 1, power_iters=1000)),
    ],
)  # fmt: skip
def test_int_options_at_their_largest_values_step(cls, kw):
    """The upper bounds refuse nothing that steps: ranks and sketch widths clip to min(m, n),
    and 1000 S-RSI iterations finish; through a checkpoint too."""
    w, b = torch.nn.Parameter(torch.randn(24, 40)), torch.nn.Parameter(torch.randn(40))
    opt = cls([w, b], seed=0, **kw)
    for _ in range(2):
        w.grad, b.grad = torch.randn(24, 40), torch.randn(40)
        opt.step()
    cls([w, b], **kw).load_state_dict(opt.state_dict())
    assert torch.isfinite(w).all() and all(s["step"] == 2 for s in opt.state.values())


@pytest.mark.parametrize(
    "cls,kw,bad,match",
    [
        (Adapprox, dict(k_max=4), {"lr": float("nan")}, "learning rate"),
        (Adapprox, dict(k_max=4), {"nonfinite": "ignore"}, "nonfinite"),
        (Adapprox, dict(k_max=4), {"betas": (0.9, 1.5, 0.9)}, "index 1"),
        (AdaMeM, dict(rank=2), {"projection": "SVD"}, "projection"),
        (AdaMeM, dict(rank=2), {"update_proj_gap": 0}, "update_proj_gap"),
        # Only lr may be a tensor (a scheduler fills one in place): another option written as a
        # tensor trained on (NaN weights here), and its checkpoint refused to load.
        (Adapprox, dict(k_max=4), {"weight_decay": torch.tensor(float("nan"))}, "weight_decay"),
        (AdaMeM, dict(rank=2), {"weight_decay": torch.tensor(0.01)}, "weight_decay"),
        # Equal to the checked value but of another type (4.0 == 4, 1 == True): compared by
        # value only, they went unchecked, and the run's checkpoints then refused to load.
        (Adapprox, dict(k_max=4), {"k_max": 4.0}, "k_max"),
        (AdaMeM, dict(rank=2), {"rank": 2.0}, "rank"),
        (Adapprox, dict(k_max=4, cosine_guidance=True), {"cosine_guidance": 1}, "cosine_guidance"),
        (Adapprox, dict(k_max=4), {"k_max": 2**31}, "k_max"),  # past int32, as the constructor refuses it
        (AdaMeM, dict(rank=2), {"power_iters": 1001}, "power_iters"),
    ],
)
def test_a_bad_value_written_into_param_groups_mid_run_is_refused_before_the_step(cls, kw, bad, match):
    """Written into ``param_groups`` after construction (as a scheduler or a user's code does),
    a bad value is refused by the next step, naming the group, with nothing changed (it used to
    train on: a NaN lr wrote NaN weights, ``"SVD"`` ran S-RSI, ``update_proj_gap=0`` raised a
    ZeroDivisionError after the step counts had moved, and only loading the checkpoint said
    why); good values written the same way (a scheduler's lr, a NumPy number) pass."""
    a, b = torch.nn.Parameter(torch.randn(6, 10)), torch.nn.Parameter(torch.randn(10))
    opt = cls([{"params": [b]}, {"params": [a]}], seed=0, **kw)
    a.grad, b.grad = torch.randn(6, 10), torch.randn(10)
    opt.step()
    opt.param_groups[1]["lr"] = np.float32(2e-3)  # good: a LambdaLR may write one
    opt.step()
    before = copy.deepcopy(opt.state_dict()), a.detach().clone(), b.detach().clone()
    opt.param_groups[1].update(bad)
    with pytest.raises(ValueError, match=rf"param_groups\[1\] was changed to a bad value: .*{match}"):
        opt.step()
    assert torch.equal(a, before[1]) and torch.equal(b, before[2])
    assert [s["step"] for s in opt.state.values()] == [s["step"] for s in before[0]["state"].values()]


@pytest.mark.parametrize(
    "cls,kw,key",
    [
        # None is a valid value of these: the check read a deleted key as None and passed it,
        # and the step raised KeyError from inside, after the step counts had moved.
        (Adapprox, dict(k_max=4, backend="reference"), "clip_threshold"),
        (Adapprox, dict(k_max=4, backend="reference"), "k_init"),
        (Adapprox, dict(k_max=4, backend="reference"), "product_precision"),
        (AdaMeM, dict(rank=2), "clip_threshold"),
        (Adapprox, dict(k_max=4), "lr"),  # was "changed to a bad value: Invalid learning rate: None"
    ],
)
def test_an_option_deleted_from_a_group_is_refused_before_the_step(cls, kw, key):
    """``del group[key]`` between steps: the next step says which option the group lacks and
    changes nothing; set back, the run goes on as if it had never been deleted."""

    def run(delete):
        a = torch.nn.Parameter(torch.randn(6, 10, generator=torch.Generator().manual_seed(0)))
        b = torch.nn.Parameter(torch.ones(10))
        opt = cls([{"params": [b]}, {"params": [a]}], seed=0, **kw)
        for t in range(3):
            gen = torch.Generator().manual_seed(t)
            a.grad, b.grad = torch.randn(6, 10, generator=gen), torch.randn(10, generator=gen)
            if delete and t == 2:
                value = opt.param_groups[1].pop(key)
                with pytest.raises(ValueError, match=rf"param_groups\[1\] has no '{key}'"):
                    opt.step()
                assert [s["step"] for s in opt.state.values()] == [2, 2]
                opt.param_groups[1][key] = value
            opt.step()
        return [a, b, *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]

    for x, y in zip(run(True), run(False), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=4)), (AdaMeM, dict(rank=2))])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-3])
def test_an_lr_tensor_filled_with_a_bad_value_in_place_is_refused(cls, kw, bad):
    """A scheduler fills an lr tensor in place, so its identity never changes and the check of
    changed values never saw a NaN, inf or negative value it wrote: the step trained on it (NaN
    weights). The step reads the value anyway, and now checks it every step, with nothing
    changed where it is bad."""
    a, b = torch.nn.Parameter(torch.randn(6, 10)), torch.nn.Parameter(torch.randn(10))
    opt = cls([{"params": [b]}, {"params": [a]}], seed=0, **kw)
    lr = torch.tensor(1e-3)
    opt.param_groups[1]["lr"] = lr
    for value in (1e-3, 2e-3):  # good values filled in place pass
        lr.fill_(value)
        a.grad, b.grad = torch.randn(6, 10), torch.randn(10)
        opt.step()
    before = copy.deepcopy(opt.state_dict()), a.detach().clone(), b.detach().clone()
    lr.fill_(bad)
    with pytest.raises(ValueError, match=r"param_groups\[1\] was changed to a bad value: Invalid learning rate"):
        opt.step()
    assert torch.equal(a, before[1]) and torch.equal(b, before[2])
    assert [s["step"] for s in opt.state.values()] == [s["step"] for s in before[0]["state"].values()]
    opt.param_groups[1]["lr"] = torch.tensor([1e-3, 1e-3])  # written in: one element or none
    with pytest.raises(ValueError, match="a tensor of 2 elements"):
        opt.step()


@pytest.mark.parametrize("given", ["constructor", "group"])
@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=2)), (AdaMeM, dict(rank=2))])
def test_an_lr_tensor_is_read_once_a_step(cls, kw, given, monkeypatch):
    """Reading a CUDA lr tensor syncs with the device. The step read it once to check it and
    again for every bucket's update (three here: two matrix shapes and a vector); now once a
    step, with the same numbers (the Triton backend and CUDA graphs: test_triton_optimizer).
    The constructor takes a tensor lr as torch.optim does (it refused one), and the step
    reads it once too (not again for the defaults' check on the first step)."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((6, 10), (5, 7), (10,))]
    grads = [torch.randn(p.shape) for p in params]
    reads, real = [], torch.Tensor.__float__

    def trained(lr):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = cls(ps, lr=lr if given == "constructor" else 1e-2, weight_decay=0.1, seed=0, **kw)
        opt.param_groups[0]["lr"] = lr  # as a scheduler's
        reads.clear()
        for _ in range(2):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        return ps

    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(t) or real(t))
    got = trained(torch.tensor(1e-2))
    assert len(reads) == 2  # one a step
    for a, b in zip(got, trained(1e-2)):
        assert torch.equal(a, b)


def test_list_valued_options_are_stored_as_tuples_so_no_edit_escapes_the_check():
    """A list was stored as given, and an in-place edit (``group["betas"][1] = nan``) compared
    equal to the list the step had checked: it trained to NaN weights. Lists from a group, and
    lists written in mid-run, are stored as tuples, which cannot be edited in place."""
    a, b = torch.nn.Parameter(torch.randn(6, 10)), torch.nn.Parameter(torch.randn(6, 10))
    opt = Adapprox([{"params": [a], "betas": [0.9, 0.999, 0.9], "sigmoid": [8.0, 10.0, 0.5, 0.0]}], k_max=4)
    opt.add_param_group({"params": [b], "betas": [0.0, 0.999, 0.9], "tags": ["decoder"]})
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.999, 0.9), (0.0, 0.999, 0.9)]
    assert opt.param_groups[1]["tags"] == ["decoder"]  # a key of the user's own keeps its list
    assert opt.param_groups[0]["sigmoid"] == (8.0, 10.0, 0.5, 0.0)
    a.grad = b.grad = torch.randn(6, 10)
    opt.param_groups[1]["betas"] = [0.5, 0.99, 0.9]  # written in as a list: checked, then a tuple
    opt.step()
    assert opt.param_groups[1]["betas"] == (0.5, 0.99, 0.9)
    opt.step()  # unchanged since: not re-checked, still a tuple
    assert opt.param_groups[1]["betas"] == (0.5, 0.99, 0.9)


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=4, backend="reference")), (AdaMeM, dict(rank=2))])
def test_a_step_inside_autocast_takes_the_same_bits(cls, kw):
    """A training step written wholly inside ``torch.autocast`` (forward, backward and
    ``opt.step()``): the step's matmuls ran in bf16 (AdaMeM's weights moved by 1e-2 in 3
    steps, Adapprox's by 3e-5); the step switches autocast off for itself, and a closure
    still runs under the caller's."""
    runs = []
    for autocast in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(40, 30), (30,)]]
        opt = cls(params, seed=0, **kw)
        dtypes = []

        def closure():
            dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            return 0.0

        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                opt.step(closure)
        assert dtypes == [torch.bfloat16 if autocast else None] * 3
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_integer_params_and_sparse_grads_are_refused():
    w = torch.nn.Parameter(torch.randn(4, 4))
    w.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(w\)"):
        Adapprox([("w", w)]).step()
    counts = torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    counts.grad = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"floating-point .*; param_groups\[0\]\['params'\]\[1\] is torch.int64"):
        Adapprox([torch.nn.Parameter(torch.randn(2)), counts]).step()
    for cls in (Adapprox, AdaMeM):  # torch's AdamW steps complex ones as real pairs: we refuse them
        z, v = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.complex64)), torch.nn.Parameter(torch.randn(5))
        z.grad, v.grad = torch.randn_like(z), torch.randn_like(v)
        before, opt = v.detach().clone(), cls([v, z])
        with pytest.raises(TypeError, match=r"floating-point .*\['params'\]\[1\] is torch.complex64"):
            opt.step()
        assert torch.equal(v, before) and not opt.state


def test_numpy_numbers_are_taken_as_the_python_numbers_they_hold():
    """AdamW takes ``lr=np.float32(1e-3)`` and so do we: NumPy scalars, in the constructor and
    in a param group (``betas`` too), are stored as Python numbers and step as them."""
    import numpy as np

    def run(**kw):
        w = torch.nn.Parameter(torch.ones(12, 10))
        opt = Adapprox([w], seed=0, **kw)
        opt.add_param_group({"params": [b := torch.nn.Parameter(torch.ones(10))], "weight_decay": kw["lr"] * 0})
        w.grad, b.grad = torch.full_like(w, 0.5), torch.full_like(b, 0.5)
        opt.step()
        return w, opt

    w_np, opt = run(lr=np.float32(1e-3), betas=(np.float64(0.9), np.float32(0.999), 0.9), k_max=np.int64(4))
    group, added = opt.param_groups
    assert type(group["lr"]) is float and type(group["k_max"]) is int and type(added["weight_decay"]) is float
    assert all(type(b) is float for b in group["betas"])
    w_py, _ = run(lr=float(np.float32(1e-3)), betas=(0.9, float(np.float32(0.999)), 0.9), k_max=4)
    assert torch.equal(w_np, w_py)


@pytest.mark.parametrize("cls", [Adapprox, AdaMeM])
def test_a_checkpoint_holding_numpy_numbers_loads_as_the_python_ones(cls):
    """A hand-edited checkpoint's options may be NumPy numbers, which the constructor and the
    step take: its load took only the lr so ("Invalid epsilon value: np.float32(...)")."""
    import numpy as np

    runs = []
    for number in (np.float32, float):
        w = torch.nn.Parameter(torch.ones(12, 10))
        opt = cls([w], seed=0)
        saved = opt.state_dict()
        group = saved["param_groups"][0]
        group.update(eps=number(1e-6), weight_decay=number(0.25), betas=tuple(map(number, group["betas"])))
        opt.load_state_dict(saved)
        w.grad = torch.full_like(w, 0.5)
        opt.step()
        runs.append(w)
    assert torch.equal(*runs)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("lr", -2e-4, r"learning rate: -0.0002"),
        ("power_iters", 10**30, r"power_iters: 10{30} \(need an int in \[1, 1000\]"),
    ],
)
def test_a_checkpoint_with_a_bad_written_value_says_so(key, value, match):
    """A value written into param_groups after construction (a LambdaLR stepped past its end
    gives a negative lr) is checked only on load; the error says where such a value may come
    from, not only that the checkpoint may be another optimizer's. (A power_iters of 10**30
    loaded, and the next step hung.)"""
    w = torch.nn.Parameter(torch.randn(6, 5))
    opt = Adapprox([w], k_max=2)
    saved = opt.state_dict()
    saved["param_groups"][0][key] = value
    with pytest.raises(ValueError, match=rf"Invalid {match}.*written into param_groups"):
        Adapprox([w], k_max=2).load_state_dict(saved)


def test_closure_and_param_names_in_report():
    model = make_model()
    opt = Adapprox(model.named_parameters(), k_max=4, seed=0)
    x = torch.randn(4, 30)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    names = [r.name for r in opt.state_report().rows]
    assert names[0] == "0.weight" and "3.bias" in names
    assert "Adapprox" in repr(opt) and "k_max: 4" in repr(opt)


def test_cosine_guidance_bounded_and_changes_the_step():
    from adapprox_kernels.reference import cosine_guidance_factor

    x = torch.randn(2, 5, 6)
    assert cosine_guidance_factor(x, x, 2.0).flatten().tolist() == pytest.approx([2.0, 2.0])
    assert cosine_guidance_factor(x, -x, 2.0).flatten().tolist() == pytest.approx([0.5, 0.5])
    grads = [torch.randn(20, 30) for _ in range(3)]
    w_plain, _ = run(dict(k_max=4, seed=0), torch.zeros(20, 30), grads)
    w_cos, _ = run(dict(k_max=4, seed=0, cosine_guidance=True), torch.zeros(20, 30), grads)
    assert not torch.equal(w_plain, w_cos)


@pytest.mark.parametrize("exact_small", [False, True])
def test_cosine_guidance_at_full_rank_matches_the_dense_formula(exact_small):
    """The cosine of this step's update with the running average scales the step, per matrix
    (a factor computed from the update with itself, a constant, passed every other test)."""
    w0, grads = torch.randn(12, 20), [torch.randn(12, 20) * (1 + i) for i in range(5)]
    kw = dict(lr=1e-2, betas=(0.9, 0.99, 0.9), eps=1e-8, clip_threshold=1.0, weight_decay=0.1)
    options = dict(kw, k_max=64, exact_small_matrices=exact_small, cosine_guidance=True, cosine_max_scale=3.0)
    w, _ = run(dict(options, seed=0), w0, grads, dtype=torch.float64)
    want = dense_adapprox(w0, grads, kw["lr"], kw["betas"], kw["eps"], 1.0, kw["weight_decay"], cosine_max_scale=3.0)
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-8)


def test_ranks_round_half_up_and_start_within_the_matrix():
    """Round half up (Python's round() takes 2.5 to 2), and k_init = 64 on a 12×20 matrix
    starts the rank moment from 12: after a step whose ξ shrinks it, 0.9·12 + 0.1·11 (from 64,
    0.9·64 + 0.1·11 would be clamped back to 12)."""
    from adapprox_kernels.adapprox import _round_rank

    assert [_round_rank(k) for k in (2.5, 4.5, 2.49)] == [3, 5, 2]
    w0, g = torch.zeros(12, 20), torch.randn(12, 1) @ torch.randn(1, 20)  # rank 1: ξ ≈ 0
    w, opt = run(dict(k_max=64, exact_small_matrices=False, seed=0), w0, [g])
    assert opt.state[w]["xi"] < 1e-3
    assert opt.state[w]["rank"] == pytest.approx(0.9 * 12 + 0.1 * 11)


def test_matrices_of_one_bucket_at_one_rank_grow_or_shrink_by_their_own_xi():
    """The step policy's new rank is computed once per (rank, used columns, ξ > threshold) of a
    bucket: two same-shaped matrices at rank 3, one gradient of rank 1 (ξ ≈ 0) and one of full
    rank (ξ ≫ threshold), shrink and grow (β3 = 0), not both as the first."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(20, 1, generator=gen) @ torch.randn(1, 24, generator=gen), torch.randn(20, 24, generator=gen)]
    params = [torch.nn.Parameter(torch.zeros(20, 24)) for _ in grads]
    opt = Adapprox(
        params, lr=0.0, k_init=3, k_min=1, k_max=6, betas=(0.0, 0.999, 0.0), exact_small_matrices=False, seed=0
    )
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert [opt.state[p]["rank"] for p in params] == [2, 4]


def test_state_report_counts_each_tensors_own_bytes():
    """A bf16 weight: fp32 factors, a bf16 first moment, and AdamW's two bf16 moments (a count
    of 4 bytes an entry passed every fp32 test)."""
    w = torch.nn.Parameter(torch.randn(70, 90, dtype=torch.bfloat16))
    opt = Adapprox([w], k_max=6, seed=0)
    w.grad = torch.randn(70, 90, dtype=torch.bfloat16)
    opt.step()
    k = opt.state[w]["Q"].shape[1]
    (row,) = opt.state_report().rows
    assert row.state_bytes == 4 * k * (70 + 90) + 2 * 70 * 90
    assert row.adamw_bytes == 2 * 2 * 70 * 90


def test_warm_start_keeps_error_close_to_cold(monkeypatch):
    """Warm starts (from step 2, with one power iteration) keep ξ within 20% of the cold l = 5."""
    import adapprox_kernels.adapprox as mod

    iters, real = [], mod.subspace_iteration
    monkeypatch.setattr(mod, "subspace_iteration", lambda op, x, n, orth: iters.append(n) or real(op, x, n, orth))
    torch.manual_seed(0)
    base = torch.rand(64, 1) @ torch.rand(1, 96)
    grads = [base + 0.05 * torch.randn(64, 96) for _ in range(15)]
    _, cold = run(dict(k_init=6, k_max=6, k_min=6, seed=0), torch.zeros(64, 96), grads)
    _, warm = run(
        dict(k_init=6, k_max=6, k_min=6, seed=0, warm_start=True, warm_power_iters=1), torch.zeros(64, 96), grads
    )
    assert iters == [5] * 15 + [5] + [1] * 14  # the warm run really was warm (the first step is cold)
    xi_cold = next(iter(cold.state.values()))["xi"]
    xi_warm = next(iter(warm.state.values()))["xi"]
    assert math.isfinite(xi_warm) and xi_warm <= 1.2 * xi_cold + 1e-6


def _xi_over_optimum(opt: Adapprox, p: torch.nn.Parameter, g: torch.Tensor, steps: int) -> tuple[list, list]:
    """Steps ``opt`` (β1 = 0, β2 = 0.999, one matrix ``p``) on ``g`` every step; each step's ξ
    over the best rank-k error of its own V_t (SVD in float64), and the ranks after each step."""
    ratios, ranks = [], []
    for _ in range(steps):
        st = opt.state[p]
        v = 0.001 * g.double() ** 2
        if "Q" in st:
            v += 0.999 * (st["Q"].double() @ st["U"].double().T).clamp_min(0)
        k = min(round(st["rank"]), *g.shape) if "rank" in st else 1
        p.grad = g.clone()
        opt.step()
        s2 = torch.linalg.svdvals(v).square()
        ratios.append(opt.state[p]["xi"] / math.sqrt(s2[k:].sum() / s2.sum()))
        ranks.append(opt.state[p]["rank"])
    return ratios, ranks


def test_warm_start_without_oversampling_grows_the_rank_from_iterated_columns(monkeypatch):
    """With ``oversample=0`` a warm sketch (last step's U) had no Gaussian column, so a rank that
    grew took its new column straight from the Gaussian with the warm start's one iteration,
    measured and kept: ξ 3.9× the optimum on that step (a tiny GPT's gradients: up to 21×, and
    3× as many steps above 1.5×). The warm sketch keeps one Gaussian column, as ``oversample=1``,
    so the growing rank stays warm: a sketch of k columns made every step a cold one (the
    rank outgrew last step's factors), ξ as good at 5× the passes over G."""
    import adapprox_kernels.adapprox as mod

    iters, real = [], mod.subspace_iteration
    monkeypatch.setattr(mod, "subspace_iteration", lambda op, x, n, orth: iters.append(n) or real(op, x, n, orth))
    gen = torch.Generator().manual_seed(0)
    m, n = 40, 30
    a, b, c, d = (torch.randn(k, 1, generator=gen) for k in (m, n, m, n))
    g = a @ b.T + 0.5 * c @ d.T + 0.05 * torch.randn(m, n, generator=gen)
    p = torch.nn.Parameter(torch.zeros(m, n))
    opt = Adapprox([p], lr=0.0, weight_decay=0.0, k_init=1, k_min=1, k_max=6, oversample=0, betas=(0.0, 0.999, 0.0),
                   xi_thresh=1e-6, exact_small_matrices=False, warm_start=True, seed=0)  # fmt: skip
    ratios, _ = _xi_over_optimum(opt, p, g, steps=8)
    assert opt.state[p]["rank"] == 6  # the rank grew every step
    assert max(ratios) < 1.2, ratios
    assert iters == [5] + [1] * 7


@pytest.mark.parametrize("r, eta, oversample, ranks", [(2, 2.0, 0, [3, 5, 7]), (4, 9.0, 5, [10, 15, 20])])
def test_warm_start_measures_a_rank_grown_past_the_sketch_after_full_iterations(r, eta, oversample, ranks):
    """The sigmoid policy grows the rank by up to η at a check, past last step's sketch width
    (``k + max(p, 1)`` warm): the growth completes a step later with columns straight from the
    Gaussian. With the warm start's one iteration they were measured (``rank_interval=1``) and
    kept raw: ξ 14.9× (r=2, p=0) and 4.2× (r=4, p=5) the optimum on that step, and the second
    case's rank pushed to 16 for good where cold ``l = 5`` settles at 15. Such a step runs
    ``power_iters``."""
    gen = torch.Generator().manual_seed(0)
    m, n = 40, 30
    g = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen) + 0.02 * torch.randn(m, n, generator=gen)
    p = torch.nn.Parameter(torch.zeros(m, n))
    opt = Adapprox([p], lr=0.0, weight_decay=0.0, k_init=1, k_min=1, k_max=20, oversample=oversample,
                   betas=(0.0, 0.999, 0.0), xi_thresh=1e-6, exact_small_matrices=False, warm_start=True, seed=0,
                   rank_policy="sigmoid", rank_interval=1, sigmoid=(eta, 10.0, 0.0, 0.0))  # fmt: skip
    ratios, got = _xi_over_optimum(opt, p, g, steps=3)
    assert max(ratios) < 1.2, ratios
    assert got == ranks  # as cold l = 5 grows it


@pytest.mark.parametrize("warm", [False, True])
def test_a_leading_all_zero_gradient_step_changes_nothing(warm):
    """An all-zero first gradient (LoRA's A while B is 0) leaves V = 0 and U = 0. The next
    steps then step as if it had not happened: a warm start took U's zero columns as its start,
    and its one iteration kept an arbitrary basis as the factors (ξ 0.91 where V is exactly
    rank 1 and the run without the zero step has ~1e-7; the weights then differed by 0.03)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 1, generator=gen), torch.randn(1, 16, generator=gen)
    grads = [a @ b * (1 + 0.3 * t) for t in range(4)]
    kw = dict(k_init=2, k_min=2, k_max=2, exact_small_matrices=False, warm_start=warm, betas=(0.0, 0.999, 0.9),
              weight_decay=0.0, lr=0.1, seed=3)  # fmt: skip
    w = torch.randn(12, 16, generator=gen)
    p, opt = run(kw, w, [torch.zeros(12, 16), grads[0]])
    assert opt.state[p]["xi"] < 1e-5  # V is exactly rank 1
    p, _ = run(kw, w, [torch.zeros(12, 16), *grads])
    q, _ = run(kw, w, grads)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-5)


def test_same_shapes_share_one_batched_srsi(monkeypatch):
    import adapprox_kernels.adapprox as mod

    calls = []
    real = mod.subspace_iteration

    def spy(op, sketch, iters, orth):
        calls.append(op.shape)
        return real(op, sketch, iters, orth)

    monkeypatch.setattr(mod, "subspace_iteration", spy)
    params = [torch.nn.Parameter(torch.randn(20, 24)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(24, 20))]
    opt = Adapprox(params, k_max=4, seed=0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(calls) == [(1, 24, 20), (3, 20, 24)]


def _two_shape_run(seed=0, steps=3):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(20, 24, generator=gen)) for _ in range(2)]
    params += [
        torch.nn.Parameter(torch.randn(16, 30, generator=gen)),
        torch.nn.Parameter(torch.randn(7, generator=gen)),
    ]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]
    return params, grads


def _train(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params], [dict(opt.state[p]) for p in params]


def test_deferred_orthonormalizer_failures_are_redone(monkeypatch):
    """A backend whose sync-free orthonormalizer reports failures (as the CUDA extension does for
    non-finite sketches) gets the bucket recomputed with the checked one: same result as never
    failing, and the garbage it returned is never used."""
    from adapprox_kernels.backends import ReferenceBackend

    params, grads = _two_shape_run()
    want_params, want_state = _train(Adapprox(params, k_max=4, seed=5, lr=1e-2), params, grads)

    calls = []

    def failing(y):
        calls.append(y.shape)
        return torch.full_like(y, float("nan")), torch.ones(y.shape[0], dtype=torch.bool)

    monkeypatch.setattr(ReferenceBackend, "orthonormalize_unchecked", staticmethod(failing))
    params, grads = _two_shape_run()
    got_params, got_state = _train(Adapprox(params, k_max=4, seed=5, lr=1e-2), params, grads)
    assert calls, "the optimizer should use the sync-free orthonormalizer when a backend has one"
    for p, q in zip(got_params, want_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for got, want in zip(got_state, want_state):
        for key in ("Q", "U", "xi", "rank"):
            if key in want:
                assert torch.equal(got[key], want[key]) if torch.is_tensor(want[key]) else got[key] == want[key]


def test_one_host_read_of_xi_per_step(monkeypatch):
    """Every bucket's ξ reaches the host in one read per step (rank decisions wait for it), not
    one per bucket."""
    params, grads = _two_shape_run(steps=1)
    opt = Adapprox(params, k_max=4, seed=0)
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real(t))
    _train(opt, params, grads)
    # one for the non-finite check, one for the ξ of both factored buckets (2 + 1 matrices)
    assert reads == [torch.Size([4]), torch.Size([3])]


def test_new_factors_are_copied_before_the_read_and_again_only_where_the_rank_moves(monkeypatch):
    """The narrowing copy of the new factors happens before the step's last host read, at the
    ranks the step used; after the read only where the rank decision moved round(k), and the
    state always holds round(k) columns."""
    import adapprox_kernels.adapprox as adapprox_module

    g = torch.rand(40, 1) @ torch.rand(1, 60) + 0.1  # rank one: the rank falls from 10
    w = torch.nn.Parameter(torch.zeros(40, 60))
    opt = Adapprox([w], k_init=10, k_max=10, k_min=1, seed=0)
    events = []
    narrowed, to_host = adapprox_module._narrowed, adapprox_module.to_host
    monkeypatch.setattr(adapprox_module, "_narrowed", lambda q, u, k: events.append(("copy", k)) or narrowed(q, u, k))
    monkeypatch.setattr(adapprox_module, "to_host", lambda ts: events.append(("read", None)) or to_host(ts))
    moves = 0
    for _ in range(40):
        events.clear()
        used = math.floor(opt.state[w]["rank"] + 0.5) if opt.state[w] else 10  # half up, as the step rounds
        w.grad = g.clone()
        opt.step()
        keep = math.floor(opt.state[w]["rank"] + 0.5)
        last_read = max(i for i, (what, _) in enumerate(events) if what == "read")
        before, after = events[:last_read], events[last_read + 1 :]
        assert before.count(("copy", used)) == 1
        assert after == ([] if keep == used else [("copy", keep)])
        moves += keep != used
        assert opt.state[w]["Q"].shape == (40, keep) and opt.state[w]["U"].shape == (60, keep)
    assert moves >= 3  # the rank did move, so both branches ran


def test_a_backend_that_cannot_run_raises_at_the_step_before_anything_changes(monkeypatch):
    """``backend="triton"`` where it cannot run (a CPU without the interpreter, a GPU without
    triton): a ``RuntimeError`` with the reason at the first step, and the states made for the
    earlier groups of the step are dropped again."""
    from adapprox_kernels.backends import BACKENDS

    monkeypatch.setattr(BACKENDS["triton"], "available", staticmethod(lambda device: "no reason"))
    a, b = torch.nn.Parameter(torch.randn(20, 30)), torch.nn.Parameter(torch.randn(20, 30))
    opt = Adapprox([{"params": [a], "backend": "reference"}, {"params": [b]}], backend="triton", k_max=3, seed=0)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu: no reason"):
        opt.step()
    assert torch.equal(a, before) and not opt.state


def test_every_backend_offers_the_sync_free_orthonormalizer():
    from adapprox_kernels.backends import BACKENDS

    for name, backend in BACKENDS.items():
        assert callable(getattr(backend, "orthonormalize_unchecked", None)), name


def test_stacked_factors_are_reused_not_copied(monkeypatch):
    """Where the last rank decision stored a bucket's factors as the matrices of one tensor each
    (one rank for all), the next S-RSI takes those tensors as its stacks, no copy; where the
    state holds anything else (ranks apart, factors replaced), they are stacked anew. Either
    way the run is the same."""
    import adapprox_kernels.adapprox as adapprox_module

    stacked = []
    stack_padded = adapprox_module._stack_padded
    monkeypatch.setattr(adapprox_module, "_stack_padded", lambda fs, w: stacked.append(len(fs)) or stack_padded(fs, w))

    def run(replace_at=None):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(12, 10)) for _ in range(3)]
        opt = Adapprox(params, k_init=2, k_min=2, k_max=2, oversample=1, power_iters=2, seed=0)
        counts = []
        for step in range(4):
            if step == replace_at:  # the same values in a tensor of its own
                opt.state[params[0]]["Q"] = opt.state[params[0]]["Q"].clone()
            for p in params:
                p.grad = torch.randn_like(p)
            stacked.clear()
            opt.step()
            counts.append(len(stacked))
        return params, opt, counts

    params, opt, counts = run()
    assert counts == [2, 0, 0, 0]  # the zero-width initial factors, then the stored stacks
    replaced, replaced_opt, counts = run(replace_at=2)
    assert counts == [2, 0, 2, 0]
    for a, b in zip(params, replaced):
        assert torch.equal(a, b) and torch.equal(opt.state[a]["U"], replaced_opt.state[b]["U"])
    views = list(torch.randn(3, 5, 2).unbind(0))
    padded = stack_padded(views, 4)
    assert padded.shape == (3, 5, 4) and torch.equal(padded[..., :2], torch.stack(views)) and not padded[..., 2:].any()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_like_the_original(how):
    """torch.optim pickles only defaults, state and groups: the copy must also get the sketch
    RNG (same sketches from here on) and its per-step caches (it used to fail on step())."""
    import copy
    import pickle

    model = torch.nn.Linear(12, 10)
    opt = Adapprox(model.parameters(), k_max=3, seed=5)
    model(torch.randn(4, 12)).sum().backward()
    opt.step()
    clone_model, clone_opt = (
        copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    )
    for m, o in ((model, opt), (clone_model, clone_opt)):
        o.zero_grad(set_to_none=True)  # a copied parameter has no .grad
        torch.manual_seed(0)
        m(torch.randn(4, 12)).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), clone_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls, kw", [(Adapprox, {"k_max": 2}), (AdaMeM, {"rank": 2})])
@pytest.mark.parametrize("how", ["load_state_dict", "deepcopy", "pickle"])
def test_no_differentiable_option_appears_after_a_load_or_a_copy(cls, kw, how):
    """torch.optim's __setstate__ adds a "differentiable" default, which neither optimizer
    takes: it showed in repr and in saved groups, and type(opt)(params, **opt.defaults)
    raised TypeError."""
    import pickle

    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = cls([p], seed=0, **kw)
    p.grad = torch.randn_like(p)
    opt.step()
    if how == "load_state_dict":
        opt.load_state_dict(opt.state_dict())
    else:
        opt = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert "differentiable" not in opt.defaults and "differentiable" not in opt.param_groups[0]
    assert "differentiable" not in repr(opt)
    cls([torch.nn.Parameter(torch.randn(6, 5))], **opt.defaults)


@pytest.mark.parametrize("cls, kw", [(Adapprox, {"k_max": 2}), (AdaMeM, {"rank": 2})])
def test_a_state_dict_after_a_numpy_lambda_lr_loads_with_weights_only(cls, kw):
    """A LambdaLR whose lambda returns NumPy numbers writes them into param_groups; the saved
    groups hold Python numbers, so torch.load(weights_only=True) reads the checkpoint, and the
    resumed run is bit-exact."""

    def run(steps, load=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 5)
        opt = cls(model.parameters(), seed=0, **kw)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: np.float64(0.9) ** t)
        if load is not None:
            model.load_state_dict(load["model"])
            opt.load_state_dict(load["opt"])
            sched.load_state_dict(load["sched"])
        for t in range(steps):
            torch.manual_seed(100 + t + (0 if load is None else 3))
            opt.zero_grad()
            model(torch.randn(4, 6)).pow(2).sum().backward()
            opt.step()
            sched.step()
        return model, opt, sched

    model, opt, sched = run(3)
    assert isinstance(opt.param_groups[0]["lr"], np.floating)  # what the scheduler wrote stays
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    ckpt["sched"] = sched.state_dict()
    resumed, _, _ = run(2, load=ckpt)
    whole, _, _ = run(5)
    for p, q in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(p, q)


def test_a_state_replaced_by_a_copy_is_the_one_stepped():
    """``opt.state[p] = dict(opt.state[p], ...)`` (an edited copy): the step reads and writes
    the new dict, not the one its buckets remembered."""
    params = [torch.nn.Parameter(torch.randn(6, 5)) for _ in range(2)]
    opt = Adapprox(params, k_max=2, seed=0)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(6, 5)
        opt.step()
    edited = opt.state[params[0]] = dict(opt.state[params[0]], exp_avg=torch.zeros(6, 5))
    params[0].grad = torch.ones(6, 5)
    params[1].grad = torch.ones(6, 5)
    opt.step()
    assert opt.state[params[0]] is edited and edited["step"] == 3
    assert edited["exp_avg"].abs().sum() > 0  # M_3 = (1 − β1)·Upd from the zeroed M


def test_parameters_that_sit_out_keep_no_stack_alive():
    """Layers frozen one by one: each keeps its factors, which were views of a stack shared with
    the layers still training; held memory and the checkpoint stay the state's own size."""
    ps = [torch.nn.Parameter(torch.randn(32, 32)) for _ in range(6)]
    opt = Adapprox(ps, k_max=3, betas=(0.0, 0.999, 0.9), seed=0)
    for t in range(len(ps)):
        for i, p in enumerate(ps):
            p.grad = torch.randn(32, 32) if i >= t else None
        opt.step()
    held = {}
    for s in opt.state.values():
        for key in ("Q", "U"):
            storage = s[key].untyped_storage()
            held[storage.data_ptr()] = storage.nbytes()
    assert sum(held.values()) == opt.state_report().state_bytes
    saved, compact = io.BytesIO(), io.BytesIO()
    torch.save(opt.state_dict(), saved)
    sd = opt.state_dict()
    sd["state"] = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    torch.save(sd, compact)
    assert len(saved.getvalue()) == len(compact.getvalue())


def test_parameters_that_sit_out_in_a_repeating_pattern_keep_no_stack_alive():
    """Half the layers get gradients every other step (experts routed in turn): once the
    pattern repeats, its buckets are remembered, and a layer back from an idle step idles
    again with a view of the stack its bucket-mates moved on from; held memory stays the
    state's own size (it reached 1.5× here)."""
    ps = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(8)]
    opt = Adapprox(ps, k_max=2, betas=(0.0, 0.999, 0.9), seed=0)
    for t in range(6):
        for i, p in enumerate(ps):
            p.grad = torch.randn(16, 16) if t % 2 == 0 or i < 4 else None
        opt.step()
        assert held_bytes(opt) == opt.state_report().state_bytes, t


def test_frozen_parameters_are_compacted_once_not_on_every_step(monkeypatch):
    """Who sits out is the same step after step (a fine-tune's frozen layers): their factors
    were copied out when they first sat out, so later steps skip them (it cost ~1.5 µs each a
    step: 1.2 ms with 1,000 frozen weights)."""
    calls = []
    compact = Adapprox._compact_factors
    monkeypatch.setattr(Adapprox, "_compact_factors", lambda self, idle: calls.append(len(idle)) or compact(self, idle))
    ps = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(4)]
    opt = Adapprox(ps, k_max=2, seed=0)
    for t in range(5):
        for i, p in enumerate(ps):
            p.grad = torch.randn(16, 16) if t == 0 or i < 2 else None
        opt.step()
    assert calls == [2]  # the second step (two newly frozen); not called with nobody idle
    assert held_bytes(opt) == opt.state_report().state_bytes


def overflowing_second_moment_run(backend: str, device="cpu", **options) -> tuple[torch.nn.Parameter, Adapprox, list]:
    """Four steps on a 20 × 30 matrix whose gradients (1e12) are finite but whose V (1e24)
    has squares beyond float32: S-RSI, which squares V, overflows."""
    import warnings

    p = torch.nn.Parameter(torch.zeros(20, 30, device=device))
    opt = Adapprox([p], k_max=3, seed=0, backend=backend, **options)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            p.grad = (1e12 * torch.randn(20, 30, generator=gen)).to(device)
            opt.step()
    return p, opt, [w for w in caught if w.category is RuntimeWarning and "overflowed float32" in str(w.message)]


def test_a_second_moment_beyond_float32_warns_and_keeps_the_weights_finite():
    """Before, the NaN factors of such a step reached the weights at the next one, silently."""
    p, opt, warned = overflowing_second_moment_run("reference")
    assert warned and "params'][0]" in str(warned[0].message)
    assert "overflowed float32 (gradient entries of ~1e9 or more)" in str(warned[0].message)
    assert all(w.filename == __file__ for w in warned)  # the user's opt.step(), not the package's frames
    state = opt.state[p]
    assert torch.isfinite(p).all() and torch.isfinite(state["Q"]).all() and torch.isfinite(state["U"]).all()
    assert math.isnan(state["xi"]) and state["rank"] == 3.0


def test_a_second_moment_beyond_float64_names_float64():
    """An fp64 parameter's S-RSI runs in fp64: it overflows at entries of ~1e77, not float32's ~1e9."""
    import warnings

    p = torch.nn.Parameter(torch.zeros(20, 30, dtype=torch.float64))
    opt = Adapprox([p], k_max=3, seed=0, backend="reference")
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for scale in (1.0, 1e100):
            p.grad = scale * torch.randn(20, 30, generator=gen, dtype=torch.float64)
            opt.step()
    warned = [str(w.message) for w in caught if w.category is RuntimeWarning and "second moment" in str(w.message)]
    assert len(warned) == 1 and "overflowed float64 (gradient entries of ~1e77 or more)" in warned[0], warned
    state = opt.state[p]
    assert torch.isfinite(p).all() and torch.isfinite(state["Q"]).all() and torch.isfinite(state["U"]).all()
    assert math.isnan(state["xi"]) and state["rank"] == 3.0


def bytes_kept_alive(opt) -> int:
    """Bytes of every storage reachable from the optimizer object (its attributes and what they
    hold), the parameters' and gradients' aside: what it keeps alive, which ``held_bytes``
    (``opt.state`` only) does not see all of."""
    params = [p for group in opt.param_groups for p in group["params"]]
    skip = {t.untyped_storage().data_ptr() for p in params for t in (p, p.grad) if t is not None}
    seen, storages, todo = set(), {}, [vars(opt)]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if torch.is_tensor(x):
            storage = x.untyped_storage()
            if storage.data_ptr() not in skip:
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, dict):
            todo += [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple, set)):
            todo += list(x)
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            todo.append(vars(x))
    return sum(storages.values())


def test_factors_kept_after_an_overflow_keep_no_stack_alive():
    """The overflowing matrix keeps last step's factors, views of the stack its bucket-mate
    moves on from: they are copied out, so held memory stays the state's own size; and the
    stack the rank decision remembered for next step's S-RSI, no state's once the copies
    replace it, is not held to the next step (it was, unreported)."""
    a, b = (torch.nn.Parameter(torch.zeros(20, 30)) for _ in range(2))
    opt = Adapprox([a, b], k_max=3, seed=0)
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 1.0, 1e12):
        a.grad, b.grad = scale * torch.randn(20, 30, generator=gen), torch.randn(20, 30, generator=gen)
        with pytest.warns(RuntimeWarning, match="overflowed") if scale > 1 else contextlib.nullcontext():
            opt.step()
    assert torch.isfinite(opt.state[a]["Q"]).all()
    assert bytes_kept_alive(opt) == held_bytes(opt) == opt.state_report().state_bytes


@pytest.mark.parametrize("drop", ["del", "empty", "clear_and_refill"])
def test_a_dropped_state_is_not_kept_alive_by_the_remembered_buckets(drop):
    """A layer frozen and its optimizer state dropped to free its memory (``del opt.state[p]``,
    ``opt.state[p] = {}``): the buckets remembered from the steps it trained in held the old
    state (its first moment, and its factors' stack), outside ``opt.state`` and every byte
    count, for as long as the optimizer lived."""
    import gc
    import weakref

    a, b = (torch.nn.Parameter(torch.randn(64, 48)) for _ in range(2))
    opt = Adapprox([a, b], k_max=4, seed=0, nonfinite="skip")
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        a.grad, b.grad = torch.randn(64, 48, generator=gen), torch.randn(64, 48, generator=gen)
        opt.step()
    old = [weakref.ref(opt.state[b][key]) for key in ("exp_avg", "Q", "U")]
    b.grad = None
    if drop == "del":
        del opt.state[b]
    elif drop == "empty":
        opt.state[b] = {}
    else:  # the whole state reset while b sits out: a alone has state again after a step
        opt.state.clear()
    for _ in range(3):
        a.grad = torch.randn(64, 48, generator=gen)
        opt.step()
    gc.collect()
    assert all(ref() is None for ref in old)
    assert bytes_kept_alive(opt) == held_bytes(opt) == opt.state_report().state_bytes


def test_the_states_of_a_discarded_first_step_are_not_kept_alive():
    """A bad gradient on the first step: the states made for it are deleted, and the step
    starts over without that parameter; the buckets remembered from the first try held them."""
    ps = [torch.nn.Parameter(torch.randn(40, 30)) for _ in range(3)]
    opt = Adapprox(ps, k_max=3, seed=0, nonfinite="skip")
    for p in ps:
        p.grad = torch.randn(40, 30)
    ps[0].grad[0, 0] = float("nan")
    opt.step()
    assert bytes_kept_alive(opt) == held_bytes(opt) == opt.state_report().state_bytes


def test_an_overflow_between_the_sigmoid_policys_checks_keeps_the_factors():
    """No ξ is measured between checks: the new factors' finiteness stands in for it (before,
    NaN factors were stored, and the weights went NaN at the next step)."""
    p, opt, warned = overflowing_second_moment_run("reference", rank_policy="sigmoid", rank_interval=10)
    state = opt.state[p]
    assert warned and math.isnan(state["xi"])  # warned, yet never measured
    assert torch.isfinite(p).all() and torch.isfinite(state["Q"]).all() and torch.isfinite(state["U"]).all()


def test_sigmoid_policy_checks_each_matrix_on_its_own_step_count():
    """Same-shaped B sits out every step at which A's count is a multiple of the interval: B is
    still checked at its own multiples (it used to follow A's count, and was never checked)."""
    kw = dict(rank_policy="sigmoid", rank_interval=3, k_max=20, seed=0)
    a, b, b_alone = (torch.nn.Parameter(torch.zeros(48, 64)) for _ in range(3))
    opt, opt_alone = Adapprox([a, b], **kw), Adapprox([b_alone], **kw)
    gen = torch.Generator().manual_seed(0)
    alone = []  # b_alone's rank after each of its steps
    for t in range(1, 13):
        a.grad, gb = torch.randn(48, 64, generator=gen), torch.randn(48, 64, generator=gen)  # noise: ξ ≫ ξ_thresh
        b.grad = gb if t % 3 else None
        opt.step()
        if b.grad is not None:
            b_alone.grad = gb.clone()
            opt_alone.step()
            alone.append(opt_alone.state[b_alone]["rank"])
    grew_at = [i + 1 for i in range(1, len(alone)) if alone[i] > alone[i - 1]]
    assert len(alone) == 8 and grew_at == [3, 6], alone  # each of its own checks
    ranks = [o.state[w]["rank"] for o, w in ((opt, a), (opt, b), (opt_alone, b_alone))]
    assert ranks[1] == ranks[2] > 1.0 and ranks[0] > 1.0, ranks
    assert not math.isnan(opt.state[b]["xi"])


def test_lowered_k_max_bounds_the_rank_at_once():
    """``k_max`` lowered between steps: the rank (and the factors kept) never exceed it, though
    the rank moment would otherwise carry the old rank down only slowly."""
    p = torch.nn.Parameter(torch.randn(40, 30))
    opt = Adapprox([p], k_max=8, seed=0)
    for t in range(4):
        if t == 2:
            opt.param_groups[0]["k_max"] = 2
        p.grad = torch.randn(40, 30)
        opt.step()
        assert opt.state[p]["rank"] <= opt.param_groups[0]["k_max"]
        assert opt.state[p]["Q"].shape[1] <= opt.param_groups[0]["k_max"]


def test_raised_k_min_bounds_the_rank_at_once():
    """``k_min`` raised between steps (from 1, with k_max): the rank (and the factors kept) are at
    least it on that step, though the rank moment would carry a rank-1 gradient's rank 1 up
    only slowly."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(40, 1, generator=gen) @ torch.randn(1, 30, generator=gen)  # ξ ≈ 0: the rule shrinks
    p = torch.nn.Parameter(torch.zeros(40, 30))
    opt = Adapprox([p], k_min=1, k_max=1, seed=0)
    for t in range(4):
        if t == 2:
            opt.param_groups[0].update(k_min=5, k_max=8)
        p.grad = g.clone()
        opt.step()
        assert opt.state[p]["rank"] == opt.param_groups[0]["k_min"]
        assert opt.state[p]["Q"].shape[1] == opt.param_groups[0]["k_min"]


@pytest.mark.parametrize("how", ["clear one", "delete one", "reset one", "clear all", "replace"])
def test_state_dropped_between_steps_is_made_anew(how):
    """The step remembers its buckets and their state dicts (see ``Adapprox._buckets``); state a
    user empties, deletes or replaces between steps must be made anew, as on a first step, not
    updated in a dict the optimizer no longer holds."""
    from collections import defaultdict

    w0 = [torch.randn(6, 5), torch.randn(6, 5), torch.randn(7)]
    grads = [torch.randn(6, 5), torch.randn(6, 5), torch.randn(7)]
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = Adapprox(params, k_max=2, seed=0)
    for _ in range(3):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    dropped = [0, 1, 2] if how in ("clear all", "replace") else [1]
    if how == "clear one":
        opt.state[params[1]].clear()
    elif how == "delete one":
        del opt.state[params[1]]
    elif how == "reset one":
        opt.state[params[1]] = {}
    elif how == "clear all":
        opt.state.clear()
    else:
        opt.state = defaultdict(dict)
    before = [p.detach().clone() for p in params]
    opt.step()
    for i, p in enumerate(params):
        assert opt.state[p]["step"] == (1 if i in dropped else 4)
    for i in dropped:
        # A first step from fresh state (V = (1 − β2)·G², whatever the sketch), on these weights.
        fresh = torch.nn.Parameter(before[i].clone())
        fresh.grad = grads[i].clone()
        Adapprox([fresh], k_max=2, seed=0).step()
        torch.testing.assert_close(params[i].detach(), fresh.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [Adapprox, AdaMeM])
def test_a_one_element_tensor_lr_steps_as_its_float(cls):
    """torch.optim takes a (1,)-shaped tensor lr written into a group, and so does our
    load_state_dict; the step passed it as ``alpha``, which takes only a number or a 0-d tensor."""
    lr = 2.0**-10  # exact in float32: the tensor holds the float's value

    def run(group_lr):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(20, 33), (7,)]]
        kw = dict(k_max=4, backend="reference") if cls is Adapprox else dict(rank=4)
        opt = cls(params, weight_decay=0.1, seed=0, **kw)
        opt.param_groups[0]["lr"] = group_lr
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params

    for a, b in zip(run(lr), run(torch.tensor([lr]))):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "cls,kw",
    [
        (Adapprox, dict(k_max=4)),
        (Adapprox, dict(k_max=4, cosine_guidance=True, warm_start=True)),
        (Adapprox, dict(k_max=4, betas=(0.0, 0.999, 0.9), clip_threshold=None)),
        (AdaMeM, dict(rank=4, update_proj_gap=2, clip_threshold=1.0)),
    ],
)
def test_maximize_steps_as_the_negated_gradient(cls, kw):
    """torch.optim's ``maximize``: the same bits as the step on −G, parameters and every state
    entry, in every kind of bucket (factored, a small dense matrix, a vector), with the update
    clipped (the first steps' RMS is far above 1) or not."""
    shapes = [(20, 33), (3, 50), (7,)]

    def run(maximize: bool, sign: float):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = cls(params, weight_decay=0.1, seed=0, maximize=maximize, **kw)
        for _ in range(4):
            for p in params:
                p.grad = sign * torch.randn(p.shape, generator=gen)
            opt.step()
        return params, opt

    up_params, up_opt = run(True, 1.0)
    down_params, down_opt = run(False, -1.0)
    for i, (a, b) in enumerate(zip(up_params, down_params)):
        assert torch.equal(a, b), f"param {i}"
        for key, want in down_opt.state[b].items():
            got = up_opt.state[a][key]
            assert torch.equal(got, want) if torch.is_tensor(want) else got == want, (i, key)
    assert not torch.equal(up_params[0], run(False, 1.0)[0][0])  # it is not the plain step


@pytest.mark.parametrize("cls", [Adapprox, AdaMeM])
def test_maximize_climbs_and_needs_a_bool(cls):
    """Maximizing ``−‖W − T‖²`` takes W to T, as minimizing ``‖W − T‖²`` does."""
    target = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    w = torch.nn.Parameter(torch.zeros(12, 10))
    opt = cls([w], lr=0.05, weight_decay=0.0, seed=0, maximize=True)
    for _ in range(200):
        opt.zero_grad()
        (-(w - target).square().sum()).backward()
        opt.step()
    assert (w - target).norm() < 0.1 * target.norm()
    with pytest.raises(ValueError, match="maximize"):
        cls([w], maximize="yes")


def _bf16_run(stochastic: bool, steps: int, lr=1e-4, resume_at=None, dtype=torch.bfloat16, cls=Adapprox):
    """A factored (32×48) and a dense (512,) parameter at 1.0, a constant gradient: each step
    moves them by about ``lr``, below half a bf16 ulp at 1.0 (2⁻⁸)."""
    params = [torch.nn.Parameter(torch.ones(s, dtype=dtype)) for s in [(32, 48), (512,)]]
    kw = dict(k_max=4) if cls is Adapprox else dict(rank=4)

    def make():
        return cls(params, lr=lr, weight_decay=0.0, seed=0, bf16_stochastic_round=stochastic, **kw)

    opt = make()
    for step in range(steps):
        if step == resume_at:
            saved = copy.deepcopy(opt.state_dict())
            opt = make()
            opt.load_state_dict(saved)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    return params


@pytest.mark.parametrize("cls", [Adapprox, AdaMeM])
def test_bf16_stochastic_round_keeps_the_updates_round_to_nearest_drops(cls):
    """200 steps of up to 1e-4 from 1.0 (the gradient is constant, so the steps do not depend
    on the weights): round-to-nearest never leaves 1.0 (each step is below half an ulp);
    stochastic rounding lands, on average, where fp32 weights go (Adapprox 0.981, AdaMeM's
    matrix 0.9965), factored and dense alike. Each weight's rounding errors add up as a random walk (about 0.009 after
    200 steps), so the mean of 512 or more is within 2e-3 by over five standard deviations."""
    assert all(torch.equal(p, torch.ones_like(p)) for p in _bf16_run(False, 200, cls=cls))
    exact = _bf16_run(False, 200, dtype=torch.float32, cls=cls)
    assert exact[0].mean() < 1 - 2e-3  # the steps add up to more than the tolerance below
    for p, want in zip(_bf16_run(True, 200, cls=cls), exact):
        assert abs(p.float().mean().item() - want.mean().item()) < 2e-3, (p.float().mean(), want.mean())


def test_bf16_stochastic_round_resumes_bit_exactly_and_leaves_other_dtypes_alone():
    """The random bits follow the step count, so a run resumed from a state_dict draws the same
    ones as an uninterrupted run; fp32 parameters are written as without the option."""
    whole, resumed = _bf16_run(True, 6), _bf16_run(True, 6, resume_at=3)
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed))
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in [(20,), (4, 5), (4, 5), (4, 5)]]
    opt = Adapprox([{"params": params[:3]}, {"params": params[3:]}], bf16_stochastic_round=True)
    steps = [{"step": 1}, {"step": 2}]

    def keys(opt, group, bucket, states):
        return opt._rounding_keys(opt.param_groups[group], bucket, states)

    # A key per parameter and step, whatever shares its bucket: (4, 5) #1 at step 2 keeps its
    # bits in a bucket with #2 at step 1 (steps differ after a skipped step); the first
    # parameter of another group or another seed draws others.
    pair = keys(opt, 0, params[1:3], steps[::-1])
    assert keys(opt, 0, params[1:2], steps[1:]) == pair[:1] and keys(opt, 0, params[2:3], steps[:1]) == pair[1:]
    drawn = {k for p in params[:3] for s in steps for k in keys(opt, 0, [p], [s])}
    assert len(drawn) == 6 and keys(opt, 1, params[3:], steps[:1])[0] not in drawn
    # All 32 bits: steps 2³¹ apart still draw other bits (a key is its prefix plus the step, mod 2³²).
    (early,), (late,) = (keys(opt, 0, params[1:2], [{"step": s}]) for s in (1, 1 + 2**31))
    assert (late - early) % 2**32 == 2**31 and 0 <= min(early, late) <= max(early, late) < 2**32
    other_seed = Adapprox(params, bf16_stochastic_round=True, seed=opt._seed + 1)
    assert not drawn & {k for p in params[:3] for s in steps for k in keys(other_seed, 0, [p], [s])}
    # Not the device: data-parallel ranks, each on its own GPU, must keep their replicas equal.
    elsewhere = [torch.nn.Parameter(p.detach().to("meta")) for p in params]
    moved = Adapprox([{"params": elsewhere[:3]}, {"params": elsewhere[3:]}], bf16_stochastic_round=True, seed=opt._seed)
    assert keys(moved, 0, elsewhere[1:3], steps) == keys(opt, 0, params[1:3], steps)
    # The keys follow the positions: a group's list reordered in place gives each parameter the
    # key that a fresh optimizer over the new order would (the kept hashes are redone).
    before = keys(opt, 0, params[1:3], steps)
    listed = opt.param_groups[0]["params"]
    listed[1], listed[2] = listed[2], listed[1]
    fresh = Adapprox([{"params": list(listed)}, {"params": params[3:]}], bf16_stochastic_round=True, seed=opt._seed)
    assert keys(opt, 0, params[1:3], steps) == keys(fresh, 0, params[1:3], steps) != before
    assert opt._rounding_keys(opt.param_groups[0], [torch.zeros(4, 5)], steps[:1]) is None  # fp32: to nearest
    on, off = _bf16_run(True, 4, dtype=torch.float32), _bf16_run(False, 4, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(on, off))
    with pytest.raises(ValueError, match="bf16_stochastic_round"):
        Adapprox([torch.nn.Parameter(torch.zeros(3))], bf16_stochastic_round=1)


def test_row_shards_never_share_a_rounding_key_across_steps():
    """A row shard's key folds in its first row after the parameter's key (``prefix + step``):
    folded before it, the row was added to the unhashed key, so the shard at row r drew on step
    t the stream of the shard at row 0 on step t + r."""
    from adapprox_kernels.reference import shard_keys

    prefix = 0x9E3779B9
    drawn = [k for step in range(1, 65) for row in range(0, 64, 7) for k in shard_keys([prefix + step], row)]
    assert len(set(drawn)) == len(drawn)
    assert shard_keys([prefix + 1], 0) != [prefix + 1]  # a shard draws other bits than the whole matrix


def test_stochastic_round_bf16_in_chunks_draws_the_bits_of_one_pass():
    """``reference.stochastic_round_bf16`` makes its noise ``chunk`` elements of a matrix at a
    time (2**20 by default: only matrices above a million entries take more than one): any
    chunking draws element i's bits from its own counter, as the Triton kernels do."""
    from adapprox_kernels.reference import stochastic_round_bf16

    x = torch.randn(3, 5, 9, generator=torch.Generator().manual_seed(0))
    keys = [7, 2**32 - 1, 123456789]
    whole = stochastic_round_bf16(x, keys)
    for chunk in (1, 7, 44, 45):
        assert torch.equal(stochastic_round_bf16(x, keys, chunk=chunk), whole)


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=4)), (AdaMeM, dict(rank=2))])
def test_unscale_in_step_is_off_by_default_and_gives_the_same_bits_on(cls, kw):
    """``_step_supports_amp_scaling`` is off unless ``opt.unscale_in_step = True``, also as seen
    through a wrapper that subclasses the optimizer's class and forwards what it lacks
    (Lightning's ``LightningOptimizer``, whose mixed precision refuses gradient clipping while it
    is on), and in copies. Off, the scaler unscales and skips an overflowed step itself, without
    calling ``step()`` (how Accelerate, and so the HF Trainer, tell a skipped step and hold the LR
    scheduler: with it on, they stepped the scheduler on skipped steps); every step is the same
    bits either way."""
    import copy
    import pickle

    class Wrapper:  # LightningOptimizer's way of wrapping
        def __init__(self, opt):
            self._optimizer = opt
            self.__class__ = type("Wrapped" + type(opt).__name__, (Wrapper, type(opt)), {})

        def __getattr__(self, item):
            return getattr(self._optimizer, item)

    gen = torch.Generator().manual_seed(2)
    shapes = [(12, 10), (10,)]
    steps = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    runs = []
    for in_step in (False, True):
        params = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
        opt = cls(params, seed=0, **kw)
        assert not opt._step_supports_amp_scaling and not Wrapper(opt)._step_supports_amp_scaling
        if in_step:
            opt.unscale_in_step = True
            assert opt._step_supports_amp_scaling and Wrapper(opt)._step_supports_amp_scaling
            assert copy.deepcopy(opt)._step_supports_amp_scaling
            assert pickle.loads(pickle.dumps(opt))._step_supports_amp_scaling
        calls = []
        opt.register_step_pre_hook(lambda *_: calls.append(1))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        scaler.scale(torch.ones(()))
        for i, grads in enumerate(steps):
            for p, g in zip(params, grads):
                p.grad = g * scaler.get_scale()
            if i == 1:
                params[0].grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        assert len(calls) == (3 if in_step else 2)  # off: the scaler skips the overflowed step
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize(
    "make",
    [
        lambda groups: Adapprox(groups, k_max=3, seed=0, bf16_stochastic_round=True),
        lambda groups: AdaMeM(groups, rank=3, seed=0, bf16_stochastic_round=True),
    ],
    ids=["adapprox", "adamem"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["group", "params"])
def test_a_removed_group_is_freed_with_its_state(make, dtype, how):
    """Model surgery: a group popped from ``param_groups``, or parameters taken out of their
    group's list (their state deleted, as torch.optim needs for a state dict), and their
    module dropped are freed, as with torch.optim.AdamW, once training goes on: the bucket
    memo of Adapprox and the rounding keys' memo held the parameters, their gradients and
    their state (GPU memory) as long as the optimizer."""
    import gc
    import weakref

    torch.manual_seed(0)
    body, head = torch.nn.Linear(24, 16).to(dtype), torch.nn.Linear(16, 40).to(dtype)
    if how == "group":
        opt = make([{"params": body.parameters()}, {"params": head.parameters()}])
    else:
        opt = make([{"params": [*body.parameters(), *head.parameters()]}])
    for _ in range(2):
        opt.zero_grad()
        head(body(torch.randn(4, 24, dtype=dtype))).float().square().mean().backward()
        opt.step()
    if how == "group":
        group = opt.param_groups.pop()
    else:
        group = {"params": list(head.parameters())}
        kept = opt.param_groups[0]["params"]
        kept[:] = [p for p in kept if not any(p is q for q in group["params"])]  # the list edited in place
    states = [opt.state.pop(q) for q in group["params"]]
    tensors = [*head.parameters(), *(p.grad for p in head.parameters())]
    tensors += [v for state in states for v in state.values() if torch.is_tensor(v)]
    assert len(tensors) > 4
    refs = [weakref.ref(t) for t in tensors]
    del group, states, head, tensors
    for _ in range(2):
        opt.zero_grad()
        body(torch.randn(4, 24, dtype=dtype)).float().square().mean().backward()
        opt.step()
    gc.collect()
    assert not any(ref() is not None for ref in refs)


def test_repeated_loads_do_not_grow_the_rounding_keys_memo():
    """``load_state_dict`` makes new group dicts: a memo keyed by group kept one entry (the
    group's parameter ids and hashes) per load, for good."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)).to(torch.bfloat16)
    opt = Adapprox(model.parameters(), k_max=3, seed=0, bf16_stochastic_round=True)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(4, 16, dtype=torch.bfloat16)).float().square().mean().backward()
        opt.step()
        opt.load_state_dict(opt.state_dict())
    assert len(opt.__dict__["_key_memo"]) == 1


def test_buckets_are_remembered_with_many_groups():
    """Each group's bucket layout is remembered from step to step (sorting hundreds of
    parameters costs ~0.5 ms a step), with more than 8 groups too (per-layer learning rates):
    a memo of a fixed 8 entries, emptied when full, missed every step there."""
    params = [torch.nn.Parameter(torch.randn(6, 5)) for _ in range(12)]
    opt = Adapprox([{"params": [p], "lr": 1e-3 * (i + 1)} for i, p in enumerate(params)], k_max=2, seed=0)
    made = []
    init_state = opt._init_state
    opt._init_state = lambda p, group: made.append(p) or init_state(p, group)
    for step in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        made.clear()
        opt.step()
        # (the second step makes them anew once: each group's was remembered at a state size
        # of its own, while the first step made the state)
        assert step < 2 or not made


def test_clip_threshold_none_keeps_an_update_whose_sum_of_squares_overflows():
    """``clip_threshold=None`` divides by 1, also where Σ Upd² overflows float32 (a finite
    update: eps at its least, V underflowed to 0): not by inf/inf = NaN, which wrote NaN weights."""
    tiny = torch.finfo(torch.float32).tiny
    for clip in (None, 1.0):
        p = torch.nn.Parameter(torch.ones(40, 30))
        opt = Adapprox([p], lr=1e-3, betas=(0.9, math.nextafter(1.0, 0.0), 0.9), eps=tiny, clip_threshold=clip,
                       weight_decay=0.0, backend="reference", seed=0)  # fmt: skip
        p.grad = torch.full((40, 30), 1e-20)  # V = (1 − β2)·G² = 0 in fp32: Upd = G/ε ≈ 8.5e17
        opt.step()
        assert torch.isfinite(p).all(), clip


def test_cosine_max_scale_at_float32_max_gives_finite_weights():
    """The largest accepted ``cosine_max_scale``: ``1/s`` is subnormal and its reciprocal
    rounded to inf, so a step with cos = 1 (a one-entry parameter's first step) wrote -inf."""
    s = torch.finfo(torch.float32).max
    p = torch.nn.Parameter(torch.ones(1))
    opt = Adapprox(
        [p], lr=1e-40, weight_decay=0.0, cosine_guidance=True, cosine_max_scale=s, backend="reference", seed=0
    )
    p.grad = torch.ones(1)
    opt.step()
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=2, betas=(0.9, 0.999, 0.9))), (AdaMeM, dict(rank=2))])
def test_load_state_dict_copies_the_tensors_it_is_given(cls, kw):
    """A checkpoint dict kept in memory (to roll back to) does not change as the run goes on:
    the loaded state is a copy (torch.optim's keeps tensors of matching dtype and device, and
    its in-place updates of the first moment would then write into the dict)."""
    p = torch.nn.Parameter(torch.randn(8, 6))
    opt = cls([p], seed=0, **kw)
    p.grad = torch.randn(8, 6)
    opt.step()
    saved = opt.state_dict()
    kept = copy.deepcopy(saved)
    again = cls([p], seed=0, **kw)
    again.load_state_dict(saved)
    p.grad = torch.randn(8, 6)
    again.step()
    assert _same_leaves(saved, kept)


@pytest.mark.parametrize("seed", [None, 5])
@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=2, backend="reference")), (AdaMeM, dict(rank=2))])
def test_a_default_device_of_the_users_changes_nothing(cls, kw, seed):
    """``torch.set_default_device("cuda")`` (or ``with torch.device(...)``) moves every factory
    call made without a device. The step's host constants (column masks) must still be made on
    the host: made on the GPU, ``pin_memory`` raised at every factored step; with CPU parameters,
    a non-blocking GPU-to-host copy would be read before it landed. A drawn seed still comes
    from torch's CPU RNG (a meta default raised; a CUDA one drew from another RNG). A meta
    default stands in for the GPU's here (it runs anywhere and failed the same way); AdamW steps
    under either."""
    from adapprox_kernels.transfer import forget_constants

    runs = []
    for default in (None, "meta"):
        forget_constants()  # the cached host constants are made anew
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((12, 10), (10,))]
        with torch.device(default) if default else contextlib.nullcontext():
            opt = cls(params, seed=seed, **kw)  # None: drawn from torch's RNG
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, device="cpu")
                opt.step()
        runs.append((opt._seed, params))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=2, backend="reference")), (AdaMeM, dict(rank=2))])
def test_steps_under_inference_mode_give_the_same_bits(cls, kw):
    """A run stepped under ``torch.inference_mode()``, as AdamW's can be: the same bits as
    under ``no_grad``. Views made there have no ``_base``, and the second step read last step's
    factor stacks from it (AttributeError)."""
    runs = []
    for mode in (contextlib.nullcontext, torch.inference_mode):
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((12, 10), (12, 10), (10,))]
        opt = cls(params, seed=0, **kw)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            with mode():
                opt.step()
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_user_subclass_checking_its_own_option_keeps_its_defaults():
    """A user's subclass that overrides the check to take an option of its own (not kept in
    defaults): loading a checkpoint does not put that argument into defaults and groups, and an
    older pickle of it still takes the options added since from Adapprox's constructor."""

    class Mine(Adapprox):
        def __init__(self, params, trust_clip=None, **kw):
            super().__init__(params, **kw)
            self.trust_clip = trust_clip

        @staticmethod
        def _check_hyperparameters(h):
            Adapprox._check_hyperparameters(h)

    p = torch.nn.Parameter(torch.randn(12, 10))
    opt = Mine([p], k_max=2, seed=0)
    p.grad = torch.randn(12, 10)
    opt.step()
    keys = set(opt.defaults)
    opt.load_state_dict(opt.state_dict())
    assert set(opt.defaults) == keys and set(opt.param_groups[0]) == keys | {"params"}
    pickled = opt.__getstate__()
    for d in (pickled["defaults"], *pickled["param_groups"]):
        del d["maximize"]
    old = Mine.__new__(Mine)
    old.__setstate__(pickled)
    assert old.defaults == opt.defaults and old.param_groups[0]["maximize"] is False


def test_a_parameter_idle_under_inference_mode_keeps_no_stack_alive():
    """Stepped under torch.inference_mode, the factors are views without a ``_base``: a
    parameter that sits out still had its factors copied out of the bucket's stack (it kept the
    whole stack alive, outside every byte count and in every checkpoint)."""
    a, b = (torch.nn.Parameter(torch.randn(64, 48)) for _ in range(2))
    opt = Adapprox([a, b], k_max=4, seed=0)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        a.grad = torch.randn(64, 48, generator=gen)
        b.grad = torch.randn(64, 48, generator=gen) if step < 3 else None
        with torch.inference_mode():
            opt.step()
    q = opt.state[b]["Q"]
    assert q.untyped_storage().nbytes() == q.numel() * q.element_size()
    assert bytes_kept_alive(opt) == held_bytes(opt) == opt.state_report().state_bytes


def test_the_stale_bucket_scan_runs_once_a_step_however_many_groups_miss(monkeypatch):
    """Every group misses the bucket memo where who has a gradient changes each step (routed
    experts): the scan for dropped states, over every remembered entry, ran at each miss
    (quadratic in the groups: ~4x the bucketing time with 100 groups); once a step suffices."""
    import random

    groups = [[torch.nn.Parameter(torch.randn(4)) for _ in range(4)] for _ in range(10)]
    opt = Adapprox([{"params": g} for g in groups], k_max=2, seed=0)
    calls = []
    scan = opt._forget_stale_buckets
    monkeypatch.setattr(opt, "_forget_stale_buckets", lambda: (calls.append(1), scan())[1])
    rng = random.Random(0)
    for step in range(6):
        for g in groups:
            for p in g:
                p.grad = torch.randn(4) if step == 0 or rng.random() < 0.6 else None
        calls.clear()
        opt.step()
        assert len(calls) <= 1, f"step {step}: {len(calls)} scans"


@pytest.mark.parametrize("cls,kw", [(Adapprox, dict(k_max=3)), (AdaMeM, dict(rank=2))])
@pytest.mark.parametrize(
    "shape,grad_shape", [((16, 20), (20, 16)), ((16, 20), (320,)), ((5, 7), (7, 5)), ((20,), (4, 5))]
)
def test_a_gradient_of_another_shape_is_refused_before_anything_changes(cls, kw, shape, grad_shape):
    """The .grad setter refuses another shape, ``p.grad.data = …`` does not: AdaMeM reshaped a
    transposed gradient (its entries scrambled) and stepped on it silently; Adapprox failed deep
    in the step, after earlier parameters had moved."""
    first, w = torch.nn.Parameter(torch.randn(12, 22)), torch.nn.Parameter(torch.randn(*shape))
    opt = cls([first, w], seed=0, **kw)
    first.grad, w.grad = torch.randn(12, 22), torch.randn(*shape)
    w.grad.data = torch.randn(*grad_shape)
    before = [p.detach().clone() for p in (first, w)]
    with pytest.raises(RuntimeError, match=r"gradient of param_groups\[0\]\['params'\]\[1\] has shape"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, (first, w))) and not opt.state


def test_a_later_group_that_cannot_step_leaves_no_new_state():
    """A later group whose parameter's state no longer fits it (or whose backend cannot run
    here) raises before any work: the states made for the earlier groups' new parameters went
    on living, unstepped, in opt.state and its checkpoints."""
    a, w = torch.nn.Parameter(torch.randn(16, 20)), torch.nn.Parameter(torch.randn(16, 20))
    opt = Adapprox([w], k_max=3, seed=0)
    w.grad = torch.randn(16, 20)
    opt.step()
    opt.add_param_group({"params": [a]})
    opt.param_groups.reverse()  # the new parameter's group first
    w.data = w.data.t().contiguous()
    a.grad, w.grad = torch.randn(16, 20), torch.randn(20, 16)
    with pytest.raises(ValueError, match="does not fit"):
        opt.step()
    assert not opt.state.get(a)


@pytest.mark.parametrize("cls", [Adapprox, AdaMeM])
def test_stochastic_rounding_keys_do_not_scan_the_groups_per_bucket(cls):
    """Each bucket's rounding keys need its group's position among the param groups: found by
    a scan of the groups for every bucket of every group, quadratic in the groups (~0.3 s a step
    with 2,000). Counted by the groups the step walks through."""

    class Groups(list):
        walked = 0

        def __iter__(self):
            for g in super().__iter__():
                Groups.walked += 1
                yield g

    n = 100
    params = [torch.nn.Parameter(torch.randn(6, 8, dtype=torch.bfloat16)) for _ in range(n)]
    kw = dict(k_max=2) if cls is Adapprox else dict(rank=2)
    opt = cls([{"params": [p]} for p in params], seed=0, bf16_stochastic_round=True, **kw)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        Groups.walked = 0
        opt.step()
        opt.param_groups = Groups(opt.param_groups)
    assert Groups.walked <= 10 * n, f"{Groups.walked} groups walked in a step of {n} groups"


@pytest.mark.parametrize("cls", [Adapprox, AdaMeM])
def test_adding_groups_one_by_one_does_not_recheck_every_group(cls):
    """Each group added after the constructor looked at every parameter of every group for
    FSDP1's flattening mark: quadratic in groups added one by one. Counted by the marks read."""
    read = []

    class Param(torch.nn.Parameter):
        @property
        def _fsdp_flattened(self):
            read.append(1)
            return False

    n = 100
    params = [Param(torch.randn(6, 8)) for _ in range(n)]
    opt = cls([params[0]], seed=0)
    read.clear()
    for p in params[1:]:
        opt.add_param_group({"params": [p]})
    assert len(read) <= 3 * n, f"{len(read)} marks read adding {n - 1} groups"


@pytest.mark.parametrize("cls,kw,factory", [(Adapprox, dict(k_max=2), "zeros_like"), (AdaMeM, dict(rank=2), "zeros")])
def test_running_out_of_memory_while_making_a_state_leaves_no_half_made_state(cls, kw, factory):
    """An out-of-memory error (or Ctrl-C) between a state's first entries and its last left
    that state half made: every later step raised (a KeyError, or "does not fit"), and so did
    loading a checkpoint saved then."""
    import importlib
    from unittest import mock

    module = importlib.import_module(cls.__module__)
    params = [torch.nn.Parameter(torch.randn(12, 10)), torch.nn.Parameter(torch.randn(5))]
    opt = cls(params, seed=0, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    made, real = [], getattr(torch, factory)

    def flaky(*args, **kwargs):
        made.append(1)
        if len(made) == 2:
            raise torch.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    with mock.patch.object(module.torch, factory, flaky), pytest.raises(torch.OutOfMemoryError):
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt.step()
    twin = cls([torch.nn.Parameter(p.detach().clone()) for p in params], seed=0, **kw)
    twin.load_state_dict(saved)


def test_warm_start_replaces_columns_of_rounding_noise():
    """A column of last step's U at rounding-noise level (V of exactly lower rank than the
    factors) carries no direction, as an all-zero one does: the Gaussian column takes its place."""
    from adapprox_kernels.adapprox import _warm_sketch

    gen = torch.Generator().manual_seed(0)
    u, gauss = torch.randn(2, 10, 3, generator=gen), torch.randn(2, 10, 5, generator=gen)
    u[0, :, 2] *= 1e-8  # noise
    u[1, :, 1] = 0.0  # all zero
    u[1, :, 2] *= 1e-3  # small but real
    out = _warm_sketch(u, gauss, torch.ones(2, 1, 5, dtype=torch.bool))
    assert torch.equal(out[0, :, :2], u[0, :, :2]) and torch.equal(out[0, :, 2:], gauss[0, :, 2:])
    assert torch.equal(out[1, :, 0], u[1, :, 0]) and torch.equal(out[1, :, 1], gauss[1, :, 1])
    assert torch.equal(out[1, :, 2], u[1, :, 2]) and torch.equal(out[1, :, 3:], gauss[1, :, 3:])


def test_rayleigh_ritz_truncation_in_the_optimizer():
    """``truncation="rayleigh_ritz"``: the same first step (same sketch, same V) gives a ξ no
    larger than the paper's QR truncation, and smaller at one power iteration; a bad value is
    refused; an overflowed V still only warns (eigh is not handed a non-finite Gram)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(40, 6, generator=gen) @ torch.diag(torch.logspace(0, -1, 6)) @ torch.randn(6, 50, generator=gen)
    g = g + 0.1 * torch.randn(40, 50, generator=gen)
    xis = {}
    for truncation in ("qr", "rayleigh_ritz"):
        p = torch.nn.Parameter(torch.zeros(40, 50))
        opt = Adapprox([p], k_max=4, power_iters=1, seed=0, backend="reference", truncation=truncation)
        p.grad = g.clone()
        opt.step()
        xis[truncation] = opt.state[p]["xi"]
        assert opt.state[p]["Q"].shape == (40, 4)
    assert xis["rayleigh_ritz"] < 0.97 * xis["qr"], xis
    with pytest.raises(ValueError, match="truncation"):
        Adapprox([torch.nn.Parameter(torch.zeros(4, 4))], truncation="svd")
    p, opt, warned = overflowing_second_moment_run("reference", truncation="rayleigh_ritz")
    assert warned and torch.isfinite(p).all() and torch.isfinite(opt.state[p]["Q"]).all()
