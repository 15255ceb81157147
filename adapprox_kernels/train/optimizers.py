"""The optimizers the main job compares, each built from its own package at a sensible lr.

Learning rates differ on purpose: Adapprox's clipped update has RMS ≈ 1 (larger than Adam's),
torch's Adafactor treats ``lr`` as a relative step size, and CAME's README recommends a smaller
lr than AdamW's. Each default below is the one the project's plan for the main job set for this
small-model setting, except AdaMeM's, picked from 600-step CPU runs at 5e-3 / 2e-3 / 1e-3 / 5e-4
(validation loss 2.740 / 2.464 / 2.267 / 2.254 at 52a8128,
``bench/results/main_job_variants_cpu/adamem_lr*.json``). Override with ``--lr name=value``.

Weight decay, also as set for each (never on biases and LayerNorm weights): AdamW and Adapprox
0.1 on matrices and embeddings, CAME 0.01, Adafactor, Adafactor with momentum, AdaMeM and
GaLore none. ``seed`` (the job's ``--seed``) seeds Adapprox's and AdaMeM's own sketch RNGs.
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch
from torch import nn

from ..adamem import AdaMeM
from ..adapprox import Adapprox

# galore-torch imports bitsandbytes, whose CPU backend logs a warning at import on CPUs with
# AVX512-BF16 ("Failed to load CPU gemm_4bit_forward …") that read as a failure at the top of the
# job's output: the job runs no 4-bit op.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms), as in GPT-2 practice.
    Parameters are passed with their names so reports can show them."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [(n, p) for n, p in named if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [(n, p) for n, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]


def _plain(groups: list[dict]) -> list[dict]:
    """The same groups without parameter names, for optimizers that do not take them."""
    return [dict(g, params=[p for _, p in g["params"]]) for g in groups]


def _lowrank_rank(model: nn.Module) -> int:
    """Rank of AdaMeM and GaLore: a quarter of the model width (GaLore's README ratio)."""
    return max(model.cfg.d_model // 4, 1)


def _adamw(model, lr, device, k_max, seed):
    return torch.optim.AdamW(_groups(model, 0.1), lr=lr, betas=(0.9, 0.999), fused=device.startswith("cuda"))


def _adapprox(model, lr, device, k_max, seed):
    # On a GPU, steps whose shapes repeat replay from CUDA graphs (same results, less host time).
    return Adapprox(
        _groups(model, 0.1), lr=lr, k_init=k_max, k_max=k_max, seed=seed, cuda_graphs=device.startswith("cuda")
    )


def _adafactor(model, lr, device, k_max, seed):
    return torch.optim.Adafactor(_groups(model, 0.0), lr=lr)


def _came(model, lr, device, k_max, seed):
    from came_pytorch import CAME  # the came-pytorch package, settings from its README

    return CAME(_plain(_groups(model, 0.01)), lr=lr, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))


def _adamem(model, lr, device, k_max, seed):
    return AdaMeM(_groups(model, 0.0), lr=lr, rank=_lowrank_rank(model), seed=seed)


def _adafactor_momentum(model, lr, device, k_max, seed):
    # torch's Adafactor has no β1; Hugging Face's (transformers, installed with galore-torch)
    # does. Absolute lr, no parameter scaling; its β2 follows its fixed 1 − t^−0.8 schedule.
    from transformers.optimization import Adafactor

    return Adafactor(
        _plain(_groups(model, 0.0)), lr=lr, beta1=0.9, relative_step=False, scale_parameter=False, warmup_init=False
    )


def _galore(model, lr, device, k_max, seed):
    from galore_torch import GaLoreAdamW  # the galore-torch package, settings from its README

    # As in that README, only the attention and MLP Linear weights are projected; the embeddings
    # (and the vectors) take plain AdamW steps.
    linear = [m.weight for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    projected = {id(p) for p in linear}
    groups = _plain(_groups(model, 0.0))
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in projected]
    galore = {"params": linear, "weight_decay": 0.0, "rank": _lowrank_rank(model), "update_proj_gap": 200,
              "scale": 0.25, "proj_type": "std"}  # fmt: skip
    return GaLoreAdamW([galore, *(g for g in groups if g["params"])], lr=lr, no_deprecation_warning=True)


OPTIMIZERS: dict[str, Callable] = {
    "adapprox": _adapprox,
    "adamw": _adamw,
    "adafactor": _adafactor,
    "came": _came,
    "adamem": _adamem,
    "adafactor-m": _adafactor_momentum,
    "galore": _galore,
}


# The optimizers that come from peer packages: name -> (module imported, package to install).
PEER_PACKAGES = {
    "came": ("came_pytorch", "came-pytorch"),
    "adafactor-m": ("transformers.optimization", "transformers"),
    "galore": ("galore_torch", "galore-torch"),
}


def missing_peers(names: list[str]) -> list[str]:
    """For each of ``names`` whose peer package does not import: what to install, and why."""
    missing = []
    for name in names:
        if name not in PEER_PACKAGES:
            continue
        module, package = PEER_PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{name} needs the {package} package: pip install {package} ({e})")
    return missing


def default_lrs() -> dict[str, float]:
    return {
        "adapprox": 2e-3, "adamw": 2e-3, "adafactor": 5e-2, "came": 2e-4,
        "adamem": 5e-4, "adafactor-m": 2e-3, "galore": 1e-2,
    }  # fmt: skip


def build_optimizer(
    name: str, model: nn.Module, lr: float, device: str, k_max: int, seed: int = 0
) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](model, lr, device, k_max, seed)
