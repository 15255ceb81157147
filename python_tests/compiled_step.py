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
