"""Resumed in a new process: N steps straight in one process equal N/2 steps in a second, a
``torch.save`` checkpoint, and N/2 more in a third that loads it, bit for bit, each process
with its own ``PYTHONHASHSEED`` (str hashing, so the order of sets of names, differs between
them). ``test_resume.py`` resumes inside one process, where every memo, cache and ``id`` of
the first half is still there."""

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

CHILD = r"""
import sys
import torch
from test_resume import EVENTS, _params, _set_grads
from adapprox_kernels import AdaMeM, Adapprox

mode, path = sys.argv[1], sys.argv[2]
N = 8
SHAPES = [(24, 30), (24, 30), (30, 24), (16, 8, 3), (7,), (24, 30), (6, 5)]


def make(name, ps):
    if name == "adapprox":
        return Adapprox([
            {"params": ps[:2], "rank_policy": "sigmoid", "rank_interval": 2, "xi_thresh": 0.05, "warm_start": True},
            {"params": ps[2:5], "betas": (0.0, 0.99, 0.9), "bf16_stochastic_round": True},
            {"params": ps[5:], "lr": 3e-3, "cosine_guidance": True},
        ], lr=1e-2, k_max=6, oversample=2, xi_thresh=0.12, seed=None, nonfinite="skip", backend="reference")
    return AdaMeM([{"params": ps[:4]}, {"params": ps[4:], "lr": 3e-3}], lr=1e-2, rank=3, update_proj_gap=3,
                  seed=None, nonfinite="skip", bf16_stochastic_round=True)


torch.manual_seed(0 if mode != "resume" else 1)  # seed=None: the resumed optimizer's own draw must not count
for name in ("adapprox", "adamem"):
    ps = _params(torch.bfloat16, SHAPES)
    opt = make(name, ps)
    steps = range(N) if mode == "straight" else range(N // 2)
    if mode == "resume":
        ckpt = torch.load(path + "." + name, weights_only=True)
        with torch.no_grad():
            for p, saved in zip(ps, ckpt["model"]):
                p.copy_(saved)
        opt.load_state_dict(ckpt["opt"])
        steps = range(N // 2, N)
    for t in steps:
        _set_grads(ps, t, EVENTS)
        opt.step()
    saved = {"model": [p.detach() for p in ps], "opt": opt.state_dict()}
    torch.save(saved, path + "." + name if mode == "first" else path + "." + mode + "." + name)
"""


def _same(a, b, where):
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert sorted(map(str, a)) == sorted(map(str, b)), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and (a == b or a != a and b != b), where


def test_a_run_resumed_in_new_processes_with_other_hash_seeds_is_bit_identical(tmp_path):
    script, path = tmp_path / "child.py", str(tmp_path / "ckpt")
    script.write_text(CHILD)
    root = str(HERE.parent)
    pythonpath = os.pathsep.join([str(HERE), root, os.environ.get("PYTHONPATH", "")])
    for mode, hash_seed in (("straight", "1"), ("first", "2"), ("resume", "3")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(script), mode, path]
        done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in ("adapprox", "adamem"):
        straight = torch.load(f"{path}.straight.{name}", weights_only=True)
        resumed = torch.load(f"{path}.resume.{name}", weights_only=True)
        _same(straight, resumed, name)
