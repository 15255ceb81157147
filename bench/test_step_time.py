"""Table 4 under pytest-benchmark: one optimizer step on one GPT-2 124M / 345M transformer block,
Adapprox next to its peers (the cases of :mod:`bench.table4_step_time`).

Deselected by default (marker ``benchmark``); run with

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m pytest bench/test_step_time.py -m benchmark \
        --benchmark-enable --benchmark-json=bench/results/table4_pytest_benchmark_cpu.json
"""

from __future__ import annotations

import pytest
import torch

from . import common, peers
from .table1_srsi_time import load_backends
from .table4_step_time import SIZES, build_case, cases

pytestmark = pytest.mark.benchmark
DEVICE = torch.device("cpu")
CASES = cases(DEVICE, load_backends())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", CASES, ids=[c["label"] for c in CASES])
def test_step_time(benchmark, size, case):
    if case["reason"] is not None:
        pytest.skip(case["reason"])
    named = peers.block_params(size, DEVICE)
    opt = build_case(case, named, size)
    opt.step()  # state creation and GaLore's first SVD stay outside the timing
    before = [p.detach().clone() for _, p in named]
    benchmark.extra_info.update(common.metadata(DEVICE, size=size, scope="one transformer block"))
    benchmark.pedantic(opt.step, rounds=3, warmup_rounds=1, iterations=1)
    # The timed steps did move the parameters, and left them finite.
    assert any(not torch.equal(b, p) for b, (_, p) in zip(before, named))
    assert all(torch.isfinite(p).all() for _, p in named)
