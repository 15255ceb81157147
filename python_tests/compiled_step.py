"""``torch.compile(opt.step)`` (PyTorch's recipe for compiling an optimizer) against the eager
step: the tests of both optimizers run the same few steps both ways."""

import warnings

import torch


def eager_and_compiled(make_optimizer, shapes, backend: str, steps: int) -> list[list[torch.nn.Parameter]]:
    """The parameters after ``steps`` steps of ``make_optimizer(params)``, eager and with the
    step compiled by ``backend``, from the same seeds and gradients: ``[eager, compiled]``."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = make_optimizer(params)
        step = torch.compile(opt.step, backend=backend) if compiled else opt.step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dynamo's notes on graph breaks
            for _ in range(steps):
                for p in params:
                    p.grad = torch.randn_like(p)
                step()
        runs.append(params)
    return runs
