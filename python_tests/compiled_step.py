"""``torch.compile(opt.step)`` (PyTorch's recipe for compiling an optimizer) against the eager
step: the tests of both optimizers run the same few steps both ways."""

import warnings

import torch


def eager_and_compiled(
    make_optimizer, shapes, backend: str, steps: int, dtype=torch.float32, device="cpu"
) -> list[list[torch.nn.Parameter]]:
    """The parameters (of ``dtype``, on ``device``) after ``steps`` steps of
    ``make_optimizer(params)``, eager and with the step compiled by ``backend``, from the same
    seeds and gradients: ``[eager, compiled]``.
    Dynamo may note graph breaks, not that it traced through a cache of ours (it ignores
    caches, which could be wrong)."""
    runs = []
    # Dynamo warns of each thing once per process (its private cache; without it, a test run
    # that had warned before would pass here unchecked).
    getattr(torch._dynamo.utils, "warn_once_cache", set()).clear()
    # A fresh dynamo, as in a new process: its compiled frames and recompile counts are per code
    # object and process-wide, so earlier tests' compiles would change which frames it traces.
    torch._dynamo.reset()
    for compiled in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s).to(dtype).to(device)) for s in shapes]
        opt = make_optimizer(params)
        step = torch.compile(opt.step, backend=backend) if compiled else opt.step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                for p in params:
                    p.grad = torch.randn(p.shape).to(dtype).to(device)
                step()
        assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
        runs.append(params)
    return runs


def graphs_per_step(
    make_optimizer,
    shapes,
    backend: str,
    steps: int,
    dtype=torch.float32,
    grad=torch.randn,
    after_step=None,
    device="cpu",
    place=lambda t: t,
) -> tuple[list[tuple[int, int]], list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """``torch.compile(opt.step, backend=backend)`` for ``steps`` steps, each with new gradient
    tensors (``grad(shape)``, as a backward pass after ``zero_grad()`` makes them), with
    ``after_step(opt)`` after each (a scheduler's writes): per step, how many frames dynamo
    traced (compiled or recompiled, whether or not they made a graph) and how many compiled
    graphs ran, then the parameters, eager and compiled, from the same seeds and gradients. A
    frame that dynamo recompiles every step shows as traced on every step (one that makes no
    graph too: torch 2.8 recompiled such a frame every step, which no graph count showed);
    one that hit its recompile limit, which dynamo only logs and then runs eagerly for good,
    as fewer graphs run (and, where torch has the switch, as an error). ``place``: what each
    parameter and gradient tensor becomes (a DTensor: ``distribute_tensor``)."""
    from torch._dynamo.utils import counters
    from torch._dynamo.backends.registry import lookup_backend

    compile_graph = lookup_backend(backend)
    counts = {"ran": 0}

    def counting(gm, example_inputs):
        compiled = compile_graph(gm, example_inputs)

        def run(*args):
            counts["ran"] += 1
            return compiled(*args)

        return run

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    grads = [[place(grad(s, generator=gen).to(dtype).to(device)) for s in shapes] for _ in range(steps)]
    runs, per_step = [], []
    config = (
        {"fail_on_recompile_limit_hit": True} if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit") else {}
    )
    for compiled in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(place(torch.randn(s).to(dtype).to(device))) for s in shapes]
        opt = make_optimizer(params)
        step = torch.compile(opt.step, backend=counting) if compiled else opt.step
        with torch._dynamo.config.patch(**config):
            for gs in grads:
                for p, g in zip(params, gs):
                    p.grad = g.clone()
                before, traced = dict(counts), counters["frames"]["total"]
                step()
                if compiled:
                    per_step.append((counters["frames"]["total"] - traced, counts["ran"] - before["ran"]))
                if after_step is not None:
                    after_step(opt)
        runs.append(params)
    return per_step, *runs
