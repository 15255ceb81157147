"""Real second-moment matrices: AdamW's ``exp_avg_sq`` captured while training the main job's
model (the paper captures them from GPT-2 345M; here the main job's small byte-level GPT).

The capture trains for a few hundred steps on CPU, so it is cached under
``bench/results/cache/`` (not committed) and shared by Figure 2 and Tables 6/7.
"""

from __future__ import annotations

import hashlib
import json
import time

import torch

from adapprox_kernels.train.data import ByteBatches, read_corpus
from adapprox_kernels.train.model import GPT, SIZES
from adapprox_kernels.train.optimizers import build_optimizer, default_lrs
from adapprox_kernels.train.runner import matrix_type, warmup_cosine

from . import common

CACHE = common.RESULTS / "cache"
MATRIX_TYPES = ("qkv", "proj", "fc", "fc_out", "tok")


def _captured(name: str, n_layer: int) -> bool:
    """The first and last block's matrices and the token embedding."""
    if name == "tok.weight":
        return True
    parts = name.split(".")
    return parts[0] == "blocks" and int(parts[1]) in (0, n_layer - 1) and parts[-1] == "weight" and (
        matrix_type(name) in MATRIX_TYPES
    )  # fmt: skip


def capture(
    size: str = "small",
    steps: tuple[int, ...] = (50, 200),
    batch_size: int = 8,
    seed: int = 0,
    max_bytes: int = 2_000_000,
    use_cache: bool = True,
) -> dict:
    """Train a fresh ``SIZES[size]`` GPT with the main job's AdamW (its default lr, warmup 20 +
    cosine over ``max(steps)``) and copy ``exp_avg_sq`` of the captured matrices at each step
    in ``steps``.

    Returns ``{"meta": {...}, "matrices": [{"name", "type", "step", "shape", "v"}]}``, ``v`` an
    fp32 ``(m, n)`` tensor."""
    args = dict(size=size, steps=list(steps), batch_size=batch_size, seed=seed, max_bytes=max_bytes)
    key = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
    path = CACHE / f"second_moments_{key}.pt"
    if use_cache and path.exists():
        return torch.load(path, weights_only=True)
    cfg = SIZES[size]
    corpus = read_corpus(None, max_bytes)
    data = ByteBatches(corpus, cfg.seq_len, batch_size, seed=seed)
    torch.manual_seed(seed)
    model = GPT(cfg)
    lr = default_lrs()["adamw"]
    opt = build_optimizer("adamw", model, lr, "cpu", k_max=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(20, max(steps)))
    named = [(n, p) for n, p in model.named_parameters() if _captured(n, cfg.n_layer)]
    matrices, losses = [], []
    t0 = time.perf_counter()
    for step in range(1, max(steps) + 1):
        loss = model.loss(data.train_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step in steps:
            for name, p in named:
                v = opt.state[p]["exp_avg_sq"].detach().clone()
                matrices.append(dict(name=name, type=matrix_type(name), step=step, shape=list(v.shape), v=v))
            print(f"captured {len(named)} second moments at step {step} (train loss {loss.item():.3f})")
    meta = dict(args, lr=lr, optimizer="torch.optim.AdamW, betas (0.9, 0.999), main job's settings",
                train_seconds=time.perf_counter() - t0, final_train_loss=losses[-1])  # fmt: skip
    out = {"meta": meta, "matrices": matrices}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out
