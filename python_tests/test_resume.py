"""Checkpoint/resume: N steps straight equal N/2 steps, ``torch.save(state_dict)``, ``torch.load``
into a fresh model and optimizer, and N/2 more, bit for bit in every parameter, every state
entry and the sketch RNG, across the options and events around the save point (ranks moving,
idle parameters, skipped non-finite gradients, bf16 stochastic rounding, several groups, a
group added after the save, AdaMeM's pending projection refresh)."""

import io
import math

import pytest
import torch

from adapprox_kernels import AdaMeM, Adapprox

SHAPES = [(24, 30), (24, 30), (30, 24), (16, 8, 3), (7,), (6, 5)]
# Around the save points: non-finite gradients (skipped), parameters without a gradient, and
# all-zero gradients on AdaMeM's refresh steps (its refresh goes pending).
EVENTS = {
    (2, 0): "zero", (3, 0): "nan", (4, 4): "nan", (4, 1): "none", (5, 0): "none", (5, 3): "none",
    (6, 2): "nan", (6, 1): "zero", (7, 2): "none", (3, 5): "zero", (6, 5): "zero",
}  # fmt: skip


def _params(dtype, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _set_grads(params, step, events):
    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(1000 * step + i)
        if p.dim() >= 2:  # about rank 2 plus noise that varies: the ranks move
            m = p.shape[0]
            a, b = torch.randn(m, 2, generator=gen), torch.randn(2, p.numel() // m, generator=gen)
            g = (a @ b + 0.05 * (1 + step % 3) * torch.randn(m, p.numel() // m, generator=gen)).reshape(p.shape)
        else:
            g = torch.randn(p.shape, generator=gen)
        kind = events.get((step, i))
        if kind == "nan":
            g.view(-1)[3] = float("nan")
        elif kind == "zero":
            g.zero_()
        p.grad = None if kind == "none" else g.to(p.dtype)


def _train(opt, params, steps, events, hook=None):
    for t in steps:
        _set_grads(params, t, events)
        if hook is not None:
            hook(t, opt, params)
        opt.step()


def _same(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (
            torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))
        )  # fmt: skip
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _assert_same_runs(opt_a, params_a, opt_b, params_b, where):
    for i, (x, y) in enumerate(zip(params_a, params_b)):
        assert _same(x.detach(), y.detach()), f"{where}: parameter {i}"
        sa, sb = opt_a.state.get(x, {}), opt_b.state.get(y, {})
        assert sorted(sa) == sorted(sb), f"{where}: state {i} keys"
        for k in sa:
            assert _same(sa[k], sb[k]), f"{where}: state {i}[{k!r}]"
    ra, rb = opt_a.state_dict()["sketch_rng"], opt_b.state_dict()["sketch_rng"]
    assert ra["seed"] == rb["seed"] and sorted(ra["states"]) == sorted(rb["states"]), where
    assert all(torch.equal(ra["states"][k], rb["states"][k]) for k in ra["states"]), f"{where}: sketch RNG"


def _check_resume(make, n, save_points, dtype=torch.float32, shapes=SHAPES, events=EVENTS, hook=None, make_fresh=None):
    straight = _params(dtype, shapes)
    opt = make(straight)
    _train(opt, straight, range(n), events, hook)
    for save_at in save_points:
        params = _params(dtype, shapes)
        first = make(params)
        _train(first, params, range(save_at), events, hook)
        buf = io.BytesIO()
        torch.save({"model": [p.detach() for p in params], "opt": first.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        resumed = _params(dtype, shapes, seed=1)
        with torch.no_grad():
            for p, saved in zip(resumed, ckpt["model"]):
                p.copy_(saved)
        second = (make_fresh or make)(resumed)
        second.load_state_dict(ckpt["opt"])
        _train(second, resumed, range(save_at, n), events, hook)
        _assert_same_runs(opt, straight, second, resumed, f"saved after step {save_at}")


def _adapprox(**kw):
    base = dict(lr=1e-2, k_max=6, oversample=2, xi_thresh=0.12, seed=7, nonfinite="skip", backend="reference")
    return lambda params: Adapprox(params, **{**base, **kw})


def _adamem(**kw):
    base = dict(lr=1e-2, rank=3, update_proj_gap=3, seed=7, nonfinite="skip")
    return lambda params: AdaMeM(params, **{**base, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(betas=(0.0, 0.999, 0.9), warm_start=True),
        dict(rank_policy="sigmoid", rank_interval=2, xi_thresh=0.05, warm_start=True),
        dict(cosine_guidance=True, maximize=True, weight_decay=0.3),
    ],
    ids=["step", "beta1=0-warm", "sigmoid-warm", "cosine-maximize"],
)
def test_adapprox_resumes_bit_exactly_around_events(kw):
    _check_resume(_adapprox(**kw), 9, range(9))


@pytest.mark.parametrize("kw", [dict(), dict(projection="svd", momentum_transfer="rotate", update_proj_gap=1)])
def test_adamem_resumes_bit_exactly_across_pending_refreshes(kw):
    _check_resume(_adamem(**kw), 9, range(9))


@pytest.mark.parametrize("make", [_adapprox, _adamem], ids=["adapprox", "adamem"])
def test_bf16_stochastic_rounding_resumes_bit_exactly(make):
    _check_resume(make(bf16_stochastic_round=True), 7, (0, 3, 5), dtype=torch.bfloat16)


def test_param_groups_with_their_own_options_resume_bit_exactly():
    def make(params):
        return Adapprox([
            {"params": params[:2], "rank_policy": "sigmoid", "rank_interval": 2, "xi_thresh": 0.05, "warm_start": True},
            {"params": params[2:4], "betas": (0.0, 0.99, 0.9), "maximize": True, "bf16_stochastic_round": True},
            {"params": params[4:], "lr": 3e-3, "cosine_guidance": True},
        ], lr=1e-2, k_max=6, oversample=2, xi_thresh=0.12, seed=7, nonfinite="skip", backend="reference")  # fmt: skip

    _check_resume(make, 8, (0, 4, 6), dtype=torch.bfloat16)


@pytest.mark.parametrize("cls", [Adapprox, AdaMeM])
def test_a_param_group_added_after_the_checkpoint_resumes_bit_exactly(cls):
    """The straight run adds the group at the save step; the resumed one right after loading."""
    shapes = [*SHAPES, (24, 30), (5,)]
    make = _adapprox(bf16_stochastic_round=True) if cls is Adapprox else _adamem(bf16_stochastic_round=True)
    for save_at in (0, 4):

        def add(t, opt, params, save_at=save_at):
            if t == save_at and len(opt.param_groups) == 1:
                opt.add_param_group({"params": params[-2:], "lr": 3e-3})

        _check_resume(lambda ps: make(ps[:-2]), 7, (save_at,), torch.bfloat16, shapes, hook=add)


@pytest.mark.parametrize("cls", [Adapprox, AdaMeM])
def test_the_saved_hyperparameters_win_over_the_loading_optimizers(cls):
    if cls is Adapprox:
        make, other = _adapprox(warm_start=True), _adapprox(lr=0.5, k_max=3, warm_start=False, seed=1, maximize=True)
    else:
        make, other = _adamem(), _adamem(lr=0.5, rank=2, update_proj_gap=7, projection="svd", seed=1, maximize=True)
    _check_resume(make, 7, (3,), make_fresh=other)


@pytest.mark.parametrize("make", [_adapprox(warm_start=True), _adamem()], ids=["adapprox", "adamem"])
def test_state_dict_calls_change_nothing(make):
    """Calling ``state_dict()`` every step (and copying it) leaves the run as it was."""
    plain, probed = _params(torch.float32), _params(torch.float32)
    opt, opt_probed = make(plain), make(probed)
    _train(opt, plain, range(7), EVENTS)
    _train(opt_probed, probed, range(7), EVENTS, hook=lambda t, o, ps: torch.save(o.state_dict(), io.BytesIO()))
    _assert_same_runs(opt, plain, opt_probed, probed, "state_dict() every step")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [Adapprox, AdaMeM])
def test_a_checkpoint_loaded_with_map_location_cuda_resumes(cls):
    """``torch.load(..., map_location="cuda")`` puts every tensor on the GPU, the sketch RNG's
    ByteTensor states too, which ``Generator.set_state`` takes only on the CPU."""
    kw = dict(k_max=4, backend="reference") if cls is Adapprox else dict(rank=2, update_proj_gap=2)

    def make(params):
        return cls(params, seed=3, **kw)

    torch.manual_seed(0)
    grads = [torch.randn(24, 30, device="cuda") for _ in range(6)]
    straight = torch.nn.Parameter(torch.randn(24, 30, device="cuda"))
    first = torch.nn.Parameter(straight.detach().clone())
    opt, opt_first = make([straight]), make([first])
    for t, g in enumerate(grads):
        straight.grad = g.clone()
        opt.step()
        if t < 3:
            first.grad = g.clone()
            opt_first.step()
    buf = io.BytesIO()
    torch.save(opt_first.state_dict(), buf)
    buf.seek(0)
    resumed = torch.nn.Parameter(first.detach().clone())
    opt_resumed = make([resumed])
    opt_resumed.load_state_dict(torch.load(buf, map_location="cuda"))
    for g in grads[3:]:
        resumed.grad = g.clone()
        opt_resumed.step()
    assert torch.equal(straight, resumed)
    rng, rng_resumed = opt.state_dict()["sketch_rng"]["states"], opt_resumed.state_dict()["sketch_rng"]["states"]
    assert torch.equal(rng["cuda:0"], rng_resumed["cuda:0"])


@pytest.mark.parametrize(
    "bad",
    ["state", {"seed": 3}, {"seed": 1.5, "states": {}}, {"seed": 3, "states": {"cpu": torch.zeros(4)}},
     {"seed": 3, "states": {"not a device": torch.zeros(4, dtype=torch.uint8)}},
     # torch's generators refuse these: they failed after the state had loaded, the seed kept
     {"seed": 2**64, "states": {}}, {"seed": 3, "states": {"cpu": torch.zeros(4, dtype=torch.uint8)}}],
)  # fmt: skip
@pytest.mark.parametrize("make", [_adapprox(), _adamem()], ids=["adapprox", "adamem"])
def test_a_malformed_sketch_rng_is_refused_before_anything_loads(make, bad):
    params = _params(torch.float32)
    opt = make(params)
    _train(opt, params, range(2), {})
    saved = opt.state_dict()
    saved["sketch_rng"] = bad
    fresh = make(_params(torch.float32))
    with pytest.raises(ValueError, match="sketch_rng"):
        fresh.load_state_dict(saved)
    assert not fresh.state and fresh.param_groups[0]["lr"] == 1e-2


@pytest.mark.parametrize("make", [_adapprox(), _adamem()], ids=["adapprox", "adamem"])
def test_a_load_makes_each_saved_generator_once(make, monkeypatch):
    """The generators that the check of the saved sketch RNG makes are the ones installed (they
    were made a second time after the load), and they draw on where the saved ones left off."""
    from adapprox_kernels import checkpoint

    params = _params(torch.float32)
    opt = make(params)
    _train(opt, params, range(2), {})
    saved = opt.state_dict()
    fresh = make(_params(torch.float32))
    made, seeded = [], checkpoint._seeded_generator
    monkeypatch.setattr(checkpoint, "_seeded_generator", lambda *args: made.append(args) or seeded(*args))
    fresh.load_state_dict(saved)
    assert made == [(torch.device("cpu"), saved["sketch_rng"]["seed"])]
    assert torch.equal(
        fresh._generator(torch.device("cpu")).get_state(), opt._generator(torch.device("cpu")).get_state()
    )


@pytest.mark.parametrize(
    "make,warns",
    [(_adapprox(), True), (_adamem(), True), (_adamem(projection="svd"), False)],
    ids=["adapprox", "adamem", "adamem-svd"],
)
def test_a_checkpoint_without_the_sketch_rng_loads_with_a_warning(make, warns):
    """torch's ``get_optimizer_state_dict`` (and ZeRO's consolidated dict) drop ``sketch_rng``:
    the state loads, but the sketches from there on differ from the uninterrupted run's, which
    only ``distributed.load_optimizer_state`` used to say. Not where no step draws a sketch
    (AdaMeM's SVD projection), nor for a dict with the RNG, nor one without state."""
    import warnings

    params = _params(torch.float32)
    opt = make(params)
    _train(opt, params, range(2), {})
    without = {k: v for k, v in opt.state_dict().items() if k != "sketch_rng"}
    for saved, expected in ((without, warns), (opt.state_dict(), False), (make(params).state_dict(), False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make(_params(torch.float32)).load_state_dict(saved)
        messages = [str(w.message) for w in caught if "no sketch RNG" in str(w.message)]
        assert len(messages) == expected, messages
        assert all(
            m.startswith(f"{type(opt).__name__}.load_state_dict: the checkpoint has no sketch RNG") for m in messages
        )
        # It names the caller's line, not a frame of torch's hooks (torch/_compile.py).
        assert all(w.filename == __file__ for w in caught if "no sketch RNG" in str(w.message))


@pytest.mark.parametrize("saved,loader,warns", [("srsi", "svd", True), ("svd", "srsi", False)])
def test_the_sketch_rng_warning_follows_the_loaded_projection(saved, loader, warns):
    """The saved param groups replace the loading optimizer's, ``projection`` among them: the
    resumed run draws sketches where the checkpoint's projection does (an SVD optimizer that
    loaded an S-RSI checkpoint without its RNG said nothing, and resumed on other sketches)."""
    import warnings

    params = _params(torch.float32)
    opt = _adamem(projection=saved)(params)
    _train(opt, params, range(2), {})
    without = {k: v for k, v in opt.state_dict().items() if k != "sketch_rng"}
    fresh = _adamem(projection=loader)(_params(torch.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_state_dict(without)
    assert fresh.param_groups[0]["projection"] == saved
    assert any("no sketch RNG" in str(w.message) for w in caught) == warns


# Options added after the first release (an optimizer pickled before them has none in its
# defaults or groups), and the AdaMeM matrix entries added later (param_shape, proj_pending).
# No zero gradients: versions without proj_pending made no refresh pending.
_LEGACY_EVENTS = {k: v for k, v in EVENTS.items() if v != "zero"}
_LATER_OPTIONS = {
    Adapprox: (
        "warm_start",
        "warm_power_iters",
        "cuda_graphs",
        "product_precision",
        "maximize",
        "bf16_stochastic_round",
    ),
    AdaMeM: ("maximize", "bf16_stochastic_round"),
}


@pytest.mark.parametrize("make", [_adapprox(), _adamem()], ids=["adapprox", "adamem"])
def test_an_optimizer_pickled_by_an_older_version_steps_on(make):
    """``torch.save(opt)`` by a version without the later options (and, for AdaMeM, without the
    matrix states' ``param_shape`` and ``proj_pending``) unpickled by this one: its defaults and
    groups take the constructor's defaults for the options they lack, its states the entries
    load_state_dict gives a legacy checkpoint, and it steps as the original does (the step
    raised KeyError on the first missing option, then on 'proj_pending')."""
    import pickle

    params = _params(torch.float32)
    opt = make(params)
    _train(opt, params, range(4), _LEGACY_EVENTS)
    old = pickle.loads(pickle.dumps((params, opt)))
    pickled = old[1].__getstate__()
    for d in (pickled["defaults"], *pickled["param_groups"]):
        for key in _LATER_OPTIONS[type(opt)]:
            del d[key]
    for state in pickled["state"].values():
        state.pop("param_shape", None), state.pop("proj_pending", None)
    unpickled = type(opt).__new__(type(opt))
    unpickled.__setstate__(pickled)
    _train(opt, params, range(4, 8), _LEGACY_EVENTS)
    _train(unpickled, old[0], range(4, 8), _LEGACY_EVENTS)
    assert unpickled.defaults == opt.defaults
    _assert_same_runs(opt, params, unpickled, old[0], "unpickled")


@pytest.mark.parametrize("missing", [("param_shape", "proj_pending"), ("proj_pending",)])
def test_adamem_states_of_an_older_version_set_directly_step_on(missing):
    """ZeroRedundancyOptimizer.load_state_dict sets its optimizer's state directly, past
    load_state_dict's migration: a matrix state saved by a version without ``param_shape`` and
    ``proj_pending`` (or, a later one, without ``proj_pending``) then reached the step, which
    raised KeyError('proj_pending'). The step fills them as load_state_dict does."""
    make = _adamem()
    params, other = _params(torch.float32), _params(torch.float32)
    opt, legacy = make(params), make(other)
    _train(opt, params, range(4), _LEGACY_EVENTS)
    legacy.load_state_dict(opt.state_dict())
    with torch.no_grad():
        for p, q in zip(params, other):
            q.copy_(p)
    for p in other:
        state = dict(legacy.state[p])
        for key in missing:
            state.pop(key, None)
        legacy.state[p] = state  # as ZeRO does
    _train(opt, params, range(4, 8), _LEGACY_EVENTS)
    _train(legacy, other, range(4, 8), _LEGACY_EVENTS)
    _assert_same_runs(opt, params, legacy, other, "legacy states set directly")
